"""Teacher/student machinery and distillers (registered under kind "distiller")."""

from toolkit.distill.attention import AttentionTransferLoss
from toolkit.distill.bdkd import BDKDLoss
from toolkit.distill.cache import TeacherCache, build_teacher_cache
from toolkit.distill.crkd import CRKDLoss, PadClasses
from toolkit.distill.dhkd import DHKDLoss
from toolkit.distill.dkd import DKDLoss
from toolkit.distill.ensemble_kd import EnsembleKDLoss
from toolkit.distill.fitnet import FitNetLoss
from toolkit.distill.gt_self_distill import GTSelfDistillLoss
from toolkit.distill.heads import Head, HeadSet
from toolkit.distill.lelp import LELPLoss
from toolkit.distill.logits import KDLoss
from toolkit.distill.mean_teacher import MeanTeacherLoss
from toolkit.distill.memory import SampleMemory
from toolkit.distill.nd import NDLoss
from toolkit.distill.nkd import NKDLoss
from toolkit.distill.pld import PLDLoss
from toolkit.distill.projectors import Projector, ProjectorSet
from toolkit.distill.ps_kd import PSKDLoss
from toolkit.distill.random_teacher import DINOHead, RandomTeacherLoss
from toolkit.distill.sinkd import SinKDLoss
from toolkit.distill.taps import FeatureTaps, resolve_module
from toolkit.distill.teacher import Renormalize, Teacher
from toolkit.distill.tgeo_kd import FusionRatioNet, TGeoKDLoss
from toolkit.distill.uskd import USKDLoss

__all__ = [
    "AttentionTransferLoss",
    "BDKDLoss",
    "CRKDLoss",
    "DHKDLoss",
    "DINOHead",
    "DKDLoss",
    "EnsembleKDLoss",
    "FeatureTaps",
    "FitNetLoss",
    "FusionRatioNet",
    "GTSelfDistillLoss",
    "Head",
    "HeadSet",
    "KDLoss",
    "LELPLoss",
    "MeanTeacherLoss",
    "NDLoss",
    "NKDLoss",
    "PLDLoss",
    "PSKDLoss",
    "PadClasses",
    "Projector",
    "ProjectorSet",
    "RandomTeacherLoss",
    "Renormalize",
    "SampleMemory",
    "SinKDLoss",
    "TGeoKDLoss",
    "TeacherCache",
    "Teacher",
    "USKDLoss",
    "build_teacher_cache",
    "resolve_module",
]
