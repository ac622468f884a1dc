"""Teacher/student machinery and distillers (registered under kind "distiller")."""

from toolkit.distill.logits import KDLoss
from toolkit.distill.projectors import Projector, ProjectorSet
from toolkit.distill.taps import FeatureTaps, resolve_module
from toolkit.distill.teacher import Renormalize, Teacher

__all__ = ["FeatureTaps", "KDLoss", "Projector", "ProjectorSet", "Renormalize", "Teacher", "resolve_module"]
