"""Curvature of a loss from Hessian-vector products: Hutchinson's trace and diagonal, Lanczos.

Everything here works on any scalar loss and any list of parameters (a whole network, one layer,
a classifier head) through double backward, never forming the Hessian:

- `hvp(loss, params, v)`: H v = ∇_θ (∇_θ L · v) (Pearlmutter's trick), flat (P,) vectors;
  `HessianOperator(loss, params)` keeps the first gradient (create_graph) for repeated products.
- `hutchinson_trace(op)`: tr(H) ≈ (1/m) Σ_j z_jᵀ H z_j with Rademacher z_j (Hutchinson 1989;
  PyHessian, Yao et al. 2020, `hessian.trace`). Unbiased; exact for every probe when H is
  diagonal (zᵀHz = Σ_i H_ii z_i² = tr H).
- `hutchinson_diagonal(grads, params)`: diag(H) ≈ (1/m) Σ_j z_j ⊙ H z_j (Bekas et al. 2007),
  differentiable (create_graph) so it can enter a loss, as the Hessian Alignment penalty does.
- `lanczos_top_eigenvalues(op, k)`: the k largest (algebraic) eigenvalues of the symmetric H from
  the Ritz values of an m-step Lanczos tridiagonalisation with full re-orthogonalisation in
  float64 (a new random start, orthogonal to the basis, when the Krylov space becomes invariant:
  with m = P the whole spectrum is exact, repeated eigenvalues included).

Used by the `hessian_monitor` callback (Sagun et al., "Empirical Analysis of the Hessian of
Over-Parametrized Neural Networks", ICLR 2018 workshop, arXiv:1706.04454: a bulk near zero plus a
few outliers, whose top eigenvalues Lanczos finds first; Wu & Su, "The Implicit Regularization of
Dynamical Stability in Stochastic Gradient Descent", ICML 2023, arXiv:2305.17490: a minimum
linearly stable for SGD has tr(H) ≤ 2/η, for GD λ_max(H) ≤ 2/η).

Decided here (the papers give no code for these estimators): Rademacher probes (as PyHessian and
the Hessian Alignment code), drawn from a caller-supplied `torch.Generator` (or given explicitly)
so results are reproducible without touching the global random state; Lanczos starts from a
Gaussian vector from the same generator; eigenvalues are returned in float64, largest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def _params(params: Sequence[Tensor] | Tensor) -> list[Tensor]:
    params = [params] if isinstance(params, Tensor) else list(params)
    if not params:
        raise ValueError("params is empty: pass the parameters to differentiate with respect to")
    for p in params:
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(
                "every parameter must be a tensor with requires_grad=True (filter with `p.requires_grad`)"
            )
    return params


def _check_loss(loss: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss must be a scalar tensor (reduce it to a mean first), got {shape}")
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require grad: compute it with gradients enabled (not under torch.no_grad or "
            "torch.inference_mode) from parameters that require grad"
        )


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped like `like`."""
    out, start = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[start : start + n].view_as(t))
        start += n
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries but the parameters have {start}")
    return out


def gradients(loss: Tensor, params: Sequence[Tensor], create_graph: bool = True) -> list[Tensor]:
    """∇_θ loss for each parameter (zeros for parameters the loss does not use)."""
    _check_loss(loss)
    params = _params(params)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _grad_vector_product(
    grads: Sequence[Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor], create_graph: bool
) -> list[Tensor]:
    connected = [i for i, g in enumerate(grads) if g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if not connected:  # the loss is linear in the parameters: H = 0
        return out
    hv = torch.autograd.grad(
        [grads[i] for i in connected],
        params,
        grad_outputs=[vectors[i] for i in connected],
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
    )
    return [o if h is None else h for o, h in zip(out, hv)]


def hvp(
    loss: Tensor | None,
    params: Sequence[Tensor] | Tensor,
    vector: Tensor | Sequence[Tensor],
    grads: Sequence[Tensor] | None = None,
    create_graph: bool = False,
) -> Tensor:
    """Hessian-vector product H v of `loss` with respect to `params`, as a flat (P,) vector.

    `vector` is flat (P,) or a list shaped like `params`. Pass `grads` (from `gradients(loss,
    params, create_graph=True)`) to reuse the first backward over several products (then `loss`
    may be None). `create_graph=True` keeps the product differentiable.
    """
    params = _params(params)
    if grads is None:
        if loss is None:
            raise ValueError("give the loss, or its gradients computed with create_graph=True")
        grads = gradients(loss, params, create_graph=True)
    if isinstance(vector, Tensor):
        total = sum(p.numel() for p in params)
        if vector.dim() != 1 or vector.numel() != total:
            raise ValueError(
                f"vector must be flat with {total} entries (one per parameter), got {tuple(vector.shape)}"
            )
        vectors = unflatten(vector.to(params[0].dtype), params)
    else:
        vectors = list(vector)
        if len(vectors) != len(params) or any(v.shape != p.shape for v, p in zip(vectors, params)):
            raise ValueError("vector given as a list must match the parameters' shapes one to one")
    return flatten(_grad_vector_product(list(grads), params, vectors, create_graph))


class HessianOperator:
    """v ↦ H v for the Hessian of `loss` with respect to `params` (flat vectors).

    The gradient is computed once with `create_graph=True`; each call is one extra backward.
    `dim` is the number of parameters.
    """

    def __init__(self, loss: Tensor, params: Sequence[Tensor] | Tensor) -> None:
        self.params = _params(params)
        self.grads = gradients(loss, self.params, create_graph=True)
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def __call__(self, vector: Tensor) -> Tensor:
        return hvp(None, self.params, vector, grads=self.grads)


def rademacher(
    shape: tuple[int, ...], generator: torch.Generator | None = None, dtype=torch.float32, device=None
) -> Tensor:
    """Independent ±1 entries with probability ½ each (drawn on CPU from `generator`)."""
    z = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64)
    return (2 * z - 1).to(dtype=dtype, device=device)


def _operator(op: Callable[[Tensor], Tensor], dim: int | None) -> tuple[int, torch.dtype, torch.device]:
    """(dimension, dtype, device) of the vectors `op` takes (a plain callable: float64 on CPU)."""
    dim = getattr(op, "dim", None) if dim is None else dim
    if dim is None or int(dim) != dim or dim < 1:
        raise ValueError(
            f"dim must be the number of parameters (>= 1), got {dim!r}: pass dim= for a plain callable "
            "or use a HessianOperator"
        )
    return int(dim), getattr(op, "dtype", torch.float64), getattr(op, "device", torch.device("cpu"))


def hutchinson_trace(
    op: Callable[[Tensor], Tensor],
    num_probes: int = 100,
    generator: torch.Generator | None = None,
    dim: int | None = None,
    probes: Tensor | None = None,
    return_samples: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Hutchinson's estimate of tr(H) = E_z[zᵀ H z] over Rademacher z.

    `op` maps a flat vector to H v (a `HessianOperator`, or any callable with `dim=`); `probes`
    (m, P) replaces the random draws. Returns the mean of the m samples zᵀHz (float64), and with
    `return_samples=True` also the samples (their standard error is `samples.std() / √m`).
    """
    dim, dtype, device = _operator(op, dim)
    if probes is None:
        if int(num_probes) != num_probes or num_probes < 1:
            raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
        probes = rademacher((int(num_probes), dim), generator)
    elif probes.dim() != 2 or probes.shape[1] != dim:
        raise ValueError(f"probes must be (m, {dim}), got {tuple(probes.shape)}")
    samples = []
    for z in probes:
        z = z.to(dtype=dtype, device=device)
        samples.append(torch.dot(z.double(), op(z).double()))
    samples_t = torch.stack(samples).cpu()
    est = samples_t.mean()
    return (est, samples_t) if return_samples else est


def hutchinson_diagonal(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    num_probes: int = 100,
    generator: torch.Generator | None = None,
    probes: Tensor | None = None,
    create_graph: bool = True,
    max_batched_elements: int = 2**24,
) -> Tensor:
    """Hutchinson-style estimate of diag(H) = E_z[z ⊙ H z], flat (P,), from the gradients
    `grads` of the loss (computed with `create_graph=True`) with respect to `params`.

    Differentiable when `create_graph=True` (its gradient is that of the estimate). `probes`
    (m, P) replaces the Rademacher draws. Probes are applied in batches of up to
    `max_batched_elements // P` per backward (`is_grads_batched`), one at a time where an
    operation cannot be batched.
    """
    params = _params(params)
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    dim = sum(p.numel() for p in params)
    if probes is None:
        if int(num_probes) != num_probes or num_probes < 1:
            raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
        probes = rademacher((int(num_probes), dim), generator)
    elif probes.dim() != 2 or probes.shape[1] != dim:
        raise ValueError(f"probes must be (m, {dim}), got {tuple(probes.shape)}")
    probes = probes.to(dtype=params[0].dtype, device=params[0].device)
    total = torch.zeros(dim, dtype=params[0].dtype, device=params[0].device)
    connected = [i for i, g in enumerate(grads) if g.requires_grad]
    if not connected:  # the loss is linear in the parameters: H = 0
        return total
    chunk = max(1, min(probes.shape[0], max_batched_elements // dim))
    for start in range(0, probes.shape[0], chunk):
        z = probes[start : start + chunk]
        try:  # several probes per backward (vmap over the grad_outputs)
            hz = _batched_products(grads, params, connected, z, create_graph)
        except RuntimeError:  # an operation without a batching rule: one probe at a time
            hz = torch.stack(
                [flatten(_grad_vector_product(grads, params, unflatten(v, params), create_graph)) for v in z]
            )
        total = total + (z * hz).sum(0)
    return total / probes.shape[0]


def _batched_products(
    grads: Sequence[Tensor], params: Sequence[Tensor], connected: list[int], z: Tensor, create_graph: bool
) -> Tensor:
    """H z_j for every row z_j of z (m, P), as (m, P), in one batched backward."""
    m, parts, start = z.shape[0], [], 0
    for p in params:
        parts.append(z[:, start : start + p.numel()].reshape(m, *p.shape))
        start += p.numel()
    hz = torch.autograd.grad(
        [grads[i] for i in connected],
        params,
        grad_outputs=[parts[i] for i in connected],
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=True,
    )
    return torch.cat(
        [(z.new_zeros(m, p.numel()) if h is None else h.reshape(m, -1)) for p, h in zip(params, hz)], dim=1
    )


def lanczos_top_eigenvalues(
    op: Callable[[Tensor], Tensor],
    k: int = 1,
    num_iters: int | None = None,
    generator: torch.Generator | None = None,
    dim: int | None = None,
    tol: float = 1e-10,
) -> Tensor:
    """The `k` largest eigenvalues of the symmetric operator `op` (float64, largest first), from
    the Ritz values of `num_iters` Lanczos steps (default min(P, max(20, 2k))) with full
    re-orthogonalisation. Extreme eigenvalues converge first; `num_iters = P` gives them exactly.
    """
    dim, dtype, device = _operator(op, dim)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > dim:
        raise ValueError(f"k={k} eigenvalues asked for an operator of dimension {dim}")
    m = min(dim, max(20, 2 * k)) if num_iters is None else num_iters
    if int(m) != m or m < k:
        raise ValueError(f"num_iters must be an integer >= k={k}, got {num_iters!r}")
    m = min(int(m), dim)

    def apply(v: Tensor) -> Tensor:
        return op(v.to(dtype=dtype, device=device)).to(torch.float64).cpu()

    def fresh(basis: list[Tensor]) -> Tensor | None:
        for _ in range(3):  # a random vector orthogonal to the basis (twice Gram-Schmidt)
            v = torch.randn(dim, generator=generator, dtype=torch.float64)
            for _ in range(2):
                for b in basis:
                    v = v - torch.dot(b, v) * b
            n = v.norm()
            if n > 1e-8:
                return v / n
        return None

    basis: list[Tensor] = []
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    v = fresh(basis)
    beta = torch.zeros((), dtype=torch.float64)
    v_prev = torch.zeros(dim, dtype=torch.float64)
    scale = torch.zeros((), dtype=torch.float64)
    for j in range(m):
        basis.append(v)
        w = apply(v)
        alpha = torch.dot(w, v)
        w = w - alpha * v - beta * v_prev
        for _ in range(2):  # full re-orthogonalisation
            for b in basis:
                w = w - torch.dot(b, w) * b
        alphas.append(alpha)
        scale = torch.maximum(scale, alpha.abs() + beta.abs())
        if j == m - 1:
            break
        beta = w.norm()
        if beta <= tol * max(1.0, float(scale)):  # invariant subspace: restart orthogonally
            nxt = fresh(basis)
            if nxt is None:
                break
            beta = torch.zeros((), dtype=torch.float64)
            v_prev, v = v, nxt
        else:
            v_prev, v = v, w / beta
        betas.append(beta)
    n = len(alphas)
    t = torch.diag(torch.stack(alphas))
    if n > 1:
        off = torch.stack(betas[: n - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t).flip(0)
    return ritz[:k]


__all__ = [
    "HessianOperator",
    "flatten",
    "gradients",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hvp",
    "lanczos_top_eigenvalues",
    "rademacher",
    "unflatten",
]
