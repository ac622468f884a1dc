"""Hessian Alignment for domain generalisation: the HGP and Hutchinson penalties.

Hemati, Zhang, Estiri, Chen, "Understanding Hessian Alignment for Domain Generalization",
ICCV 2023, arXiv:2308.11778. Only the classifier head's parameters θ_h are involved. For each
training domain e with risk R_e (mean cross-entropy over its samples in the batch),

    g_e = ∇_{θ_h} R_e,      ḡ = ∇_{θ_h} R̄ = (1/E) Σ_e g_e,      R̄ = (1/E) Σ_e R_e,

    HGP:        P = (1/E) Σ_e [ α ‖H_e g_e − sg(H̄ ḡ)‖² + β ‖g_e − sg(ḡ)‖² ]
    Hutchinson: P = (1/E) Σ_e [ α ‖diaĝ(H_e) − sg(diaĝ(H̄))‖² + β ‖g_e − sg(ḡ)‖² ]

with sg the stop-gradient, H_e the head Hessian of R_e, and diaĝ Hutchinson's estimate
(1/m) Σ_j z_j ⊙ H z_j over Rademacher z_j. The training loss is R̄ + P (Adam in the paper).

CONFIRMED from the official code (huawei-noah/Federated-Learning,
`HessianAlignment/domainbed/algorithms.py`, classes `HGP` and `Hutchinson`; defaults from
`domainbed/hparams_registry.py`): the penalties above with the mean over domains of the
per-domain sums, the stop-gradient on the mean quantities, the gradients taken with respect to
the classifier's parameters only (the featurizer still receives the penalty's gradient through
the features), HGP's product written as H g = ‖g‖ · ∇‖g‖ (since ∇‖g‖ = H g / ‖g‖),
Hutchinson's diagonal with 300 probes, and the defaults HGP α = 1e-4, β = 5e-3; Hutchinson
α = 1e-3, β = 5e-3 (the registry's Hutchinson search ranges, 10^U(1,4) and 10^U(2,6), look
mis-specified and are not used).

Decided here:
- H g is computed as ∇(½‖g‖²), the same function of θ as ‖g‖ · ∇‖g‖ (equal values and
  gradients) without the code's 1e-16 offset (added there to keep ∇‖g‖ defined at g = 0).
- One set of Rademacher probes is shared by every domain in a step, so diaĝ(H̄) is exactly the
  mean of the per-domain estimates (the official code draws fresh probes for each domain and
  for the mean). Same expectation; the estimator's noise largely cancels in the differences, no
  extra products are needed for the mean, and a duplicated domain gives exactly zero penalty.
- The mean quantities (ḡ, H̄ḡ) are taken as means of the per-domain ones (R̄ is the mean of
  the R_e, so ∇R̄ = mean g_e, and H̄ḡ = ∇(½‖ḡ‖²) with ḡ = mean g_e).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_nonnegative
from toolkit.functional.hessian import _params, flatten, hutchinson_diagonal, rademacher

METHODS = ("hgp", "hutchinson")
DEFAULTS = {"hgp": {"alpha": 1e-4, "beta": 5e-3}, "hutchinson": {"alpha": 1e-3, "beta": 5e-3}}


def domain_risks(logits: Tensor, target: Tensor, domains: Tensor) -> tuple[list[Tensor], Tensor]:
    """Mean cross-entropy (float32, or float64 logits kept) of each domain present in the batch, in increasing domain-id
    order; returns (risks, the domain ids present)."""
    if domains.shape != logits.shape[:1]:
        raise ValueError(
            f"domains must hold one domain id per sample: got {tuple(domains.shape)} for {logits.shape[0]} samples"
        )
    ids = torch.unique(domains)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    risks = [F.cross_entropy(logits[domains == e], target[domains == e]) for e in ids]
    return risks, ids


def hessian_gradient_product(
    grads: Sequence[Tensor], params: Sequence[Tensor], create_graph: bool = True
) -> Tensor:
    """H g as a flat vector, from g = ∇_θ R given with its graph (create_graph=True):
    ∇_θ(½‖g‖²) = H g (= ‖g‖ · ∇_θ‖g‖, the paper's form)."""
    params = _params(params)
    half_sq = 0.5 * sum(g.pow(2).sum() for g in grads)
    if not half_sq.requires_grad:  # R linear in θ: H = 0
        return torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    hg = torch.autograd.grad(half_sq, params, create_graph=create_graph, retain_graph=True, allow_unused=True)
    return flatten([torch.zeros_like(p) if h is None else h for p, h in zip(params, hg)])


def _check(domain_losses: Sequence[Tensor], alpha: float, beta: float) -> list[Tensor]:
    losses = list(domain_losses)
    if not losses:
        raise ValueError("domain_losses is empty: give one risk (a scalar loss) per training domain")
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)
    return losses


def hessian_alignment_parts(
    domain_losses: Sequence[Tensor],
    params: Sequence[Tensor],
    method: str = "hgp",
    num_probes: int = 300,
    generator: torch.Generator | None = None,
    probes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(Hessian part, gradient part), each (1/E) Σ_e ‖·_e − sg(mean)‖², differentiable.

    The Hessian part compares H_e g_e ("hgp") or Hutchinson's diag(H_e) ("hutchinson", with
    `num_probes` Rademacher probes from `generator`, or the given `probes` (m, P), shared by all
    domains) across domains; the gradient part compares g_e.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    losses = _check(domain_losses, 0.0, 0.0)
    params = _params(params)
    grads = []
    for loss in losses:
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("each domain loss must be a scalar tensor computed with gradients enabled")
        g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        if all(gi is None for gi in g):
            raise ValueError(
                "the domain losses do not depend on params: pass the parameters of the classifier head that "
                "produces the logits"
            )
        grads.append([torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)])
    flat = [flatten(g) for g in grads]
    mean_g = torch.stack(flat).mean(0)
    grad_part = torch.stack([(f - mean_g.detach()).pow(2).sum() for f in flat]).mean()
    if method == "hgp":
        hess = [hessian_gradient_product(g, params) for g in grads]
        mean_grads = [torch.stack(gs).mean(0) for gs in zip(*grads)]
        mean_h = hessian_gradient_product(mean_grads, params, create_graph=False)
    else:
        dim = mean_g.numel()
        if probes is None:
            if int(num_probes) != num_probes or num_probes < 1:
                raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
            probes = rademacher((int(num_probes), dim), generator)
        hess = [hutchinson_diagonal(g, params, probes=probes) for g in grads]
        mean_h = torch.stack(hess).mean(0)
    hess_part = torch.stack([(h - mean_h.detach()).pow(2).sum() for h in hess]).mean()
    return hess_part, grad_part


def hgp_penalty(
    domain_losses: Sequence[Tensor], params: Sequence[Tensor], alpha: float = 1e-4, beta: float = 5e-3
) -> Tensor:
    """The HGP penalty (1/E) Σ_e [α‖H_e g_e − sg(H̄ḡ)‖² + β‖g_e − sg(ḡ)‖²] over the head `params`."""
    _check(domain_losses, alpha, beta)
    hess, grad = hessian_alignment_parts(domain_losses, params, "hgp")
    return alpha * hess + beta * grad


def hutchinson_penalty(
    domain_losses: Sequence[Tensor],
    params: Sequence[Tensor],
    alpha: float = 1e-3,
    beta: float = 5e-3,
    num_probes: int = 300,
    generator: torch.Generator | None = None,
    probes: Tensor | None = None,
) -> Tensor:
    """The Hutchinson penalty (1/E) Σ_e [α‖diaĝH_e − sg(diaĝH̄)‖² + β‖g_e − sg(ḡ)‖²]."""
    _check(domain_losses, alpha, beta)
    hess, grad = hessian_alignment_parts(domain_losses, params, "hutchinson", num_probes, generator, probes)
    return alpha * hess + beta * grad


__all__ = [
    "domain_risks",
    "hessian_alignment_parts",
    "hessian_gradient_product",
    "hgp_penalty",
    "hutchinson_penalty",
]
