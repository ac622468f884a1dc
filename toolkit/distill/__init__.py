"""Teacher/student machinery and distillers (registered under kind "distiller")."""

from toolkit.distill.logits import KDLoss
from toolkit.distill.memory import SampleMemory
from toolkit.distill.projectors import Projector, ProjectorSet
from toolkit.distill.ps_kd import PSKDLoss
from toolkit.distill.taps import FeatureTaps, resolve_module
from toolkit.distill.teacher import Renormalize, Teacher

__all__ = [
    "FeatureTaps",
    "KDLoss",
    "PSKDLoss",
    "Projector",
    "ProjectorSet",
    "Renormalize",
    "SampleMemory",
    "Teacher",
    "resolve_module",
]
