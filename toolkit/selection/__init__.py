"""Data selection, pruning and reweighting: Lightning callbacks (and loss terms) keyed by sample index."""

from toolkit.selection.curriculum import Curriculum
from toolkit.selection.dataset_equity import DatasetEquity
from toolkit.selection.el2n import EL2NScorer
from toolkit.selection.elr import ELRLoss
from toolkit.selection.forgetting import ForgettingScorer
from toolkit.selection.grand import GraNdLastLayerScorer, GraNdScorer
from toolkit.selection.loss_reweighting import LossReweighting
from toolkit.selection.pruning import DataPruning, pruning_selector
from toolkit.selection.random import RandomScorer
from toolkit.selection.scorer import PassScorer, Scorer, scoring_mode, scoring_model
from toolkit.selection.scores import SampleScores
from toolkit.selection.vog import VoGScorer
from toolkit.selection.weighting import SampleWeighting
from toolkit.selection.zip_fit import ZipFitScorer

__all__ = [
    "Curriculum",
    "DataPruning",
    "DatasetEquity",
    "EL2NScorer",
    "ELRLoss",
    "ForgettingScorer",
    "GraNdLastLayerScorer",
    "GraNdScorer",
    "LossReweighting",
    "PassScorer",
    "RandomScorer",
    "SampleScores",
    "SampleWeighting",
    "Scorer",
    "VoGScorer",
    "ZipFitScorer",
    "pruning_selector",
    "scoring_mode",
    "scoring_model",
]
