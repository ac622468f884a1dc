"""The ND (norm and direction) loss of KD++ (Wang, Cheng, Duan, Wang, Feng & Kong, "Improving
Knowledge Distillation via Regularizing Feature Norm and Direction", ECCV 2024, arXiv 2305.17007;
official code: WangYZ1608/Knowledge-Distillation-via-ND `CIFAR/utils.py::DirectNormLoss`,
`CIFAR/train_cifar_kd.py`, `CIFAR/emb_fea_distribution.py`).

With s_i the student's penultimate embedding (projected to the teacher's width when the widths
differ), t_i the teacher's, y_i the true class and c_y the mean of the teacher's embeddings of
class y over the training set, e_y = c_y / ‖c_y‖:

    L_ND,i = 1 − ⟨s_i, e_{y_i}⟩ / max(‖s_i‖, ‖t_i‖)

While ‖s‖ < ‖t‖ the loss is 1 − (‖s‖/‖t‖)·cos(s, e_y): it rewards a larger student norm and the
direction of the teacher's class mean; once ‖s‖ ≥ ‖t‖ it is 1 − cos(s, e_y), direction only. So it
is 0 exactly when s points along e_y with ‖s‖ ≥ ‖t‖, and lies in [0, 2].

Confirmed against the official code:
- e_y is the teacher's class mean normalised to unit length; the max is taken per sample between
  the two embedding norms, with gradient through ‖s‖ when it is the larger;
- the loss is summed over the batch and divided by its size (the mean of the per-sample values
  here), times the ND weight;
- the class means are the teacher's (eval mode) penultimate embeddings averaged per class over
  one pass of the training set (`emb_fea_distribution.py`; that pass used the training
  transforms); the embedding is the input of the final linear layer (pooled, flattened).
The paper's body could not be read through the search tools here (only its abstract, which
describes exactly this: align the direction with the teacher class mean and encourage a large norm).

Numerics: computed in float32; norms are floored at 1e−12 (an all-zero student and teacher
embedding, or an all-zero class mean, gives a finite loss of 1 and zero gradient instead of NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, reduce

EPS = 1e-12


def nd_loss(
    student_embedding: Tensor,
    teacher_embedding: Tensor,
    class_means: Tensor,
    target: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """1 − ⟨s_i, c_y/‖c_y‖⟩ / max(‖s_i‖, ‖t_i‖) per sample (see the module docstring).

    Args:
        student_embedding: (B, D) student embeddings, already projected to the teacher's width D.
        teacher_embedding: (B, D) teacher embeddings (only their norms are used; no gradient).
        class_means: (C, D) the teacher's class-mean embeddings.
        target: (B,) class indices.
        reduction: "mean" (over the batch, as the official code), "sum" or "none" (B,).
    """
    check_reduction(reduction)
    s, t = student_embedding, teacher_embedding
    if s.dim() != 2 or t.shape != s.shape:
        raise ValueError(
            f"student embeddings {tuple(s.shape)} and teacher embeddings {tuple(t.shape)} must both be (B, D) "
            "with the same D: project the student's embedding to the teacher's width first"
        )
    if class_means.dim() != 2 or class_means.shape[-1] != s.shape[-1]:
        raise ValueError(
            f"class means {tuple(class_means.shape)} must be (C, D) with the embeddings' D = {s.shape[-1]}"
        )
    if target.is_floating_point() or target.shape != s.shape[:1]:
        raise ValueError(f"nd needs (B,) = ({s.shape[0]},) class-index targets, got {tuple(target.shape)}")
    if target.device.type == "cpu" and target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= class_means.shape[0]:
            raise ValueError(
                f"targets must be class indices in [0, {class_means.shape[0]}), found [{lo}, {hi}]"
            )
    s = s.float()
    t = t.float().detach()
    e = F.normalize(class_means.float().detach(), dim=-1, eps=EPS)[target]
    denom = torch.maximum(s.norm(dim=-1), t.norm(dim=-1)).clamp_min(EPS)
    return reduce(1 - (s * e).sum(-1) / denom, reduction)


def class_means(embeddings: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """((C, D) per-class means of `embeddings` (B, D), (C,) counts); classes without samples get
    a zero mean. In float64 sums, returned as float32 means."""
    if embeddings.dim() != 2 or target.shape != embeddings.shape[:1]:
        raise ValueError(
            f"class_means needs (N, D) embeddings and (N,) targets, got {tuple(embeddings.shape)}"
        )
    sums = torch.zeros(num_classes, embeddings.shape[-1], dtype=torch.float64, device=embeddings.device)
    sums.index_add_(0, target, embeddings.double())
    counts = torch.bincount(target, minlength=num_classes).to(sums)
    return (sums / counts.clamp_min(1).unsqueeze(-1)).float(), counts.long()
