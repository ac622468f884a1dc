"""Weight compander (Cakaj, Mehnert & Yang, "Weight Compander: A Simple Weight Reparameterization
for Regularization", arXiv 2306.16993, 2023): each weight is used through an elementwise nonlinear
function w = f(v) of a trained latent v.

UNCONFIRMED FUNCTION. The paper's equation could not be read: only its abstract and author page
are public in the material searched (arXiv abstract pages, the paper's opening, the authors'
publication page; no code release). What they establish: f is applied to each weight, restricts
the magnitude of the weights (bounded), forces them away from zero (expands small values), and
its hyper-parameters may be learned with the network. This module ships the closest simple
function with those properties, NOT the paper's formula:

    f(v) = a · tanh(s · v / a)          (odd; |f| < a; f'(0) = s, an expander near 0 when s > 1)
    f⁻¹(w) = (a / s) · atanh(w / a)     (|w| < a)

a is the bound, s the slope at zero. Used as a weight parametrization, a latent initialised to
f⁻¹(w₀) keeps the network's function at initialisation (decided here; the paper's initialisation
is not known).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(bound: Tensor | float, slope: Tensor | float) -> None:
    for name, value in (("bound", bound), ("slope", slope)):
        if isinstance(value, Tensor) and value.device.type != "cpu":
            continue  # checked on CPU only: on accelerators this would sync every forward
        if not bool(torch.as_tensor(value).gt(0).all()):
            raise ValueError(f"{name} must be > 0, got {value}")


def compand(v: Tensor, bound: Tensor | float, slope: Tensor | float) -> Tensor:
    """f(v) = a·tanh(s·v/a), elementwise (a = bound, s = slope; tensors broadcast, differentiable
    in v, a and s). UNCONFIRMED stand-in for the paper's function (see the module docstring)."""
    _check(bound, slope)
    return bound * torch.tanh(slope * v / bound)


def compand_inverse(w: Tensor, bound: Tensor | float, slope: Tensor | float) -> Tensor:
    """f⁻¹(w) = (a/s)·atanh(w/a): the latent whose companded value is w; needs |w| < a."""
    _check(bound, slope)
    ratio = w / bound
    if bool((ratio.abs() >= 1).any()):
        raise ValueError(
            f"weights reach {float(w.abs().max()):.4g} but the compander is bounded by {float(torch.as_tensor(bound).min()):.4g}: "
            "|w| must stay below the bound (raise bound or bound_scale)"
        )
    return bound / slope * torch.atanh(ratio)
