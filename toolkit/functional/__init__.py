"""Pure tensor functions, one per method: no state, no Lightning (like `torchmetrics.functional`)."""

from toolkit.functional._reduce import reduce
from toolkit.functional.attention import attention_map, attention_transfer_loss
from toolkit.functional.bdkd import bdkd_balance, bdkd_student_loss, bdkd_teacher_loss
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.functional.dkd import dkd_loss, dkd_parts
from toolkit.functional.fitnet import hint_loss
from toolkit.functional.kd import kd_loss
from toolkit.functional.mean_teacher import ema_update_, rmt_augment, symmetric_cross_entropy
from toolkit.functional.nkd import nkd_loss, nkd_parts
from toolkit.functional.pld import pld_loss, teacher_optimal_permutation
from toolkit.functional.ps_kd import ps_kd_alpha, ps_kd_loss, ps_kd_targets
from toolkit.functional.sinkd import sinkd_loss, sinkhorn_plan

__all__ = [
    "attention_map",
    "attention_transfer_loss",
    "bdkd_balance",
    "bdkd_student_loss",
    "bdkd_teacher_loss",
    "cross_entropy",
    "dkd_loss",
    "dkd_parts",
    "ema_update_",
    "hint_loss",
    "kd_loss",
    "nkd_loss",
    "nkd_parts",
    "pld_loss",
    "ps_kd_alpha",
    "ps_kd_loss",
    "ps_kd_targets",
    "reduce",
    "rmt_augment",
    "sinkd_loss",
    "sinkhorn_plan",
    "symmetric_cross_entropy",
    "teacher_optimal_permutation",
]
