"""Activation-based attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention:
Improving the Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017).

Attention map of a feature map A (B, C, H, W), the paper's F^p_sum, vectorised and
L2-normalised per sample:

    Q = vec(Σ_c |A_c|^p),   Q̂ = Q / ‖Q‖₂            (p = 2 in the paper's experiments)

Loss (the paper's eq. 2), summed over the chosen layer pairs j:

    L_AT = β/2 · Σ_j ‖Q̂_S^j − Q̂_T^j‖_2

with β "set to 10³ divided by the number of elements in the attention map and the batch size for
each layer" (its CIFAR experiments). Per sample this module returns

    mode="paper" (default):  ½ · Σ_j ‖Q̂_S^j − Q̂_T^j‖₂  / (H_j·W_j)
    mode="code":                Σ_j ‖Q̂_S^j − Q̂_T^j‖₂² / (H_j·W_j)

so that the batch mean times a weight β = 1000 is the paper's eq. 2 with its stated β (mode
"paper"), or exactly the official code, `β · Σ_j (at(x) − at(y)).pow(2).mean()` with
`at(x) = normalize(x.pow(2).mean(1).flatten(1))` (szagoruyko/attention-transfer, `--beta 1e+3`),
which CRD/RepDistiller and mdistiller (`FEAT_WEIGHT: 1000`) copy (mode "code").

Where the official code differs from the paper:
- it squares the distance (`pow(2).mean()`, a squared L2 distance per layer), while eq. 2 takes the
  L2 norm itself (attention-transfer issue #34); "paper" follows eq. 2, "code" the code;
- it has no ½ (the `--beta` value multiplies the mean directly), so at equal β the code's term is
  twice as strong; each mode reproduces its own source with the published β = 1000;
- it averages over channels instead of summing: this does not change Q̂ (positive rescaling).

Spatial sizes: the pair's maps must share H×W; when they do not, the student's (unnormalised)
attention map is resized to the teacher's size before normalisation — average-pooled when it is
larger (the pooling mdistiller/CRD apply to the larger map), bilinearly upsampled when it is smaller.

Numerics: computed in float32; the feature map is divided by its per-sample maximum |A| before the
power (Q̂ does not change under that rescaling, and it keeps Σ|A|^p finite for activations of 1e20).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, reduce

MODES = ("paper", "code")
_EPS = 1e-12  # as F.normalize and the official l2_normalize


def _check_feature(feature: Tensor, what: str = "feature map") -> None:
    if not isinstance(feature, Tensor) or feature.dim() != 4:
        shape = tuple(feature.shape) if isinstance(feature, Tensor) else type(feature).__name__
        raise ValueError(
            f"attention transfer needs 4-D (B, C, H, W) feature maps; the {what} has shape {shape} "
            "(tap a convolutional layer, not a linear or pooled one)"
        )


def _check_p(p: float) -> None:
    if not p >= 1:
        raise ValueError(f"the attention exponent p must be >= 1, got {p} (the paper uses p=2)")


def _energy(feature: Tensor, p: float) -> Tensor:
    """Σ_c |A_c|^p as (B, 1, H, W), in float32, of A rescaled by its per-sample max |A|."""
    a = feature.float()
    scale = a.detach().abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    a = a / scale
    e = a.pow(2) if p == 2 else a.abs().pow(p)
    return e.sum(1, keepdim=True)


def _normalise(energy: Tensor) -> Tensor:
    return F.normalize(energy.flatten(1), p=2, dim=1, eps=_EPS)


def attention_map(feature: Tensor, p: float = 2, normalize: bool = True) -> Tensor:
    """The activation-based attention map of `feature` (B, C, H, W) as (B, H·W).

    `normalize=True` (default) gives Q̂ = Q/‖Q‖₂ per sample, Q = vec(Σ_c |A_c|^p); with
    `normalize=False` the raw Q, in float32 (which overflows for activations beyond ~1e19 at p=2).
    """
    _check_feature(feature)
    _check_p(p)
    if not normalize:
        a = feature.float()
        return (a.pow(2) if p == 2 else a.abs().pow(p)).sum(1).flatten(1)
    return _normalise(_energy(feature, p))


def _resized(energy: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(energy.shape[-2:]) == size:
        return energy
    if energy.shape[-2] >= size[0] and energy.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(energy, size)
    return F.interpolate(energy, size=size, mode="bilinear", align_corners=False)


def attention_transfer_loss(
    student_features: Tensor | Sequence[Tensor],
    teacher_features: Tensor | Sequence[Tensor],
    p: float = 2,
    reduction: str = "mean",
    mode: str = "paper",
) -> Tensor:
    """Attention-transfer loss over layer pairs (see the module docstring for the formula).

    Args:
        student_features: one (B, C_s, H, W) feature map or a sequence of them.
        teacher_features: the matching teacher maps (same count, same batch; channels may differ).
        p: exponent of the attention map Σ_c |A_c|^p (p >= 1; 2 in the paper).
        reduction: "mean" over the batch, "sum", or "none" for the (B,) per-sample losses.
        mode: "paper" (½·L2 distance, eq. 2) or "code" (squared L2 distance, official code).
    """
    check_reduction(reduction)
    _check_p(p)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(student_features, Tensor):
        student_features = [student_features]
    if isinstance(teacher_features, Tensor):
        teacher_features = [teacher_features]
    student_features, teacher_features = list(student_features), list(teacher_features)
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"attention transfer pairs student and teacher maps one to one, got {len(student_features)} "
            f"student and {len(teacher_features)} teacher maps"
        )
    if not student_features:
        raise ValueError("attention transfer needs at least one pair of feature maps")
    total = None
    for j, (s, t) in enumerate(zip(student_features, teacher_features)):
        _check_feature(s, f"student map of pair {j}")
        _check_feature(t, f"teacher map of pair {j}")
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"pair {j}: student batch {s.shape[0]} and teacher batch {t.shape[0]} differ")
        size = (t.shape[-2], t.shape[-1])
        q_s = _normalise(_resized(_energy(s, p), size))
        q_t = _normalise(_energy(t, p))
        d = q_s - q_t
        n = size[0] * size[1]
        if mode == "paper":
            term = 0.5 * torch.linalg.vector_norm(d, ord=2, dim=1) / n
        else:
            term = d.pow(2).sum(1) / n
        total = term if total is None else total + term
    return reduce(total, reduction)
