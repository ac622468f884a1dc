"""LightningModules: the `LossBus` mixin, `ClassificationModule`, `DistillationModule`."""

from toolkit.modules.bus import LossBus, SampleWeighter
from toolkit.modules.classification import ClassificationModule
from toolkit.modules.config import build_term, build_terms
from toolkit.modules.distillation import DistillationModule

__all__ = [
    "ClassificationModule",
    "DistillationModule",
    "LossBus",
    "SampleWeighter",
    "build_term",
    "build_terms",
]
