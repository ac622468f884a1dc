"""Teacher/student machinery and distillers (registered under kind "distiller")."""

from toolkit.distill.attention import AttentionTransferLoss
from toolkit.distill.bdkd import BDKDLoss
from toolkit.distill.cache import TeacherCache
from toolkit.distill.dkd import DKDLoss
from toolkit.distill.fitnet import FitNetLoss
from toolkit.distill.logits import KDLoss
from toolkit.distill.mean_teacher import MeanTeacherLoss
from toolkit.distill.memory import SampleMemory
from toolkit.distill.nkd import NKDLoss
from toolkit.distill.pld import PLDLoss
from toolkit.distill.projectors import Projector, ProjectorSet
from toolkit.distill.ps_kd import PSKDLoss
from toolkit.distill.sinkd import SinKDLoss
from toolkit.distill.taps import FeatureTaps, resolve_module
from toolkit.distill.teacher import Renormalize, Teacher

__all__ = [
    "AttentionTransferLoss",
    "BDKDLoss",
    "DKDLoss",
    "FeatureTaps",
    "FitNetLoss",
    "KDLoss",
    "MeanTeacherLoss",
    "NKDLoss",
    "PLDLoss",
    "PSKDLoss",
    "Projector",
    "ProjectorSet",
    "Renormalize",
    "SampleMemory",
    "SinKDLoss",
    "Teacher",
    "TeacherCache",
    "resolve_module",
]
