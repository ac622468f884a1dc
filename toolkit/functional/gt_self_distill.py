"""Self-distillation with ground-truth mixing (Borup & Andersen, "Even your Teacher Needs
Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation", NeurIPS 2021,
arXiv 2102.13088; official code: Kennethborup/self_distillation `self_distiller.py` and
`toy_example.ipynb`).

Generation τ = 0 fits the labels; generation τ ≥ 1 trains a fresh network of the same architecture
against the frozen generation τ − 1 (its teacher), with p = softmax(z) of the network being
trained, q = softmax(z_teacher), y the one-hot label and C classes:

    ℓ_i = (α/C)·‖p_i − y_i‖² + ((1 − α)/C)·‖p_i − q_i‖²                  (per sample)
        = (1/C)·‖p_i − (α·y_i + (1 − α)·q_i)‖² + α(1 − α)/C·‖y_i − q_i‖²
    L   = mean_i ℓ_i + reg · Σ_θ ‖θ‖₂                                     (the official objective)

The second line shows that the gradient is that of a squared error against the mixed target
α·y + (1 − α)·q (the paper's weighted-MSE view); the constant does not depend on the network.
In kernel ridge regression (the paper's analysis), generation τ is f_τ = K(K + λI)⁻¹(α·y +
(1 − α)·f_{τ−1}(X)): `kernel_ridge_self_distill` computes it, and its limit for τ → ∞ is the
original ridge problem with the regularisation amplified from λ to λ/α (f_∞ = αK(αK + λI)⁻¹y).

Confirmed from the official code:
- α weights the ground truth and (1 − α) the teacher: `loss = α·mse(softmax(pred), onehot) +
  (1 − α)·mse(softmax(pred), softmax(teacher))`; generation 0 (no teacher) is the first term
  with α = 1 (`self_distiller.py`).
- `F.mse_loss` averages over the batch *and* the classes: hence the 1/C above; per sample the
  value here is the mean over classes, and its batch mean equals the official loss.
- Probabilities at temperature 1 on both sides (no τ), squared error (not KL).
- The regulariser is reg_coef · Σ over parameter tensors of their (unsquared) L2 norm, reg_coef
  = 1e-4 by default (`torch.norm(param)` summed); Adam, lr 1e-3 by default (README's command:
  1e-4, α = 0.6, 75 epochs, batch 16, 5 distillation steps, ResNet-50 on CIFAR-10).
- Each step trains a new network from scratch against the previous step's frozen network
  (`teacher = model; teacher.freeze()`), and the kernel recursion f_τ = K_ridge(αy + (1 −
  α)f_{τ−1}) with limit αk(x)(αK + λI)⁻¹y (`toy_example.ipynb`).

Not implemented: the paper's closed-form optimal α per step and its estimate for deep networks
(the formula was not available in the material read); α is a hyper-parameter here.

Numerics: softmax in float32 (bf16 inputs upcast); every quantity is a probability vector, so
‖p − y‖² ≤ 2 and ℓ_i ≤ 2/C: bounded and finite for logits of any magnitude.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, reduce


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(
            f"alpha must be in [0, 1] (the weight of the ground truth; 1 = no teacher), got {alpha}"
        )


def _as_probabilities(target: Tensor, num_classes: int, batch: int) -> Tensor:
    if target.is_floating_point():
        if target.shape != (batch, num_classes):
            raise ValueError(
                f"soft targets must be (B, C) = ({batch}, {num_classes}), got {tuple(target.shape)}"
            )
        return target.float()
    if target.shape != (batch,):
        raise ValueError(f"targets must be (B,) = ({batch},) class indices, got {tuple(target.shape)}")
    if (
        target.device.type == "cpu"
        and target.numel()
        and bool(((target < 0) | (target >= num_classes)).any())
    ):
        raise ValueError(f"targets must be class indices in [0, {num_classes})")
    return F.one_hot(target.long(), num_classes).float()


def gt_self_distill_targets(target: Tensor, teacher_logits: Tensor | None, alpha: float) -> Tensor:
    """The mixed target α·y + (1 − α)·softmax(teacher) (B, C); y is one-hot (or soft (B, C))."""
    check_alpha(alpha)
    if teacher_logits is None or teacher_logits.dim() != 2:
        raise ValueError("teacher_logits must be (B, C): the previous generation's logits")
    b, c = teacher_logits.shape
    y = _as_probabilities(target, c, b)
    return alpha * y + (1.0 - alpha) * teacher_logits.float().softmax(-1)


def gt_self_distill_loss(
    student_logits: Tensor,
    target: Tensor,
    teacher_logits: Tensor | None = None,
    alpha: float = 0.6,
    reduction: str = "mean",
) -> Tensor:
    """(α/C)·‖p − y‖² + ((1 − α)/C)·‖p − q‖² per sample (see the module docstring).

    Args:
        student_logits: (B, C), C ≥ 2.
        target: (B,) class indices, or (B, C) probabilities.
        teacher_logits: (B, C) logits of the previous generation; may be None only when α = 1.
        alpha: weight in [0, 1] of the ground truth (official CLI default 1; README example 0.6).
        reduction: "mean" (the official value), "sum" or "none" (B,).
    """
    check_reduction(reduction)
    check_alpha(alpha)
    if student_logits.dim() != 2 or student_logits.shape[-1] < 2:
        raise ValueError(f"student logits must be (B, C) with C >= 2, got {tuple(student_logits.shape)}")
    b, c = student_logits.shape
    p = student_logits.float().softmax(-1)
    y = _as_probabilities(target, c, b)
    per_sample = alpha * (p - y).pow(2).mean(-1)
    if alpha < 1.0:
        if teacher_logits is None:
            raise ValueError(f"alpha={alpha} < 1 mixes in a teacher: pass teacher_logits (or use alpha=1)")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                "must have the same shape: self-distillation uses the same classes"
            )
        q = teacher_logits.detach().float().softmax(-1)
        per_sample = per_sample + (1.0 - alpha) * (p - q).pow(2).mean(-1)
    return reduce(per_sample, reduction)


def parameter_norm_penalty(parameters) -> Tensor:
    """Σ over parameter tensors of their L2 norm (unsquared), the official regulariser."""
    norms = [p.float().norm() for p in parameters if p.requires_grad]
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).sum()


def kernel_ridge_self_distill(gram: Tensor, y: Tensor, lam: float, alpha: float, steps: int) -> list[Tensor]:
    """The paper's kernel-ridge self-distillation: fitted values at the training points of
    generations 0..steps, f_0 = K(K + λI)⁻¹y and f_τ = K(K + λI)⁻¹(α·y + (1 − α)·f_{τ−1}).

    Args:
        gram: (n, n) symmetric positive semi-definite kernel matrix K.
        y: (n,) or (n, k) targets.
        lam: ridge λ > 0. alpha: weight of the ground truth in [0, 1]. steps: distillation steps ≥ 0.
    """
    check_alpha(alpha)
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] != y.shape[0]:
        raise ValueError(f"gram must be (n, n) and y (n, ...), got {tuple(gram.shape)} and {tuple(y.shape)}")
    k = gram.double()
    smoother = k @ torch.linalg.inv(k + lam * torch.eye(k.shape[0], dtype=k.dtype))
    yd = y.double()
    fits = [smoother @ yd]
    for _ in range(steps):
        fits.append(smoother @ (alpha * yd + (1.0 - alpha) * fits[-1]))
    return fits
