"""VoG, the variance of gradients (Agarwal, D'souza, Hooker, "Estimating Example Difficulty Using
Variance of Gradients", CVPR 2022, arXiv:2008.11600), as used for data pruning in "Influence
Scores at Scale for Efficient Language Data Sampling" (Anand, Tan, Minakova, EMNLP 2023,
arXiv:2311.16298).

At each of K checkpoints t the gradient of the pre-softmax logit of the label class w.r.t. the
input, S_t = ∂A_y/∂x; with μ = (1/K) Σ_t S_t,

    VoG(x) = mean over input dims of sqrt((1/K) Σ_t (S_t − μ)²),

then normalised within each class: (VoG − mean_c) / std_c over the samples of the class
(population std). High VoG = the explanation keeps changing = hard / atypical / mislabelled.

CONFIRMED from the official code (github chirag126/VOG):
- the logit, not the probability, of the *ground-truth* label for training data
  (`train_cifar/main.py`: `sel_nodes = logits[arange, train_targets]`, backward with ones;
  `imagenet/train_get_gradients.py`: `y = logits[0][neuron_selector]` fed with the true label).
  The toy script (`toy_script.py`) differentiates the softmax probability instead; we follow the
  CIFAR/ImageNet code and the paper's "pre-softmax activation". The paper uses the predicted
  label only for unlabelled test data, which pruning never scores.
- for colour images the gradient is averaged over the channels first (both scripts:
  `np.mean(grad, axis=-1)` on H×W×C), giving one value per pixel: `channel_mean=True` does this
  for (B, C, H, W) inputs (a no-op for one channel);
- VoG = `np.mean(np.sqrt(sum((g − mean)²) / K))`: the 1/K (population) variance, square root
  per pixel, then the mean over pixels;
- class normalisation `(vog − np.mean(class_vogs)) / np.std(class_vogs)` over the samples of the
  label's class (`toy_script.py`, and the commented block of `imagenet/train_visualize_grad.py`),
  np.std being the population std.
DECIDED: a class whose VoGs all agree (std 0, e.g. a single sample) gets z-scores 0, not NaN.
Text inputs (token ids) have no input gradient; "Influence Scores at Scale" differentiates
w.r.t. the input embeddings (inferred, not implemented here).

The per-pixel statistics are accumulated across checkpoints with Welford's update
(`welford_update`), so K need not be known in advance and no checkpoint's gradients are kept.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from toolkit.models.output import forward_output
from toolkit.types import check_targets


def input_gradients(model: nn.Module, inputs: Tensor, target: Tensor, channel_mean: bool = True) -> Tensor:
    """(B, D) gradients S = ∂A_y/∂x of the label's logit w.r.t. each sample's input, flattened,
    in float32; with `channel_mean` and (B, C, H, W) inputs, averaged over C first.

    The logits of all samples are summed and differentiated once: exact per-sample gradients when
    the samples do not interact (eval mode: BatchNorm with running statistics)."""
    if isinstance(inputs, Mapping):
        raise NotImplementedError(
            "VoG differentiates the label's logit w.r.t. the input, and token ids have no gradient: VoG on "
            "text (w.r.t. the input embeddings) is not implemented. Score text with el2n or grand_last_layer."
        )
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise TypeError(
            f"VoG needs floating-point tensor inputs to differentiate, got "
            f"{inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__}"
        )
    if target is None or target.is_floating_point() or tuple(target.shape) != (inputs.shape[0],):
        raise ValueError(
            f"VoG needs (B,) class-index targets with B = {inputs.shape[0]}, "
            f"got {None if target is None else (target.dtype, tuple(target.shape))}"
        )
    with torch.enable_grad():
        x = inputs.detach().requires_grad_(True)
        logits = forward_output(model, x).logits
        if logits.dim() != 2:
            raise ValueError(f"VoG needs (B, C) logits, got {tuple(logits.shape)}")
        check_targets(target, logits.shape[1])
        selected = logits.gather(1, target.long().view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, x)
    grad = grad.float()
    if channel_mean and grad.dim() == 4:
        grad = grad.mean(1)
    return grad.flatten(1)


def vog_score(gradients: Tensor) -> Tensor:
    """(B,) raw VoG of gradients stacked over K checkpoints, (K, B, *dims); float64 inside,
    float32 out."""
    if gradients.dim() < 2:
        raise ValueError(f"gradients must be (K, B, ...) over K checkpoints, got {tuple(gradients.shape)}")
    g = gradients.double().flatten(2)
    g = g - g[0]  # shift-invariant; identical checkpoints give exactly 0
    return (g - g.mean(0)).pow(2).mean(0).sqrt().mean(-1).float()


def welford_update(count: Tensor, mean: Tensor, m2: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Welford step for rows observed once more: count (B,), mean and m2 (B, D), value (B, D).
    Returns the new (count, mean, m2); the population variance is m2 / count."""
    count = count + 1
    delta = value - mean
    mean = mean + delta / count.unsqueeze(-1).to(mean.dtype)
    m2 = m2 + delta * (value - mean)
    return count, mean, m2


def vog_from_moments(count: Tensor, m2: Tensor) -> Tensor:
    """(B,) raw VoG from Welford statistics: mean over dims of sqrt(m2 / count)."""
    return (m2.float() / count.unsqueeze(-1).float()).clamp_min(0).sqrt().mean(-1)


def class_normalize(score: Tensor, label: Tensor) -> Tensor:
    """Z-scores within each class: (s − mean_c) / std_c (population std); 0 where std_c = 0.
    Computed in float64, returned in float32."""
    if score.shape != label.shape or score.dim() != 1:
        raise ValueError(
            f"score and label must both be (N,), got {tuple(score.shape)} and {tuple(label.shape)}"
        )
    score = score.double()
    out = torch.zeros_like(score)
    for c in label.unique():
        mask = label == c
        s = score[mask]
        std = s.std(unbiased=False)
        # equal scores up to rounding: std 0 (a float64 mean of equal float32 values may be off by an ulp)
        if std > 1e-9 * float(s.abs().max()):
            out[mask] = (s - s.mean()) / std
    return out.float()
