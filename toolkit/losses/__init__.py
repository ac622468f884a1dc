"""Single-model losses as loss terms, registered under kind "loss"."""

from toolkit.losses.anyloss import AnyLoss
from toolkit.losses.bias_loss import BiasLoss
from toolkit.losses.comp_sum import CompSumLoss
from toolkit.losses.cross_entropy import CrossEntropyLoss
from toolkit.losses.dco import DCOLoss
from toolkit.losses.emo import EMOLoss
from toolkit.losses.hl_gauss import HLGaussLoss
from toolkit.losses.l2_svm import L2SVMLoss
from toolkit.losses.ldr_kl import ALDRKLLoss, LDRKLLoss
from toolkit.losses.linear_cross_entropy import LinearCrossEntropyLoss
from toolkit.losses.logit_z_reg import LogitZRegLoss
from toolkit.losses.mse import MSELoss
from toolkit.losses.multi_similarity import MultiSimilarityLoss
from toolkit.losses.one_to_k_contrastive import OneToKContrastiveLoss
from toolkit.losses.self_adjusting_dice import SelfAdjustingDiceLoss
from toolkit.losses.soft_infonce import SoftInfoNCELoss
from toolkit.losses.spherical_z import SphericalZLoss

__all__ = [
    "ALDRKLLoss",
    "AnyLoss",
    "BiasLoss",
    "CompSumLoss",
    "CrossEntropyLoss",
    "DCOLoss",
    "EMOLoss",
    "HLGaussLoss",
    "L2SVMLoss",
    "LDRKLLoss",
    "LinearCrossEntropyLoss",
    "LogitZRegLoss",
    "MSELoss",
    "MultiSimilarityLoss",
    "OneToKContrastiveLoss",
    "SelfAdjustingDiceLoss",
    "SoftInfoNCELoss",
    "SphericalZLoss",
]
