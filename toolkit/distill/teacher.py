"""`Teacher`: a frozen network (or an ensemble of several) that is never trained nor saved.

Contract (DESIGN.md §5):
- parameters frozen, never in the optimiser and never in a checkpoint: the networks are kept out
  of `nn.Module` registration (so `parameters()`, `state_dict()` and DDP never see them), while
  device/dtype moves (`.to()`, `.cuda()`, `.half()`) still reach them through `_apply`, and a
  forward on inputs from another device moves them there first (FSDP places only the
  parameters it sees, never calling `.to()`);
- always in eval mode: `train()` keeps the networks in eval, so `module.train()` after a
  validation loop cannot switch BatchNorm/Dropout on;
- forward under `no_grad` (not `inference_mode`: its outputs enter the student's autograd graph);
- its own input transform (e.g. a different normalisation) and optional autocast precision;
- several networks = an ensemble, combined by mean logits (default) or mean probabilities.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.distill.taps import FeatureTaps
from toolkit.models.output import forward_output, num_classes_of
from toolkit.types import ModelOutput

COMBINES = ("logits", "probs")
# None/"32": the surrounding precision; "bf16"/"fp16": autocast; "bf16-true"/"16-true": weights
# stored and forward run in that dtype (half the teacher's memory, no per-step weight casts).
PRECISIONS = (None, "32", "bf16", "fp16", "bf16-true", "16-true")
TRUE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


def check_teacher_precision(precision: Any) -> None:
    if precision not in PRECISIONS:
        raise ValueError(
            f"teacher precision must be one of {PRECISIONS}, got {precision!r}: 'bf16'/'fp16' autocast the "
            "teacher's forward, 'bf16-true'/'16-true' cast its weights and inputs"
        )


def _device_of(x: Any) -> torch.device | None:
    """The device of a tensor input, or of the first tensor of a dict input (tokenised text)."""
    if isinstance(x, Tensor):
        return x.device
    if isinstance(x, Mapping):
        return next((v.device for v in x.values() if isinstance(v, Tensor)), None)
    return None


class Renormalize:
    """Map inputs normalised with the student's (mean, std) to the teacher's (mean, std)."""

    def __init__(self, from_mean, from_std, to_mean, to_std) -> None:
        def col(v):
            return torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1)

        self.scale = col(from_std) / col(to_std)
        self.shift = (col(from_mean) - col(to_mean)) / col(to_std)

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.device, x.dtype) + self.shift.to(x.device, x.dtype)


class Teacher(nn.Module):
    """A frozen teacher network or ensemble.

    Args:
        models: one network, or several for an ensemble (all predicting the same classes). A
            plain callable `x -> logits` works too.
        input_transform: applied to the batch input before the teacher sees it (e.g.
            `Renormalize(...)` when the teacher was trained with another normalisation).
        precision: None or "32" (run in the surrounding precision); "bf16"/"fp16": autocast the
            teacher's forward to that dtype; "bf16-true"/"16-true": the networks' weights are cast
            to that dtype and their floating inputs too (half the memory, no per-step casts of
            the weights; BatchNorm statistics rounded to it). Outputs come back in float32.
        combine: how an ensemble's members are combined: "logits" (mean of logits) or "probs"
            (log of the mean of softmax probabilities).
    """

    def __init__(
        self,
        models: nn.Module | Callable | Sequence[nn.Module | Callable],
        input_transform: Callable[[Any], Any] | None = None,
        precision: str | None = None,
        combine: str = "logits",
    ) -> None:
        super().__init__()
        nets = list(models) if isinstance(models, (list, tuple)) else [models]
        if not nets:
            raise ValueError("Teacher needs at least one network")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        check_teacher_precision(precision)
        for net in nets:
            if isinstance(net, nn.Module):
                net.requires_grad_(False)
                net.eval()
        # Kept in __dict__, not registered as submodules: see the module docstring.
        self.__dict__["nets"] = nets
        self.input_transform = input_transform
        self.precision = precision
        self.combine = combine
        self._taps: list[FeatureTaps] = []
        self._cast_nets()

    def set_precision(self, precision: str | None) -> None:
        """Change the precision (values as the constructor's). Leaving a "-true" precision casts
        the weights back to float32; what the cast rounded stays rounded."""
        check_teacher_precision(precision)
        self.precision = precision
        self._cast_nets()

    def _cast_nets(self) -> None:
        dtype = TRUE_DTYPES.get(self.precision)
        for net in self.nets:
            if not isinstance(net, nn.Module):
                continue
            current = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
            if dtype is not None and current != dtype:
                net.to(dtype)
            elif dtype is None and current in TRUE_DTYPES.values():
                net.to(torch.float32)

    def _cast_input(self, x: Any) -> Any:
        """Floating inputs in the networks' dtype under a "-true" precision (the dtype the weights
        hold now: a later cast of the whole module, e.g. Lightning's "64-true", is followed)."""
        if self.precision not in TRUE_DTYPES:
            return x
        net = next((n for n in self.nets if isinstance(n, nn.Module)), None)
        p = next((p for p in net.parameters() if p.is_floating_point()), None) if net is not None else None
        dtype = p.dtype if p is not None else TRUE_DTYPES[self.precision]
        if isinstance(x, Tensor):
            return x.to(dtype) if x.is_floating_point() else x
        if isinstance(x, Mapping):
            return {
                k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in x.items()
            }
        return x

    # -- nn.Module plumbing ---------------------------------------------------------------
    def _apply(self, fn, recurse=True):  # moves/casts reach the hidden networks
        for net in self.nets:
            if isinstance(net, nn.Module):
                net._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> Teacher:
        # The wrapper's own flag follows (it has no parameters, and Lightning warns about modules
        # left in eval mode); the networks it hides stay in eval whatever the mode.
        super().train(mode)
        self.eval_nets()
        return self

    def eval_nets(self) -> None:
        """Re-assert eval mode on every network (cheap; called every epoch and after validation)."""
        for net in self.nets:
            if isinstance(net, nn.Module):
                net.eval()

    @property
    def is_ensemble(self) -> bool:
        return len(self.nets) > 1

    @property
    def num_classes(self) -> int | None:
        counts = {num_classes_of(n) for n in self.nets}
        counts.discard(None)
        if len(counts) > 1:
            raise ValueError(f"ensemble members predict different class counts: {sorted(counts)}")
        return counts.pop() if counts else None

    def tap(self, paths: Sequence[str]) -> None:
        """Record features at these module paths of every member (features of member i are
        keyed `path` for a single teacher, `"{i}:{path}"` for an ensemble)."""
        for t in self._taps:
            t.remove()
        self._taps = [FeatureTaps(n, paths) for n in self.nets] if paths else []

    # -- forward --------------------------------------------------------------------------
    def _follow_device(self, x: Any) -> None:
        """Move the networks to the input's device if they are elsewhere.

        `.to()` on the LightningModule reaches them through `_apply` (DDP, DeepSpeed stages 1-2),
        but FSDP places only the parameters it sees (`param.data = ...` over registered
        submodules; Lightning's FSDP strategy never calls `.to()`), so on GPUs the hidden
        networks would stay on the CPU while the batches arrive on the GPU. One check of the
        first parameter per forward; the move happens once. An `input_transform` that moves the
        input (e.g. to the CPU) decides where the teacher runs."""
        device = _device_of(x)
        if device is None:
            return
        for net in self.nets:
            if isinstance(net, nn.Module):
                p = next(net.parameters(), None)
                if p is not None and p.device != device:
                    self.to(device)
                    return

    def _autocast(self, x: Any):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            device = x.device.type if isinstance(x, Tensor) else "cpu"
            return torch.autocast(device_type=device, dtype=dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward_members(self, x: Any) -> list[ModelOutput]:
        """Each member's output (float32), with tapped features."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        self._follow_device(x)
        x = self._cast_input(x)
        outs = []
        with self._autocast(x):
            for i, net in enumerate(self.nets):
                out = forward_output(net, x)
                if self._taps:
                    out.features = self._taps[i].pop()
                outs.append(out)
        return [
            ModelOutput(
                o.logits.float(),
                None if o.embedding is None else o.embedding.float(),
                {k: v.float() for k, v in o.features.items()},
            )
            for o in outs
        ]

    def forward(self, x: Any) -> ModelOutput:
        outs = self.forward_members(x)
        if len(outs) == 1:
            return outs[0]
        shapes = {tuple(o.logits.shape) for o in outs}
        if len(shapes) > 1:
            raise ValueError(f"ensemble members returned logits of different shapes {sorted(shapes)}")
        stacked = torch.stack([o.logits for o in outs])
        if self.combine == "logits":
            logits = stacked.mean(0)
        else:
            logits = torch.logsumexp(torch.log_softmax(stacked, -1), 0) - math.log(len(outs))
        features = {f"{i}:{k}": v for i, o in enumerate(outs) for k, v in o.features.items()}
        return ModelOutput(logits, None, features)

    # -- sources --------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> Teacher:
        """A teacher from a checkpoint written by toolkit (a Lightning `.ckpt` of a
        ClassificationModule/DistillationModule built from a model name)."""
        from toolkit.models.factory import load_model_checkpoint

        return cls(load_model_checkpoint(path), **kwargs)

    @classmethod
    def from_name(cls, name: str, num_classes: int | None = None, **kwargs: Any) -> Teacher:
        """A teacher from a model spec accepted by `toolkit.models.create_model`, or a checkpoint
        path: "timm:resnet18", "hf:PATH", "resnet32x4", "runs/teacher/best.ckpt"."""
        from toolkit.models.factory import create_model, is_checkpoint_path

        teacher_kw = {k: kwargs.pop(k) for k in ("input_transform", "precision", "combine") if k in kwargs}
        if is_checkpoint_path(name):
            return cls.from_checkpoint(name, **teacher_kw)
        return cls(create_model(name, num_classes=num_classes, **kwargs), **teacher_kw)

    def __repr__(self) -> str:
        names = ", ".join(type(n).__name__ for n in self.nets)
        return f"Teacher([{names}], combine={self.combine!r}, precision={self.precision!r})"
