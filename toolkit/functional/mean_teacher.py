"""Robust Mean Teacher (Döbler, Marsden & Yang, "Robust Mean Teacher for Continual and Gradual
Test-Time Adaptation", CVPR 2023, arXiv 2211.13081): an exponential-moving-average copy of the
student is the teacher, and the consistency between the two is a symmetric cross-entropy.

With p = softmax(f(x)), p_aug = softmax(f(aug(x))) from the student f and p̄ = softmax(f̄(x)) from
the EMA teacher f̄ (no gradient into f̄):

    L_SCE = −¼·[Σ p̄·log p + Σ p·log p̄ + Σ p̄·log p_aug + Σ p_aug·log p̄]      (with the augmented view)
    L_SCE = −½·[Σ p̄·log p + Σ p·log p̄]                                      (without: RMT's warm-up form)
    θ̄ ← α·θ̄ + (1 − α)·θ                                                      (after every optimiser step)

Confirmed against the official code (github.com/mariodoebler/test-time-adaptation,
`classification/methods/rmt.py`: `symmetric_entropy`, `softmax_entropy`, `update_ema_variables`;
`classification/conf.py`: `M_TEACHER.MOMENTUM = 0.999`; `augmentations/transforms_cotta.py`:
`get_tta_transforms`): the four-term and two-term forms with the ¼ and ½ factors and no
temperature; the EMA over the parameters only (`model.parameters()`), momentum α = 0.999; the
EMA teacher sees the un-augmented input; the augmented view is the CoTTA/KATANA test-time
transform below, drawn once per batch (the `Compose` is applied to the whole batch tensor).
The paper's text was not readable here beyond its abstract (which names the symmetric
cross-entropy as the mean teacher's consistency loss); the formula is the code's, and matches
the reference's reading of the paper.

`rmt_augment` (`get_tta_transforms(dataset)`, soft=False, on images in [0, 1]): clip; colour
jitter in random order (brightness 0.6-1.4, contrast 0.7-1.3, saturation 0.5-1.5, hue ±0.06,
gamma 0.7-1.3; soft: 0.8-1.2, 0.85-1.15, 0.75-1.25, ±0.03, 0.85-1.15); edge padding by half the
image size; random affine (±15°, translation 1/16 of the padded size, scale 0.9-1.1; soft ±8°,
0.95-1.05; bilinear); Gaussian blur (kernel 5, σ 0.001-0.5; soft 0.001-0.25); centre crop back;
horizontal flip with probability ½; Gaussian noise σ = 0.005; clip. Toolkit batches are
normalised, so the transform un-normalises with the data's mean/std, runs in [0, 1] and
normalises again. Random numbers come from torch's global generator (seeded, and restored on
resume). Saturation and hue leave 1-channel images unchanged (as torchvision does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, reduce


def symmetric_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_aug_logits: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """RMT's symmetric cross-entropy between the student (and its augmented view) and the teacher.

    All logits are (B, C) with the same shape; computed in float32 from log_softmax (stable for
    logits of 1e4 and bf16). Gradients flow into every input given: pass teacher logits computed
    under `no_grad` (as RMT's EMA teacher).
    """
    check_reduction(reduction)
    given = [student_logits, teacher_logits] + (
        [student_aug_logits] if student_aug_logits is not None else []
    )
    if student_logits.dim() != 2 or any(t.shape != student_logits.shape for t in given):
        raise ValueError(
            "student, teacher (and augmented-student) logits must all be (B, C) with the same shape, got "
            + ", ".join(str(tuple(t.shape)) for t in given)
        )
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    views = [F.log_softmax(v.float(), dim=-1) for v in given[:1] + given[2:]]
    per_sample = torch.zeros(student_logits.shape[0], device=log_t.device)
    for log_v in views:
        per_sample = per_sample - (log_t.exp() * log_v).sum(-1) - (log_v.exp() * log_t).sum(-1)
    return reduce(per_sample / (2 * len(views)), reduction)


@torch.no_grad()
def ema_update_(ema: Iterable[Tensor], current: Iterable[Tensor], momentum: float) -> None:
    """In place: ema ← momentum·ema + (1 − momentum)·current, pairwise (e.g. two `parameters()`)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}; RMT uses 0.999")
    ema, current = list(ema), list(current)
    if len(ema) != len(current):
        raise ValueError(
            f"the EMA has {len(ema)} tensors but the network {len(current)}: not the same architecture"
        )
    for e, c in zip(ema, current, strict=True):
        if e.shape != c.shape:
            raise ValueError(f"EMA tensor {tuple(e.shape)} does not match {tuple(c.shape)}")
        e.mul_(momentum).add_(c.detach().to(e.dtype), alpha=1.0 - momentum)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _jitter(x: Tensor, soft: bool) -> Tensor:
    import torchvision.transforms.functional as TF

    ranges = {
        "brightness": (0.8, 1.2) if soft else (0.6, 1.4),
        "contrast": (0.85, 1.15) if soft else (0.7, 1.3),
        "saturation": (0.75, 1.25) if soft else (0.5, 1.5),
        "hue": (-0.03, 0.03) if soft else (-0.06, 0.06),
        "gamma": (0.85, 1.15) if soft else (0.7, 1.3),
    }
    ops = {
        "brightness": TF.adjust_brightness,
        "contrast": TF.adjust_contrast,
        "saturation": TF.adjust_saturation,
        "hue": TF.adjust_hue,
        "gamma": lambda img, g: TF.adjust_gamma(img.clamp(1e-8, 1.0), g),
    }
    names = list(ranges)
    for i in torch.randperm(len(names)).tolist():
        name = names[i]
        x = ops[name](x, _uniform(*ranges[name]))
    return x


def rmt_augment(
    x: Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    soft: bool = False,
    noise_std: float = 0.005,
) -> Tensor:
    """RMT's (CoTTA's) test-time augmentation of an image batch (B, C, H, W), one draw per batch.

    `mean`/`std` (per channel) are the normalisation of `x`: the transform runs on
    x·std + mean in [0, 1] and returns the result normalised again; None means `x` is in [0, 1].
    No gradient flows through it (it makes a second input).
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"rmt_augment needs an image batch (B, 1 or 3, H, W), got {getattr(x, 'shape', type(x).__name__)}; "
            "turn the augmented view off (augment=False) for other inputs"
        )
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    with torch.no_grad():
        img = x.detach().float()
        if mean is not None or std is not None:
            m = torch.as_tensor(mean if mean is not None else 0.0, dtype=img.dtype, device=img.device)
            s = torch.as_tensor(std if std is not None else 1.0, dtype=img.dtype, device=img.device)
            m, s = m.reshape(1, -1, 1, 1), s.reshape(1, -1, 1, 1)
            img = img * s + m
        h, w = img.shape[-2:]
        img = _jitter(img.clamp(0.0, 1.0), soft)
        pad = h // 2
        img = TF.pad(img, [pad], padding_mode="edge")
        ph, pw = img.shape[-2:]
        angle = _uniform(-8.0, 8.0) if soft else _uniform(-15.0, 15.0)
        tx = round(_uniform(-pw / 16, pw / 16))
        ty = round(_uniform(-ph / 16, ph / 16))
        scale = _uniform(0.95, 1.05) if soft else _uniform(0.9, 1.1)
        img = TF.affine(img, angle, [tx, ty], scale, [0.0, 0.0], interpolation=InterpolationMode.BILINEAR)
        sigma = _uniform(0.001, 0.25) if soft else _uniform(0.001, 0.5)
        img = TF.gaussian_blur(img, [5, 5], [sigma, sigma])
        img = TF.center_crop(img, [h, w])
        if float(torch.rand(())) < 0.5:
            img = TF.hflip(img)
        if noise_std > 0:
            img = img + torch.randn_like(img) * noise_std
        img = img.clamp(0.0, 1.0)
        if mean is not None or std is not None:
            img = (img - m) / s
    return img.to(x.dtype)
