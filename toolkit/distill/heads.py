"""Trainable heads a loss term owns: auxiliary classifiers and embedding projectors.

Model surgery without touching the user's model: a term taps a student feature (a
`FeatureTaps` path such as "layer2" or "fc:input") and feeds it to a `Head` it owns. The head is a
submodule of the term, so it is optimised and checkpointed with the student, and it is dropped
at inference (the student's own classifier makes the predictions). Used by DHKD (the auxiliary
head that takes the logit-level loss), USKD (the weak classifier on a mid-level feature) and
KD++/ND (the student-to-teacher embedding projector).

`HeadSet` is the container a term keeps its heads in. Like `ProjectorSet` it records each head's
spec in the module's extra state, so a checkpoint (Lightning resume, `load_from_checkpoint`, a
plain `load_state_dict`) rebuilds the heads before their weights are loaded strictly, without a
dry run; a spec that differs from the checkpoint's is an error.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from toolkit.distill.projectors import SpecModuleSet

KINDS = ("linear", "mlp", "bn_linear")


def pool_feature(x: Tensor) -> Tensor:
    """A (B, D) vector per sample from a tapped feature: (B, D) as is, (B, C, H, W) globally
    average-pooled over H×W, (B, N, D) token sequences by their first (class) token."""
    if x.dim() == 2:
        return x
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x[:, 0]
    raise ValueError(
        f"cannot pool a feature of shape {tuple(x.shape)} to (B, D): tap a (B, D), (B, N, D) or (B, C, H, W) output"
    )


class Head(nn.Module):
    """A small trainable head on a pooled feature (`pool_feature`), from `in_dim` to `out_dim`.

    kind:
        "linear":    Linear(in, out).
        "mlp":       Linear(in, hidden) → Dropout(p) → BatchNorm1d(hidden) → ReLU → Linear(hidden, out),
                     DHKD's `NonLinearClassifier` (hidden 200, p = 0.1).
        "bn_linear": BatchNorm1d(in) → Dropout(p) → Linear(in, out) with a zero bias, KD++'s
                     `EmbTrans` embedding projector (p = 0.5).
    """

    def __init__(
        self, in_dim: int, out_dim: int, kind: str = "linear", hidden: int = 200, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"head kind must be one of {KINDS}, got {kind!r}")
        if int(in_dim) < 1 or int(out_dim) < 1 or int(hidden) < 1:
            raise ValueError(
                f"head sizes must be >= 1, got in_dim={in_dim}, out_dim={out_dim}, hidden={hidden}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1), got {dropout}")
        self.spec = {
            "in_dim": int(in_dim),
            "out_dim": int(out_dim),
            "kind": kind,
            "hidden": int(hidden),
            "dropout": float(dropout),
        }
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden),
                nn.Dropout(dropout),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, out_dim),
            )
        else:
            linear = nn.Linear(in_dim, out_dim)
            nn.init.zeros_(linear.bias)
            self.net = nn.Sequential(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), linear)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(pool_feature(x))


class HeadSet(SpecModuleSet):
    """Named heads, created on first use from feature sizes and rebuilt from checkpoints."""

    item_type = Head
    what = "head"

    def ensure(self, name: str, feature: Tensor, out_dim: int, kind: str = "linear", **kwargs: Any) -> Head:
        """The head `name`, built for this (example) feature if it does not exist yet."""
        return self._ensure(
            name, lambda: Head(pool_feature(feature).shape[-1], out_dim, kind, **kwargs), feature.device
        )
