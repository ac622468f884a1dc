"""Model factory: timm names, Hugging Face transformers, and the CIFAR ResNet/WRN family."""

from toolkit.models import (
    cifar,  # noqa: F401 - registers the CIFAR family
    mlp,  # noqa: F401 - registers mlp
)
from toolkit.models.factory import create_model, load_model_checkpoint, model_names
from toolkit.models.output import forward_output, num_classes_of, unwrap
from toolkit.models.speed import compile_model, speed_state, use_channels_last

__all__ = [
    "compile_model",
    "create_model",
    "forward_output",
    "load_model_checkpoint",
    "model_names",
    "num_classes_of",
    "speed_state",
    "unwrap",
    "use_channels_last",
]
