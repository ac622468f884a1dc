"""Pure tensor functions, one per method: no state, no Lightning (like `torchmetrics.functional`)."""

from toolkit.functional._reduce import reduce
from toolkit.functional.anyloss import anyloss, soft_confusion
from toolkit.functional.attention import attention_map, attention_transfer_loss
from toolkit.functional.bdkd import bdkd_balance, bdkd_student_loss, bdkd_teacher_loss
from toolkit.functional.bias_loss import bias_loss, bias_weights, feature_variance
from toolkit.functional.calibration import (
    calibration_error,
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    reliability_bins,
    temperature_scale,
)
from toolkit.functional.cam import (
    capture_layer,
    default_cam_layer,
    eigen_cam,
    grad_cam,
    grad_cam_pp,
    grad_cam_pp_weights,
    grad_cam_weights,
    normgrad,
    saliency_maps,
)
from toolkit.functional.comp_sum import comp_sum_loss
from toolkit.functional.crkd import (
    cluster_accuracy,
    crkd_kd_loss,
    ncd_targets,
    sinkhorn_knopp,
    split_cluster_accuracy,
    swapped_prediction_loss,
)
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.functional.curriculum import curriculum_weight, difficulty_to_easiness
from toolkit.functional.dataset_equity import cluster_features, cluster_likelihood, dataset_equity_weight
from toolkit.functional.dco import dco_factor, dco_from_log_prob, dco_loss
from toolkit.functional.dhkd import binary_kl_loss, binary_kl_norm_loss
from toolkit.functional.dkd import dkd_loss, dkd_parts
from toolkit.functional.elr import elr_loss, elr_regularizer, elr_update_target
from toolkit.functional.emo import emo_distance, emo_loss
from toolkit.functional.ensemble_kd import ensemble_kd_loss, ensemble_log_probs
from toolkit.functional.fitnet import hint_loss
from toolkit.functional.forgetting import forgetting_scores, forgetting_update
from toolkit.functional.gradient_spectrum import (
    effective_rank,
    gradient_spectrum,
    spectrum_stats,
    stable_rank,
)
from toolkit.functional.grand import grand_last_layer_score, grand_score
from toolkit.functional.gt_self_distill import (
    gt_self_distill_loss,
    gt_self_distill_targets,
    kernel_ridge_self_distill,
)
from toolkit.functional.hessian import (
    HessianOperator,
    hutchinson_diagonal,
    hutchinson_trace,
    hvp,
    lanczos_top_eigenvalues,
)
from toolkit.functional.hessian_alignment import (
    hessian_alignment_parts,
    hessian_gradient_product,
    hgp_penalty,
    hutchinson_penalty,
)
from toolkit.functional.hl_gauss import (
    hl_gauss_centers,
    hl_gauss_decode,
    hl_gauss_loss,
    hl_gauss_support,
    hl_gauss_target,
)
from toolkit.functional.kd import kd_loss
from toolkit.functional.l2_svm import l2_svm_loss
from toolkit.functional.ldr_kl import aldr_kl_lambda, aldr_kl_loss, ldr_kl_loss
from toolkit.functional.lelp import (
    lelp_fit,
    lelp_loss,
    lelp_subclass_logits,
    lelp_within_class_logits,
    null_space_projector,
)
from toolkit.functional.linear_cross_entropy import linear_cross_entropy
from toolkit.functional.logit_z_reg import logit_z_reg
from toolkit.functional.loss_reweighting import loss_reweighting_weights
from toolkit.functional.lr_annealing_law import fit_lr_annealing_law, lr_annealing_areas, lr_annealing_law
from toolkit.functional.mean_teacher import ema_update_, rmt_augment, symmetric_cross_entropy
from toolkit.functional.mse import squared_error, squared_error_decode
from toolkit.functional.multi_similarity import ms_mine, multi_similarity_loss
from toolkit.functional.naive_bayes import (
    gaussian_nb_fit,
    gaussian_nb_linear,
    gaussian_nb_log_likelihood,
    gaussian_nb_predict,
    gaussian_nb_stats,
    merge_gaussian_nb_stats,
)
from toolkit.functional.nd import nd_loss
from toolkit.functional.nkd import nkd_loss, nkd_parts
from toolkit.functional.one_to_k import one_to_k_contrastive_embeddings, one_to_k_contrastive_loss
from toolkit.functional.pld import pld_loss, teacher_optimal_permutation
from toolkit.functional.ps_kd import ps_kd_alpha, ps_kd_loss, ps_kd_targets
from toolkit.functional.random_teacher import random_teacher_loss
from toolkit.functional.retrieval import recall_at_k
from toolkit.functional.saf import saf_slots, saf_trajectory_loss
from toolkit.functional.self_adjusting_dice import self_adjusting_dice_loss
from toolkit.functional.sigma_reparam import (
    attention_entropy,
    power_iteration,
    sigma_reparam_weight,
    spectral_init,
    spectral_norm_estimate,
)
from toolkit.functional.sinkd import sinkd_loss, sinkhorn_plan
from toolkit.functional.soft_infonce import soft_infonce_embeddings, soft_infonce_loss, soft_infonce_weights
from toolkit.functional.spherical_z import spherical_z_loss
from toolkit.functional.tgeo_kd import tgeo_features, tgeo_kd_loss
from toolkit.functional.uskd import uskd_loss, uskd_parts
from toolkit.functional.vog import vog_score
from toolkit.functional.weight_compander import compand, compand_inverse
from toolkit.functional.zip_fit import gzip_size, normalized_compression_distance, zip_fit_scores

__all__ = [
    "HessianOperator",
    "aldr_kl_lambda",
    "aldr_kl_loss",
    "anyloss",
    "attention_entropy",
    "attention_map",
    "attention_transfer_loss",
    "bdkd_balance",
    "bdkd_student_loss",
    "bdkd_teacher_loss",
    "bias_loss",
    "bias_weights",
    "binary_kl_loss",
    "binary_kl_norm_loss",
    "calibration_error",
    "capture_layer",
    "cluster_accuracy",
    "cluster_features",
    "cluster_likelihood",
    "comp_sum_loss",
    "compand",
    "compand_inverse",
    "crkd_kd_loss",
    "cross_entropy",
    "curriculum_weight",
    "dataset_equity_weight",
    "dco_factor",
    "dco_from_log_prob",
    "dco_loss",
    "default_cam_layer",
    "difficulty_to_easiness",
    "dkd_loss",
    "dkd_parts",
    "effective_rank",
    "eigen_cam",
    "elr_loss",
    "elr_regularizer",
    "elr_update_target",
    "ema_update_",
    "emo_distance",
    "emo_loss",
    "ensemble_kd_loss",
    "ensemble_log_probs",
    "expected_calibration_error",
    "feature_variance",
    "fit_lr_annealing_law",
    "fit_temperature",
    "forgetting_scores",
    "forgetting_update",
    "gaussian_nb_fit",
    "gaussian_nb_linear",
    "gaussian_nb_log_likelihood",
    "gaussian_nb_predict",
    "gaussian_nb_stats",
    "grad_cam",
    "grad_cam_pp",
    "grad_cam_pp_weights",
    "grad_cam_weights",
    "gradient_spectrum",
    "grand_last_layer_score",
    "grand_score",
    "gt_self_distill_loss",
    "gt_self_distill_targets",
    "gzip_size",
    "hessian_alignment_parts",
    "hessian_gradient_product",
    "hgp_penalty",
    "hint_loss",
    "hl_gauss_centers",
    "hl_gauss_decode",
    "hl_gauss_loss",
    "hl_gauss_support",
    "hl_gauss_target",
    "hutchinson_diagonal",
    "hutchinson_penalty",
    "hutchinson_trace",
    "hvp",
    "kd_loss",
    "kernel_ridge_self_distill",
    "l2_svm_loss",
    "lanczos_top_eigenvalues",
    "ldr_kl_loss",
    "lelp_fit",
    "lelp_loss",
    "lelp_subclass_logits",
    "lelp_within_class_logits",
    "linear_cross_entropy",
    "logit_z_reg",
    "loss_reweighting_weights",
    "lr_annealing_areas",
    "lr_annealing_law",
    "maximum_calibration_error",
    "merge_gaussian_nb_stats",
    "ms_mine",
    "multi_similarity_loss",
    "ncd_targets",
    "nd_loss",
    "nkd_loss",
    "nkd_parts",
    "normalized_compression_distance",
    "normgrad",
    "null_space_projector",
    "one_to_k_contrastive_embeddings",
    "one_to_k_contrastive_loss",
    "pld_loss",
    "power_iteration",
    "ps_kd_alpha",
    "ps_kd_loss",
    "ps_kd_targets",
    "random_teacher_loss",
    "recall_at_k",
    "reduce",
    "reliability_bins",
    "rmt_augment",
    "saf_slots",
    "saf_trajectory_loss",
    "saliency_maps",
    "self_adjusting_dice_loss",
    "sigma_reparam_weight",
    "sinkd_loss",
    "sinkhorn_knopp",
    "sinkhorn_plan",
    "soft_confusion",
    "soft_infonce_embeddings",
    "soft_infonce_loss",
    "soft_infonce_weights",
    "spectral_init",
    "spectral_norm_estimate",
    "spectrum_stats",
    "spherical_z_loss",
    "split_cluster_accuracy",
    "squared_error",
    "squared_error_decode",
    "stable_rank",
    "swapped_prediction_loss",
    "symmetric_cross_entropy",
    "teacher_optimal_permutation",
    "temperature_scale",
    "tgeo_features",
    "tgeo_kd_loss",
    "uskd_loss",
    "uskd_parts",
    "vog_score",
    "zip_fit_scores",
]
