"""LightningModules: the `LossBus` mixin, `ClassificationModule`, `DistillationModule`,
`RegressionModule` (regression heads), `EmbeddingModule` (metric learning) and `CausalLMModule`
(causal language models)."""

from toolkit.modules.bus import LossBus, SampleWeighter
from toolkit.modules.causal_lm import CausalLMModule, LMOutput
from toolkit.modules.classification import ClassificationModule
from toolkit.modules.config import build_term, build_terms
from toolkit.modules.distillation import DistillationModule
from toolkit.modules.metric_learning import EmbeddingModule, RecallAtK
from toolkit.modules.regression import RegressionModule

__all__ = [
    "CausalLMModule",
    "ClassificationModule",
    "DistillationModule",
    "EmbeddingModule",
    "LMOutput",
    "LossBus",
    "RecallAtK",
    "RegressionModule",
    "SampleWeighter",
    "build_term",
    "build_terms",
]
