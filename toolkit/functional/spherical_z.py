"""The Z-loss of the spherical family (de Brébisson & Vincent, "The Z-loss: a shift and scale
invariant classification loss belonging to the Spherical Family", arXiv 1604.08859, 2016).

For pre-activations (logits) o ∈ R^D and target class c:

    μ = (1/D)·Σ_k o_k,   σ² = (1/D)·Σ_k o_k² − μ²,   z_c = (o_c − μ)/σ
    L_Z(o, c) = (1/a)·softplus(a·(b − z_c)) = (1/a)·log(1 + exp(a·(b − z_c)))

a > 0 sets the sharpness of the softplus and b its location (a margin on the standardised target
score). The loss depends on o only through (o_c, Σ_k o_k, Σ_k o_k²): it belongs to the spherical
family of Vincent et al., whose exact gradient through a D-way output layer can be computed in
O(d²) independently of D (the factored output layer is not implemented here: this module only
computes the loss from ordinary logits, as the toolkit's classifiers need).

CONFIRMED from the paper's text (abstract and the stored summaries that restate its definition):
the standardisation with the population mean and variance (1/D), the softplus form with the two
hyper-parameters a (sharpness) and b (location), and the invariance L_Z(α·o + β, c) = L_Z(o, c)
for α > 0 and any β. The paper tunes a and b per task; no universal default could be read, so
a = 1, b = 1 here are OUR defaults (the reference notes list b in [1, 10] as a search range).

Facts of the definition the tests check:
- shift and (positive) scale invariance; a negative scale flips the sign of z;
- z_c ∈ [−√(D−1), √(D−1)] (the bound is reached by a one-hot o), so the loss is bounded and
  finite for any logits; b ≥ √(D−1) can never be passed (with D = 10 the bound is 3);
- a → ∞ gives the hinge max(0, b − z_c); for b − z_c ≫ 1/a the loss is ≈ b − z_c;
- constant logits (σ = 0) have z_c = 0 (no preference), which gives softplus(a·b)/a.

Numerics: the row maximum is subtracted first (exact zeros for equal entries), σ² is computed as
the mean of squared deviations (no cancellation for logits of 1e4),
in float32 for float16/bfloat16 inputs (float64 inputs stay float64); rows with σ = 0 get z = 0
and a zero gradient (the z-score has no derivative there) instead of 0/0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_class_logits, check_reduction, reduce


def check_spherical_z(a: float, b: float) -> None:
    if not a > 0 or not math.isfinite(a):
        raise ValueError(f"a (the softplus sharpness) must be a finite number > 0, got {a}; e.g. a=1.0")
    if not math.isfinite(b):
        raise ValueError(f"b (the margin on the standardised target score) must be finite, got {b}")


def _compute_dtype(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def z_scores(logits: Tensor) -> Tensor:
    """(o − μ)/σ along the last dimension (population statistics); 0 for constant rows."""
    o = _compute_dtype(logits)
    # shift by the (detached) row maximum first: exact zeros for equal entries, so a constant row
    # gives z = 0 and not rounding noise of its mean; the loss is shift invariant, so this changes
    # neither its value nor its gradient
    o = o - o.detach().amax(-1, keepdim=True)
    centred = o - o.mean(-1, keepdim=True)
    var = centred.pow(2).mean(-1, keepdim=True)
    spread = var > 0
    sigma = torch.where(spread, var, torch.ones_like(var)).sqrt()  # no 0/0 in the backward pass
    return torch.where(spread, centred / sigma, torch.zeros_like(centred))


def spherical_z_loss(
    logits: Tensor, target: Tensor, a: float = 1.0, b: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """Z-loss (1/a)·softplus(a·(b − z_y)) of (B, C) logits against (B,) class indices.

    `reduction="none"` returns the (B,) per-sample losses.
    """
    check_reduction(reduction)
    check_spherical_z(a, b)
    check_class_logits(logits, target, "spherical_z")
    z_target = z_scores(logits).gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    per_sample = F.softplus(a * (b - z_target)) / a
    return reduce(per_sample, reduction)
