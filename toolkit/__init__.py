"""toolkit: Lightning-native distillation, losses and data selection as plug-ins.

from toolkit import build
kd = build("distiller", "kd", temperature=4.0)
"""

from toolkit import callbacks, data, distill, losses, models, modules, optim, selection  # noqa: F401 - fill the registry
from toolkit.registry import build, names, register
from toolkit.terms import LossTerm, Step
from toolkit.types import Batch, ModelOutput, Progress

__version__ = "0.1.0"

__all__ = ["Batch", "LossTerm", "ModelOutput", "Progress", "Step", "build", "names", "register"]
