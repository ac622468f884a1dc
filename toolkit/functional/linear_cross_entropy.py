"""Cross-entropy from hidden states and the head weight, without the (N, V) logit matrix.

Wijmans, Huval, Hertzberg, Koltun & Krähenbühl, "Cut Your Losses in Large-Vocabulary Language
Models" (ICLR 2025, arXiv 2411.09009); official code apple/ml-cross-entropy (PyPI
`cut-cross-entropy`).

With hidden states h_i ∈ R^D (N tokens), the head weight W ∈ R^{V×D}, an optional bias b and
targets y_i, the logits are z_iv = cap(W_v·h_i + b_v), cap(x) = s·tanh(x/s) when a softcap s is
given (Gemma 2) and the identity otherwise, and per token

    ℓ_i = lse_i − (1 − ε)·z_{i,y_i} − (ε/V)·Σ_v z_iv + λ·lse_i²,   lse_i = log Σ_v exp z_iv

(ε the label smoothing, exactly `F.cross_entropy(..., label_smoothing=ε)`; λ the PaLM z-loss
coefficient, λ·log²Z). Tokens whose target is `ignore_index` give 0 and leave the mean.

How it avoids the logits: a `torch.autograd.Function` walks (token chunk × vocabulary chunk)
tiles. The forward keeps, per token, a running log-sum-exp over the vocabulary tiles (and the
running logit sum when ε > 0), and takes the target logit from an indexed dot product h_i·W_{y_i};
it saves only the inputs and lse (N floats). The backward recomputes each tile's logits and
turns them into the gradient tile in place,

    ∂ℓ_i/∂z_iv = softmax_iv·(1 + 2λ·lse_i) − (1 − ε)·[v = y_i] − ε/V,    times 1 − (z_iv/s)² under a softcap,

then accumulates dh += G·W_tile, dW_tile += Gᵀ·h, db_tile += Σ_i G (vocabulary outer, tokens
inner, so each dW tile is written once). No temporary is larger than one tile (token_chunk ×
vocab_chunk floats) apart from the fp32 dh accumulator (N × D) and the gradients themselves.
Everything is computed in float32 (bf16/fp16 inputs are upcast tile by tile, autocast is turned
off inside), gradients are returned in the inputs' dtypes.

Two backward paths (`backward=`). "recompute" is the design above (the paper's): 4 passes of
N·V·D multiply-adds (forward logits, recomputed logits, dh, dW) against the materialised
baseline's 3, so on a CPU, where the matmuls are the whole cost, it is about 4/3 of the
baseline's time. "in_forward" (for "mean"/"sum" only) computes the gradients already in the
forward pass, over token chunks of full vocabulary rows (`in_forward_rows`: 64 MB, at least 256
rows), and keeps dh, dW, db until the backward scales them by the incoming gradient: 3 passes,
the baseline's count, with memory still bounded by one chunk plus the gradients. "auto" (default)
takes "in_forward" when a scalar reduction is asked for while autograd records and an input
needs a gradient, else "recompute" (per-token losses, no_grad evaluation).

Confirmed from the official code (`linear_cross_entropy.py`, `cce.py`, `utils.py`,
`torch_compile.py`, `tests/test_cce_loss_backward.py` of apple/ml-cross-entropy):
- the result equals `F.cross_entropy((e @ c.T + bias), targets)` on the materialised logits, with
  the softcap applied as `tanh(logits / softcap) * softcap` before the cross-entropy;
- ignored tokens are dropped before the kernels (`_build_flat_valids`), and `reduction="none"`
  gives 0 at them;
- the z-loss is computed from the returned log-sum-exp, `lse²` over the non-ignored tokens
  (`compute_z_loss`); here it is the coefficient λ inside the loss, so its gradient is part of
  the same pass;
- gradient filtering: the backward may skip tiles whose softmax entries are all below ε_f
  (`filter_eps`; their "auto" is `finfo(dtype).eps / 32`). Here it is off by default (exact
  gradients) and applies only to tiles holding no target and only without label smoothing;
- the test tolerances: the gradient error against an fp32 reference may exceed the error of
  the same computation on materialised logits in the input dtype by at most 1e-2 in bf16
  (1e-3 in fp16); values in fp32 to 1e-5.
Decided here (the official code is silent or differs): label smoothing (not in
`cut-cross-entropy`) follows `F.cross_entropy`'s definition; the mean over zero valid tokens is
0, not NaN; the vocabulary is not re-sorted before the backward (the official kernel sorts it
so that filtered tiles cluster; with filtering off it changes nothing); the tile loop is plain
PyTorch on any device.

`impl="auto"` calls the package's Triton kernel (`cut_cross_entropy.linear_cross_entropy`) when
the inputs are on a CUDA device, Triton and the package import, and the installed version
supports the options asked for (a bias, the z-loss through `return_lse`; never label smoothing);
everywhere else it runs the chunked PyTorch path. `impl="torch"` forces the PyTorch path,
`impl="cce"` the kernel (an error says why when it cannot be used).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from toolkit.functional._reduce import check_nonnegative, check_reduction

IMPLS = ("auto", "torch", "cce")
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 2048
BACKWARDS = ("auto", "recompute", "in_forward")
# The in-forward path's token chunk of full vocabulary rows: IN_FORWARD_ELEMENTS floats (64 MB),
# but at least IN_FORWARD_MIN_ROWS rows (so the dW update, whose inner dimension is the row count,
# stays an efficient matmul) and at most token_chunk: 512 rows of a 32k vocabulary, 256 of a 128k
# one (128 MB), i.e. 1/32 of the logits of 8k tokens.
IN_FORWARD_ELEMENTS = 1 << 24
IN_FORWARD_MIN_ROWS = 256


def in_forward_rows(vocab: int, token_chunk: int) -> int:
    """Tokens per chunk on the in-forward path (see IN_FORWARD_ELEMENTS)."""
    return max(1, min(token_chunk, max(IN_FORWARD_MIN_ROWS, IN_FORWARD_ELEMENTS // vocab)))


# -- argument checks -------------------------------------------------------------------------------


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
) -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"the head weight must be (V, D) (nn.Linear(D, V).weight, e.g. lm_head.weight), got shape "
            f"{tuple(weight.shape)}"
        )
    if hidden.dim() < 1:
        raise ValueError("hidden states must be (..., D), got a scalar")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden/head dimension mismatch: the hidden states have size {hidden.shape[-1]} in their last "
            f"dimension but the head weight is (V, D) = {tuple(weight.shape)}, so D = {dim}. Pass the "
            "pre-logit hidden states (the input of the output layer, not the logits) and the head's weight "
            "as (vocabulary, hidden) — transpose it if it is stored (D, V)"
        )
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"targets must be integer class indices, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have the hidden states' leading shape {tuple(hidden.shape[:-1])}, got "
            f"{tuple(target.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must be (V,) = ({vocab},), got {tuple(bias.shape)}")
    if target.device.type == "cpu" and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            v = target[bad]
            raise ValueError(
                f"targets must be token ids in [0, {vocab}) or ignore_index={ignore_index}; found values in "
                f"[{int(v.min())}, {int(v.max())}]"
            )


def _check_options(
    label_smoothing: float,
    softcap: float | None,
    z_loss: float,
    reduction: str,
    token_chunk: int,
    vocab_chunk: int,
    filter_eps: float | None,
    impl: str,
) -> None:
    check_reduction(reduction)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (e.g. 30.0 as Gemma 2) or None for no capping, got {softcap}")
    check_nonnegative("z_loss", z_loss)
    for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if filter_eps is not None:
        check_nonnegative("filter_eps", filter_eps)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# -- the chunked PyTorch path -------------------------------------------------------------------------


def _tile_logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """fp32 logits of one tile: h (n, D) fp32 against w (v, D), plus bias."""
    z = torch.mm(h, w.float().t())
    if b is not None:
        z.add_(b.float())
    return z


def _target_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, softcap: float | None, chunk: int
) -> Tensor:
    """z_{i,y_i} by an indexed dot product (the official "indexed matmul"), chunked over tokens."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for n0 in range(0, hidden.shape[0], chunk):
        y = target[n0 : n0 + chunk]
        z = (hidden[n0 : n0 + chunk].float() * weight[y].float()).sum(-1)
        if bias is not None:
            z = z + bias[y].float()
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        out[n0 : n0 + chunk] = z
    return out


def _grad_from_softmax_(
    p: Tensor,
    t: Tensor | None,
    coef: Tensor,
    hit: Tensor,
    smooth: Tensor | None,
    rows: Tensor,
    cols: Tensor,
) -> Tensor:
    """In place: a softmax tile p (n, v) becomes ∂loss/∂(pre-cap logits) of the tile.

    coef (n,) multiplies the softmax (grad_out·(1 + 2λ·lse)), smooth (n,) is subtracted everywhere
    (grad_out·ε/V), hit (n,) at the targets (row `rows`, column `cols`: grad_out·(1 − ε)); t is
    tanh(x/s) of the tile under a softcap (consumed).
    """
    p.mul_(coef[:, None])
    if smooth is not None:
        p.sub_(smooth[:, None])
    if rows.numel():
        p.index_put_((rows, cols), -hit[rows], accumulate=True)
    if t is not None:
        p.mul_(t.square_().neg_().add_(1.0))  # d cap(x)/dx = 1 − tanh²(x/s)
    return p


def _capped(z: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """(cap(z), tanh(z/s)) for a raw logits tile (consumed); (z, None) without a softcap."""
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


def _loss_from(
    lse: Tensor, zy: Tensor, zsum: Tensor | None, vocab: int, eps_ls: float, z_loss: float
) -> Tensor:
    loss = lse - (1.0 - eps_ls) * zy
    if zsum is not None:
        loss = loss - (eps_ls / vocab) * zsum
    if z_loss:
        loss = loss + z_loss * lse.square()
    return loss


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses (N,) of valid tokens (every target in [0, V)), recomputing the logits in
    the backward; see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        softcap: float | None,
        label_smoothing: float,
        z_loss: float,
        token_chunk: int,
        vocab_chunk: int,
        filter_eps: float | None,
    ) -> Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
            zsum = torch.zeros(n, dtype=torch.float32, device=hidden.device) if label_smoothing else None
            for n0 in range(0, n, token_chunk):
                n1 = min(n, n0 + token_chunk)
                h = hidden[n0:n1].float()
                running = torch.full((n1 - n0,), float("-inf"), dtype=torch.float32, device=hidden.device)
                for v0 in range(0, vocab, vocab_chunk):
                    v1 = min(vocab, v0 + vocab_chunk)
                    z = _tile_logits(h, weight[v0:v1], None if bias is None else bias[v0:v1])
                    if softcap is not None:
                        z.div_(softcap).tanh_().mul_(softcap)
                    # the online log-sum-exp over vocabulary tiles
                    running = torch.logaddexp(running, torch.logsumexp(z, dim=-1))
                    if zsum is not None:
                        zsum[n0:n1] += z.sum(-1)
                    del z
                lse[n0:n1] = running
            zy = _target_logits(hidden, weight, bias, target, softcap, token_chunk)
            loss = _loss_from(lse, zy, zsum, vocab, label_smoothing, z_loss)
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.options = (softcap, label_smoothing, z_loss, token_chunk, vocab_chunk, filter_eps)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, target, lse = ctx.saved_tensors
        softcap, eps_ls, z_loss, token_chunk, vocab_chunk, filter_eps = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        with torch.autocast(device_type=dev.type, enabled=False):
            g = grad_loss.float()
            coef = g * (1.0 + 2.0 * z_loss * lse) if z_loss else g
            hit = g * (1.0 - eps_ls)
            smooth = g * (eps_ls / vocab) if eps_ls else None
            filtering = filter_eps is not None and not eps_ls
            dh = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=dev) if need_h else None
            dw = torch.empty_like(weight) if need_w else None
            db = torch.empty(vocab, dtype=torch.float32, device=dev) if need_b else None
            for v0 in range(0, vocab, vocab_chunk):  # vocabulary outer: each dW tile is written once
                v1 = min(vocab, v0 + vocab_chunk)
                w = weight[v0:v1].float()
                b = None if bias is None else bias[v0:v1].float()
                dw_tile = torch.zeros_like(w) if need_w else None
                db_tile = torch.zeros(v1 - v0, dtype=torch.float32, device=dev) if need_b else None
                for n0 in range(0, n, token_chunk):
                    n1 = min(n, n0 + token_chunk)
                    y = target[n0:n1]
                    rows = ((y >= v0) & (y < v1)).nonzero().squeeze(1)
                    h = hidden[n0:n1].float()
                    z, t = _capped(_tile_logits(h, w, b), softcap)
                    p = z.sub_(lse[n0:n1, None]).exp_()  # the softmax tile, recomputed in place
                    if filtering and rows.numel() == 0 and bool(p.max() < filter_eps):
                        continue  # gradient filtering: a tile of negligible probabilities
                    grad = _grad_from_softmax_(
                        p,
                        t,
                        coef[n0:n1],
                        hit[n0:n1],
                        None if smooth is None else smooth[n0:n1],
                        rows,
                        y[rows] - v0,
                    )
                    if dh is not None:
                        dh[n0:n1].addmm_(grad, w)
                    if dw_tile is not None:
                        dw_tile.addmm_(grad.t(), h)
                    if db_tile is not None:
                        db_tile.add_(grad.sum(0))
                    del grad, z, t, p
                if dw is not None:
                    dw[v0:v1] = dw_tile
                if db is not None:
                    db[v0:v1] = db_tile
        return (
            None if dh is None else dh.to(hidden.dtype),
            dw,
            None if db is None else db.to(bias.dtype),
            *([None] * 7),
        )


class _InForwardLinearCrossEntropyFunction(torch.autograd.Function):
    """The scale·sum of the per-token losses of valid tokens, with the gradients computed in the
    forward pass (one matmul fewer than recomputing); the backward only scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        scale: float,
        softcap: float | None,
        label_smoothing: float,
        z_loss: float,
        rows_per_chunk: int,
    ) -> Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(device_type=dev.type, enabled=False):
            total = torch.zeros((), dtype=torch.float32, device=dev)
            dh = torch.empty(n, hidden.shape[1], dtype=torch.float32, device=dev) if need_h else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
            db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
            w = weight.float()
            b = None if bias is None else bias.float()
            for n0 in range(0, n, rows_per_chunk):
                n1 = min(n, n0 + rows_per_chunk)
                y = target[n0:n1]
                h = hidden[n0:n1].float()
                z, t = _capped(_tile_logits(h, w, b), softcap)  # (rows, V): this chunk's logits
                zy = z.gather(1, y[:, None]).squeeze(1)
                zsum = z.sum(-1) if label_smoothing else None
                # log-sum-exp and softmax in place (torch.logsumexp would allocate a second buffer)
                zmax = z.amax(dim=-1, keepdim=True)
                sumexp = z.sub_(zmax).exp_().sum(-1, keepdim=True)
                lse = (zmax + sumexp.log()).squeeze(1)
                total += _loss_from(lse, zy, zsum, vocab, label_smoothing, z_loss).sum()
                if need_h or need_w or need_b:
                    ones = torch.full_like(lse, scale)
                    coef = ones * (1.0 + 2.0 * z_loss * lse) if z_loss else ones
                    smooth = ones * (label_smoothing / vocab) if label_smoothing else None
                    grad = _grad_from_softmax_(
                        z.div_(sumexp),
                        t,
                        coef,
                        ones * (1.0 - label_smoothing),
                        smooth,
                        torch.arange(n1 - n0, device=dev),
                        y,
                    )
                    if dh is not None:
                        torch.mm(grad, w, out=dh[n0:n1])
                    if dw is not None:
                        dw.addmm_(grad.t(), h)
                    if db is not None:
                        db.add_(grad.sum(0))
                    del grad
                del z, t
        ctx.grads = (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
        )
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.grads
        ctx.grads = None
        scaled = [
            None if x is None else (x if bool(grad_total == 1) else x * grad_total.to(x.dtype)) for x in grads
        ]
        return (*scaled, *([None] * 6))


# -- the optional Triton kernel of `cut-cross-entropy` ----------------------------------------------------


@functools.cache
def _cce_function() -> tuple[Any, frozenset[str]] | None:
    """The package's `linear_cross_entropy` and its parameter names, or None when not importable."""
    try:
        import triton  # noqa: F401
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception:  # ImportError, or a broken Triton install: the PyTorch path is used
        return None
    return cce, frozenset(inspect.signature(cce).parameters)


def cce_unusable_reason(
    hidden: Tensor, bias: Tensor | None, label_smoothing: float, z_loss: float
) -> str | None:
    """Why the `cut-cross-entropy` kernel cannot compute this call (None when it can)."""
    if hidden.device.type != "cuda":
        return f"the inputs are on {hidden.device.type}, the kernel needs a CUDA device"
    found = _cce_function()
    if found is None:
        return (
            "the `cut-cross-entropy` package (with Triton) is not importable: pip install cut-cross-entropy"
        )
    _, params = found
    if label_smoothing:
        return "the kernel has no label smoothing"
    if bias is not None and "bias" not in params:
        return "the installed cut-cross-entropy takes no bias (upgrade it)"
    if z_loss and "return_lse" not in params:
        return "the installed cut-cross-entropy cannot return the log-sum-exp for the z-loss (upgrade it)"
    return None


def _cce_per_token(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    softcap: float | None,
    z_loss: float,
    filter_eps: float | None,
) -> Tensor:
    cce, _ = _cce_function()  # type: ignore[misc]
    kw: dict[str, Any] = {"ignore_index": ignore_index, "softcap": softcap, "reduction": "none"}
    kw["filter_eps"] = filter_eps
    if bias is not None:
        kw["bias"] = bias
    if z_loss:
        loss, lse = cce(hidden, weight, target, return_lse=True, **kw)
        valid = target != ignore_index
        return loss.float() + z_loss * torch.where(valid, lse.float().square(), 0.0)
    return cce(hidden, weight, target, **kw).float()


# -- the public function ---------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    reduction: str = "mean",
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    backward: str = "auto",
    filter_eps: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Cross-entropy of `cap(hidden @ weight.T + bias)` against `target`, never forming the logits.

    Args:
        hidden: (..., D) pre-logit hidden states (the input of the output layer).
        weight: (V, D) head weight (`lm_head.weight`; tied input embeddings work alike).
        target: (...) token ids in [0, V), or `ignore_index`.
        bias: optional (V,) head bias.
        ignore_index: targets with this value give 0 and are left out of the mean.
        label_smoothing: ε, as `F.cross_entropy`'s `label_smoothing`.
        softcap: s in cap(x) = s·tanh(x/s) (Gemma 2 uses 30); None for no capping.
        z_loss: λ of the added λ·log²Z per token (PaLM uses 1e-4); 0 for none.
        reduction: "mean" (over non-ignored tokens), "sum", or "none" (losses shaped like `target`,
            0 at ignored tokens).
        token_chunk, vocab_chunk: the tile of the recomputing path; its largest temporary is
            token_chunk × vocab_chunk floats (default 1024 × 2048 = 8 MB).
        backward: "recompute" (the paper's design: the forward keeps only the log-sum-exp, the
            backward recomputes every tile: 4 matmul passes over N·V·D), "in_forward" (for
            "mean"/"sum" only: the gradients are computed during the forward, over token chunks of
            full vocabulary rows (`in_forward_rows(V, token_chunk)`), stored until the backward:
            3 passes, as many as the materialised baseline), or "auto": "in_forward" when a scalar
            reduction is asked for with autograd recording and an input that needs a gradient,
            "recompute" otherwise.
        filter_eps: recompute path: skip the backward matmuls of tiles whose softmax entries are
            all below this (and that hold no target); None (default) gives exact gradients. Not
            used with label smoothing.
        impl: "auto" (the `cut-cross-entropy` Triton kernel where usable, else PyTorch), "torch"
            or "cce".

    Returns the loss in float32: a scalar, or per-token losses for `reduction="none"`.
    """
    _check_options(label_smoothing, softcap, z_loss, reduction, token_chunk, vocab_chunk, filter_eps, impl)
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if backward == "in_forward" and reduction == "none":
        raise ValueError(
            "backward='in_forward' needs reduction 'mean' or 'sum' (per-token gradient weights are unknown "
            "in the forward); use backward='recompute' for reduction='none'"
        )
    _check_inputs(hidden, weight, target, bias, ignore_index)
    shape = target.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = target.reshape(-1)
    valid = y != ignore_index

    reason = None if impl == "torch" else cce_unusable_reason(hidden, bias, label_smoothing, z_loss)
    if impl == "cce" and reason is not None:
        raise RuntimeError(f"impl='cce' cannot be used: {reason}; use impl='auto' or 'torch'")
    if impl != "torch" and reason is None:
        per_token = _cce_per_token(h, weight, bias, y, ignore_index, softcap, z_loss, filter_eps)
        if reduction == "none":
            return per_token.reshape(shape)
        total = per_token.sum()
        return total if reduction == "sum" else total / valid.sum().clamp_min(1)

    all_valid = bool(valid.all())
    idx = None if all_valid else valid.nonzero().squeeze(1)
    h_valid = h if idx is None else h.index_select(0, idx)
    y_valid = y if idx is None else y.index_select(0, idx)
    if backward == "auto":
        wants_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (hidden, weight, bias)
        )
        backward = "in_forward" if reduction != "none" and wants_grad else "recompute"
    if backward == "in_forward":
        count = y_valid.shape[0]
        scale = 1.0 if reduction == "sum" else 1.0 / max(count, 1)
        rows = in_forward_rows(weight.shape[0], token_chunk)
        return _InForwardLinearCrossEntropyFunction.apply(
            h_valid, weight, bias, y_valid, scale, softcap, label_smoothing, z_loss, rows
        )
    losses = _LinearCrossEntropyFunction.apply(
        h_valid, weight, bias, y_valid, softcap, label_smoothing, z_loss, token_chunk, vocab_chunk, filter_eps
    )
    per_token = losses if idx is None else losses.new_zeros(y.shape[0]).index_put((idx,), losses)
    if reduction == "none":
        return per_token.reshape(shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp_min(1)


__all__ = ["cce_unusable_reason", "linear_cross_entropy"]
