"""Pure tensor functions, one per method: no state, no Lightning (like `torchmetrics.functional`)."""

from toolkit.functional._reduce import reduce
from toolkit.functional.attention import attention_map, attention_transfer_loss
from toolkit.functional.bdkd import bdkd_balance, bdkd_student_loss, bdkd_teacher_loss
from toolkit.functional.crkd import (
    cluster_accuracy,
    crkd_kd_loss,
    ncd_targets,
    sinkhorn_knopp,
    split_cluster_accuracy,
    swapped_prediction_loss,
)
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.functional.dhkd import binary_kl_loss, binary_kl_norm_loss
from toolkit.functional.dkd import dkd_loss, dkd_parts
from toolkit.functional.ensemble_kd import ensemble_kd_loss, ensemble_log_probs
from toolkit.functional.fitnet import hint_loss
from toolkit.functional.gt_self_distill import (
    gt_self_distill_loss,
    gt_self_distill_targets,
    kernel_ridge_self_distill,
)
from toolkit.functional.kd import kd_loss
from toolkit.functional.lelp import (
    lelp_fit,
    lelp_loss,
    lelp_subclass_logits,
    lelp_within_class_logits,
    null_space_projector,
)
from toolkit.functional.mean_teacher import ema_update_, rmt_augment, symmetric_cross_entropy
from toolkit.functional.nd import nd_loss
from toolkit.functional.nkd import nkd_loss, nkd_parts
from toolkit.functional.pld import pld_loss, teacher_optimal_permutation
from toolkit.functional.ps_kd import ps_kd_alpha, ps_kd_loss, ps_kd_targets
from toolkit.functional.random_teacher import random_teacher_loss
from toolkit.functional.sinkd import sinkd_loss, sinkhorn_plan
from toolkit.functional.tgeo_kd import tgeo_features, tgeo_kd_loss
from toolkit.functional.uskd import uskd_loss, uskd_parts

__all__ = [
    "attention_map",
    "attention_transfer_loss",
    "bdkd_balance",
    "bdkd_student_loss",
    "bdkd_teacher_loss",
    "binary_kl_loss",
    "binary_kl_norm_loss",
    "cluster_accuracy",
    "crkd_kd_loss",
    "cross_entropy",
    "dkd_loss",
    "dkd_parts",
    "ema_update_",
    "ensemble_kd_loss",
    "ensemble_log_probs",
    "gt_self_distill_loss",
    "gt_self_distill_targets",
    "hint_loss",
    "kd_loss",
    "kernel_ridge_self_distill",
    "lelp_fit",
    "lelp_loss",
    "lelp_subclass_logits",
    "lelp_within_class_logits",
    "ncd_targets",
    "nd_loss",
    "nkd_loss",
    "nkd_parts",
    "null_space_projector",
    "pld_loss",
    "ps_kd_alpha",
    "ps_kd_loss",
    "ps_kd_targets",
    "random_teacher_loss",
    "reduce",
    "rmt_augment",
    "sinkd_loss",
    "sinkhorn_knopp",
    "sinkhorn_plan",
    "split_cluster_accuracy",
    "swapped_prediction_loss",
    "symmetric_cross_entropy",
    "teacher_optimal_permutation",
    "tgeo_features",
    "tgeo_kd_loss",
    "uskd_loss",
    "uskd_parts",
]
