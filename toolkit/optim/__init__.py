"""Optimisers (torch's and the papers') and LR schedules, buildable by name."""

from toolkit.optim.classp import CLASSP
from toolkit.optim.diffgrad import DiffGrad
from toolkit.optim.factory import build_optimizer, build_scheduler
from toolkit.optim.lion import Lion

__all__ = ["CLASSP", "DiffGrad", "Lion", "build_optimizer", "build_scheduler"]
