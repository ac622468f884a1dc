"""Pure tensor functions, one per method: no state, no Lightning (like `torchmetrics.functional`)."""

from toolkit.functional._reduce import reduce
from toolkit.functional.attention import attention_map, attention_transfer_loss
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.functional.dkd import dkd_loss, dkd_parts
from toolkit.functional.fitnet import hint_loss
from toolkit.functional.kd import kd_loss
from toolkit.functional.nkd import nkd_loss, nkd_parts
from toolkit.functional.pld import pld_loss, teacher_optimal_permutation
from toolkit.functional.ps_kd import ps_kd_alpha, ps_kd_loss, ps_kd_targets
from toolkit.functional.sinkd import sinkd_loss, sinkhorn_plan

__all__ = [
    "attention_map",
    "attention_transfer_loss",
    "cross_entropy",
    "dkd_loss",
    "dkd_parts",
    "hint_loss",
    "kd_loss",
    "nkd_loss",
    "nkd_parts",
    "pld_loss",
    "ps_kd_alpha",
    "ps_kd_loss",
    "ps_kd_targets",
    "reduce",
    "sinkd_loss",
    "sinkhorn_plan",
    "teacher_optimal_permutation",
]
