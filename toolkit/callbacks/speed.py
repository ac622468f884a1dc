"""`SpeedSwitches`: opt-in speed switches for a toolkit module, applied when the Trainer sets up.

    trainer = L.Trainer(precision="bf16-mixed",                 # the student's precision: Lightning's
                        callbacks=[SpeedSwitches(channels_last=True, compile=True,
                                                 compile_teacher=True, teacher_precision="bf16-true")])

- `channels_last`: the whole LightningModule's 4-D weights (student, projectors and other
  trainable parts of the terms, the teacher's networks) in channels-last memory format, and the
  4-D inputs of the student and teacher converted to it in `forward_output`;
- `compile`: `torch.compile` of the student's whole forward (`toolkit.models.speed.compile_model`:
  features, embedding, logits and FeatureTaps hooks; loss terms and the optimiser stay eager);
  `True` or a mapping of `torch.compile` options (`{"mode": "max-autotune"}`);
- `compile_teacher`: the same for each of the teacher's networks (its forward under `no_grad`);
- `teacher_precision`: the teacher's own precision (`Teacher.set_precision`): "bf16-true" /
  "16-true" cast its weights and inputs, "bf16" / "fp16" autocast it, "32" full precision; its
  outputs always reach the loss in float32.

The switches are applied once per module in `setup` (before the module's own set-up, whose dry
run then already runs the switched networks), for every stage (fit, validate, test). Values are
unchanged by `channels_last`; `compile` changes them by float rounding only; the precisions by
their rounding (see `tests/test_perf_speed.py` for the tolerances). A module without a `Teacher`
(the student-alone baseline of `recipes.distill`) gets the student switches only.

Works with any LightningModule that keeps its network in `.model` (every toolkit module);
`compile` needs one whose steps run it through `forward_output` (`ClassificationModule` and its
subclasses: distillation, regression, metric learning; not `CausalLMModule`, an error).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from toolkit.distill.teacher import Teacher, check_teacher_precision
from toolkit.models.speed import check_compile_options, compile_model, use_channels_last
from toolkit.modules.classification import ClassificationModule


def _compile_arg(name: str, value: Any) -> dict[str, Any] | None:
    """False/None: off; True or a mapping of torch.compile options: on."""
    if value is None or value is False:
        return None
    if value is not True and not isinstance(value, Mapping):
        raise ValueError(f"{name} must be true, false or a mapping of torch.compile options, got {value!r}")
    return check_compile_options(value)


class SpeedSwitches(Callback):
    """Apply opt-in speed switches to the module's student and teacher (see the module docstring).

    Args:
        channels_last: channels-last memory format for weights and 4-D inputs.
        compile: torch.compile the student's forward: True, or a mapping of torch.compile options.
        compile_teacher: the same for the teacher's networks.
        teacher_precision: None (leave the teacher as built) or a `Teacher` precision.
    """

    def __init__(
        self,
        channels_last: bool = False,
        compile: bool | Mapping[str, Any] = False,  # noqa: A002 - the flag's name
        compile_teacher: bool | Mapping[str, Any] = False,
        teacher_precision: str | None = None,
    ) -> None:
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {channels_last!r}")
        check_teacher_precision(teacher_precision)
        self.channels_last = channels_last
        self.compile = _compile_arg("compile", compile)
        self.compile_teacher = _compile_arg("compile_teacher", compile_teacher)
        self.teacher_precision = teacher_precision
        self._applied: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    @property
    def active(self) -> bool:
        return (
            self.channels_last
            or self.compile is not None
            or self.compile_teacher is not None
            or self.teacher_precision is not None
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if pl_module in self._applied:
            return
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"SpeedSwitches needs a module that keeps its network in `.model` (the toolkit's modules); "
                f"{type(pl_module).__name__} has none"
            )
        if self.compile is not None and not isinstance(pl_module, ClassificationModule):
            raise ValueError(
                f"compile: {type(pl_module).__name__} does not run its network through "
                "toolkit.models.forward_output (ClassificationModule and its subclasses do), so the compiled "
                "forward would never be used; compile inside the module instead, or drop the switch"
            )
        teacher = getattr(pl_module, "teacher", None)
        teacher = teacher if isinstance(teacher, Teacher) else None
        nets = [n for n in teacher.nets if isinstance(n, nn.Module)] if teacher is not None else []
        if self.teacher_precision is not None and teacher is not None:
            teacher.set_precision(self.teacher_precision)
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)  # reaches the teacher through its _apply
            for net in [model, *nets]:
                use_channels_last(net)
        if self.compile is not None:
            compile_model(model, self.compile)
        if self.compile_teacher is not None:
            for net in nets:
                compile_model(net, self.compile_teacher)
        self._applied.add(pl_module)

    def __repr__(self) -> str:
        return (
            f"SpeedSwitches(channels_last={self.channels_last}, compile={self.compile}, "
            f"compile_teacher={self.compile_teacher}, teacher_precision={self.teacher_precision!r})"
        )
