"""Data selection, pruning and reweighting: Lightning callbacks (and loss terms) keyed by sample index."""

from toolkit.selection.el2n import EL2NScorer
from toolkit.selection.pruning import DataPruning, pruning_selector
from toolkit.selection.random import RandomScorer
from toolkit.selection.scorer import PassScorer, Scorer, scoring_model
from toolkit.selection.scores import SampleScores

__all__ = [
    "DataPruning",
    "EL2NScorer",
    "PassScorer",
    "RandomScorer",
    "SampleScores",
    "Scorer",
    "pruning_selector",
    "scoring_model",
]
