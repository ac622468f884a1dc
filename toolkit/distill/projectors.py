"""Projectors from student feature shapes to teacher feature shapes, sized by a dry run.

`ProjectorSet` is the container a feature term owns. It records how each projector was built
(`spec`) in the module's extra state, so loading a checkpoint (Lightning resume, `load_from_checkpoint`
or a plain `load_state_dict`) rebuilds the projectors before their weights are loaded, strictly,
without running the teacher again.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class Projector(nn.Module):
    """Student feature → teacher feature shape.

    4-D maps (B, C, H, W): 1×1 conv + BatchNorm (the FitNets regressor as used by CRD/mdistiller),
    then adaptive average pooling or bilinear resize when the spatial sizes differ.
    2-D (B, D) and token (B, N, D) features: a linear layer on the last dimension.
    """

    def __init__(self, in_dim: int, out_dim: int, ndim: int, out_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.spec = {"in_dim": in_dim, "out_dim": out_dim, "ndim": ndim, "out_hw": out_hw}
        self.out_hw = tuple(out_hw) if out_hw is not None else None
        if ndim == 4:
            self.proj = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim))
        elif ndim in (2, 3):
            self.proj = nn.Linear(in_dim, out_dim)
        else:
            raise ValueError(f"cannot project features with {ndim} dimensions; expected 2, 3 or 4")

    @classmethod
    def between(cls, student_feature: Tensor, teacher_feature: Tensor) -> Projector:
        s, t = student_feature, teacher_feature
        if s.dim() != t.dim():
            raise ValueError(
                f"student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} differ in rank"
            )
        if s.dim() == 4:
            return cls(s.shape[1], t.shape[1], 4, tuple(t.shape[-2:]))
        return cls(s.shape[-1], t.shape[-1], s.dim())

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        if self.out_hw is not None and tuple(y.shape[-2:]) != self.out_hw:
            if y.shape[-2] >= self.out_hw[0] and y.shape[-1] >= self.out_hw[1]:
                y = F.adaptive_avg_pool2d(y, self.out_hw)
            else:
                y = F.interpolate(y, size=self.out_hw, mode="bilinear", align_corners=False)
        return y


class SpecModuleSet(nn.Module):
    """Named trainable modules built on first use from a dry run, rebuilt from checkpoints.

    Each item has a `spec` (the keyword arguments of `item_type`), recorded in the module's extra
    state: loading a checkpoint (Lightning resume, `load_from_checkpoint`, a plain
    `load_state_dict`) rebuilds missing items before their weights are loaded strictly, with no
    dry run; an item whose spec differs from the checkpoint's is an error. Subclasses set
    `item_type` and `what` and add an `ensure` that builds an item from example tensors.
    """

    item_type: type[nn.Module]
    what = "module"

    def __init__(self) -> None:
        super().__init__()
        self.items = nn.ModuleDict()

    def _ensure(self, name: str, build: Any, device: Any) -> nn.Module:
        if name not in self.items:
            self.items[name] = build().to(device=device)
        return self.items[name]

    def __getitem__(self, name: str) -> nn.Module:
        return self.items[name]

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def get_extra_state(self) -> Any:
        return {name: m.spec for name, m in self.items.items()}

    def set_extra_state(self, state: Any) -> None:
        for name, spec in state.items():
            if name not in self.items:
                self.items[name] = self.item_type(**spec)
            elif self.items[name].spec != spec:
                raise ValueError(
                    f"checkpoint {self.what} {name!r} has spec {spec} but this run built {self.items[name].spec}: "
                    "the student, the teacher or the term's settings differ from the checkpoint's"
                )


class ProjectorSet(SpecModuleSet):
    """Named projectors, created on first use from feature shapes and rebuilt from checkpoints."""

    item_type = Projector
    what = "projector"

    def ensure(self, name: str, student_feature: Tensor, teacher_feature: Tensor) -> Projector:
        """The projector `name`, built from these shapes if it does not exist yet."""
        return self._ensure(
            name, lambda: Projector.between(student_feature, teacher_feature), student_feature.device
        )
