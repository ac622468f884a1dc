"""TGeo-KD: a per-sample fusion ratio of teacher and ground-truth supervision (Hu, Wu, Li, Ma, Chen,
Yan, Wang & Liu, "Less or More From Teacher: Exploiting Trilateral Geometry for Knowledge
Distillation", ICLR 2024, arXiv 2312.15112; official code: github.com/Chengming0501/TGeo-KD).

    L_i = α_i · τ² · KL(softmax(t_i/τ) ‖ softmax(s_i/τ)) + (1 − α_i) · CE(s_i, y_i)
    α_i = σ(g_ω(r_i)) ∈ (0, 1)           g_ω: a small MLP (the "fusion ratio network")
    r_i = [S, T, T̄_y, G, |S − G|, |S − T|, |S − T̄_y|, (G − T̄_y)⊙(G − S), (G − T)⊙(G − S)]   (9·C)

with S = softmax(s_i), T = softmax(t_i) (τ = 1), G = onehot(y_i) and T̄_c the teacher's mean
predicted distribution over the training samples of class c. The first four blocks are the
vertices of the trilateral geometry (intra-sample S, T, G and the inter-sample T̄), the next three
element-wise edge lengths, the last two element-wise products of edges meeting at G (the angle
terms). ω is learnt by bilevel optimisation (see `toolkit.distill.tgeo_kd` and `toolkit.meta`).

Confirmed, and from where:
- The convex per-sample combination α_i·L_KD + (1 − α_i)·L_CE with a learnt α_i ∈ (0, 1), the
  S/T/G intra-sample relations and the class-mean teacher prediction T̄ (abstract; the official
  `cifar100/lib/losses/kd_loss.py` `(1 - alpha) * CE_loss + alpha * KD_loss.sum(1)`).
- τ² on the KD part: official `src/fusion_ratio_bilevel.py` (`alpha * T**2 * kd + (1 - alpha) * gt`);
  the CIFAR-100 code omits it but runs at its default τ = 1, where the two agree.
- The input features r_i and the ratio network Linear(9C, 128) → ReLU → Linear(128, 1) → sigmoid:
  official `cifar100/lib/models/reweighting.py` (`_x_in = cat([_x, _t, stats, _g, |_x − _g|,
  |_x − _t|, |_x − stats|, (_g − stats)·(_g − _x), (_g − _t)·(_g − _x)])`), softmax at τ = 1.
  The tabular code (`src/fusion_ratio_bilevel.py`) uses the same 9C blocks with squared instead of
  absolute differences and a 32-16 LeakyReLU MLP; the image-classification variant is followed.
- T̄_c = mean teacher softmax over samples of class c (official `precompute()`, τ = 1).
Decided here: T̄ is computed over the training set (the official CIFAR-100 code averages over its
evaluation loader, which is the test split); the features are computed from detached predictions
(the ratio is a weighting, not a path for the student's gradient). Everything is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_logits_and_target, check_reduction, check_temperature, reduce
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.functional.kd import kd_loss

FEATURE_BLOCKS = 9


def tgeo_features(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, class_means: Tensor
) -> Tensor:
    """The (B, 9·C) trilateral-geometry input of the fusion ratio network (module docstring).

    Args:
        student_logits, teacher_logits: (B, C).
        target: (B,) class indices.
        class_means: (C, C); row c is the teacher's mean softmax over training samples of class c.
    """
    check_logits_and_target(student_logits, teacher_logits, target, "TGeo-KD")
    c = student_logits.shape[-1]
    if class_means.shape != (c, c):
        raise ValueError(f"class_means must be (C, C) = ({c}, {c}), got {tuple(class_means.shape)}")
    s = torch.softmax(student_logits.float(), dim=-1)
    t = torch.softmax(teacher_logits.float(), dim=-1)
    t_bar = class_means.float().to(s.device)[target]
    g = F.one_hot(target, c).float()
    return torch.cat(
        [
            s,
            t,
            t_bar,
            g,
            (s - g).abs(),
            (s - t).abs(),
            (s - t_bar).abs(),
            (g - t_bar) * (g - s),
            (g - t) * (g - s),
        ],
        dim=-1,
    )


def tgeo_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    ratio: Tensor | float,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """α_i·τ²·KL(p_t^τ ‖ p_s^τ) + (1 − α_i)·CE(s_i, y_i) per sample.

    Args:
        student_logits, teacher_logits: (B, C) with the same C ≥ 2.
        target: (B,) class indices.
        ratio: the fusion ratio α: a (B,) tensor of per-sample values in [0, 1] or one number.
            α = 0 is cross-entropy alone, α = 1 KD alone; a constant α is classical KD.
        temperature: τ > 0 of the KD part (official default 1).
        reduction: "mean", "sum" or "none" (B,).
    """
    check_reduction(reduction)
    check_temperature(temperature)
    check_logits_and_target(student_logits, teacher_logits, target, "TGeo-KD")
    b = student_logits.shape[0]
    if isinstance(ratio, Tensor):
        if ratio.dim() > 1 and ratio.shape[1:] == (1,) * (ratio.dim() - 1):
            ratio = ratio.reshape(-1)
        if ratio.dim() not in (0, 1) or (ratio.dim() == 1 and ratio.shape[0] != b):
            raise ValueError(
                f"ratio must be a number or a (B,) = ({b},) tensor, got shape {tuple(ratio.shape)}"
            )
        ratio = ratio.float()
    elif not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    kd = kd_loss(student_logits, teacher_logits, temperature, reduction="none")
    ce = cross_entropy(student_logits, target, reduction="none")
    return reduce(ratio * kd + (1 - ratio) * ce, reduction)
