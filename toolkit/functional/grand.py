"""GraNd scores (Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet: Finding Important
Examples Early in Training", NeurIPS 2021, arXiv:2107.07075).

    GraNd(x, y) = E_w ‖∇_w ℓ(f(w, x), y)‖₂

the norm of the per-sample gradient of the training loss over *all* the network's weights, at or
near initialisation, the expectation taken over independent initialisations (the paper averages
10 runs). High GraNd = the sample moves the weights a lot = hard or mislabelled.

`grand_score` computes the exact per-sample norm two ways, which give the same values:

- `strategy="vmap"`: `torch.func.vmap(torch.func.grad(loss))` over the batch through
  `torch.func.functional_call`, in chunks of `chunk_size` samples (memory: one chunk's per-sample
  gradients at a time);
- `strategy="loop"`: one forward and one `torch.autograd.grad` per sample (memory: one gradient).

On a CPU the loop is often faster for conv nets (vmap turns every convolution into a grouped
one); `GraNdScorer(strategy="auto")` times both on the first batch and keeps the faster.

`grand_last_layer_score` is the closed form DeepCore (`deepcore/methods/grand.py`) uses: the
gradient w.r.t. the linear head only. For logits z = W h + b and cross-entropy,
∂ℓ/∂b = g = softmax(z) − onehot(y) and ∂ℓ/∂W = g ⊗ h, so

    ‖[∂ℓ/∂b, ∂ℓ/∂W]‖₂ = ‖g‖₂ · sqrt(1 + ‖h‖₂²).

CONFIRMED: the definition (the paper's eq. for GraNd, the loss being the training cross-entropy
on the logits); DeepCore's last-layer form ‖[g_b, h ⊗ g_b]‖ (read in DeepCore's
`deepcore/methods/grand.py`, the per-sample norm of the concatenated bias and weight gradients).
DECIDED: DeepCore applies its `CrossEntropyLoss` to `softmax(outputs)` (a softmax twice), so its
g_b is not softmax(z) − onehot(y); we follow the paper's loss (cross-entropy on the logits), for
which g_b = softmax(z) − onehot(y) exactly. BatchNorm and dropout are used in eval mode (the
scoring pass sets it): per-sample gradients are then independent of the other samples, and vmap
has no running statistics to update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.models.output import as_model_output, forward_output
from toolkit.types import check_targets

STRATEGIES = ("vmap", "loop")


def grand_last_layer_score(logits: Tensor, embedding: Tensor, target: Tensor) -> Tensor:
    """(B,) norm of the cross-entropy gradient w.r.t. a linear head's weight and bias,
    ‖softmax(z) − onehot(y)‖₂ · sqrt(1 + ‖h‖₂²), for logits z (B, C), penultimate embeddings
    h (B, D) and class targets (B,). Float32 whatever the input dtype."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got {tuple(logits.shape)}")
    if embedding.dim() != 2 or embedding.shape[0] != logits.shape[0]:
        raise ValueError(
            f"embedding must be (B, D) with B = {logits.shape[0]} (the head's input), got {tuple(embedding.shape)}"
        )
    if target is None or tuple(target.shape) != (logits.shape[0],):
        raise ValueError(
            f"grand_last_layer needs (B,) class targets with B = {logits.shape[0]}, "
            f"got {None if target is None else tuple(target.shape)}"
        )
    _check_class_target(target, logits.shape[1], "grand_last_layer")
    g = logits.float().softmax(-1) - F.one_hot(target.long(), logits.shape[1]).float()
    h = torch.linalg.vector_norm(embedding.double(), dim=-1)  # float64: ‖h‖² of a large embedding
    return (torch.linalg.vector_norm(g, dim=-1).double() * torch.hypot(torch.ones_like(h), h)).float()


def grand_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The weights GraNd differentiates: every parameter of `model` that requires grad."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no parameter that requires grad: GraNd is the norm of the gradient "
            "over the trained weights"
        )
    return params


def grand_score(
    model: nn.Module,
    inputs: Any,
    target: Tensor,
    strategy: str = "vmap",
    chunk_size: int | None = 32,
    params: dict[str, Tensor] | None = None,
) -> Tensor:
    """(B,) ‖∇_θ CE(f(θ, x_i), y_i)‖₂ for every sample of the batch, θ = `params` (default: every
    parameter of `model` that requires grad), computed by `strategy` ("vmap" or "loop", see the
    module docstring). The model is used as it is (put it in eval mode first: BatchNorm in train
    mode mixes the samples and cannot be vmapped). Float32 norms."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an integer >= 1 or None (the whole batch), got {chunk_size!r}")
    n = _batch_size(inputs)
    if target is None or tuple(target.shape) != (n,):
        raise ValueError(
            f"GraNd needs (B,) class targets with B = {n}, got {None if target is None else tuple(target.shape)}"
        )
    params = grand_parameters(model) if params is None else params
    if strategy == "loop":
        return _loop(model, inputs, target, params)
    return _vmap(model, inputs, target, params, chunk_size)


def _loop(model: nn.Module, inputs: Any, target: Tensor, params: dict[str, Tensor]) -> Tensor:
    weights = list(params.values())
    out = []
    with torch.enable_grad():
        for i in range(_batch_size(inputs)):
            logits = forward_output(model, _take(inputs, i)).logits
            if i == 0:
                _check_class_target(target, logits.shape[-1], "grand")
            loss = F.cross_entropy(logits.float(), target[i : i + 1].long())
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            sq = sum(
                (g.float().pow(2).sum() for g in grads if g is not None), torch.zeros((), device=loss.device)
            )
            out.append(sq)
    return torch.stack(out).sqrt() if out else torch.zeros(0)


def _vmap(
    model: nn.Module, inputs: Any, target: Tensor, params: dict[str, Tensor], chunk_size: int | None
) -> Tensor:
    from torch.func import functional_call, grad, vmap

    detached = {k: v.detach() for k, v in params.items()}

    def loss_of(p: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        x1 = _unsqueeze(x)
        out = (
            functional_call(model, p, kwargs=x1)
            if isinstance(x1, Mapping)
            else functional_call(model, p, (x1,))
        )
        logits = as_model_output(out).logits
        return F.cross_entropy(logits.float(), y.long().reshape(1))

    def sq_norm(p: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        g = grad(loss_of)(p, x, y)
        return sum(v.float().pow(2).sum() for v in g.values())

    if not _batch_size(inputs):
        return torch.zeros(0)
    with torch.no_grad():  # the class count, to check the targets (an error inside vmap is obscure)
        _check_class_target(target, forward_output(model, _take(inputs, 0)).logits.shape[-1], "grand")
    return vmap(sq_norm, in_dims=(None, 0, 0), chunk_size=chunk_size)(detached, inputs, target).sqrt()


def _check_class_target(target: Tensor, num_classes: int, who: str) -> None:
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"{who} needs class-index targets (integers), got {target.dtype}")
    check_targets(target, num_classes)


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.shape[0]
    if isinstance(x, Mapping):
        return next(iter(x.values())).shape[0]
    raise TypeError(f"unsupported input type {type(x).__name__}: a tensor or a dict of tensors")


def _take(x: Any, i: int) -> Any:
    if isinstance(x, Mapping):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def _unsqueeze(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: v.unsqueeze(0) for k, v in x.items()}
    return x.unsqueeze(0)
