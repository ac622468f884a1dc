"""Learning Embedding Linear Projections, LELP (Loo, Iliopoulos, Hu & Vee, "Linear Projections of
Teacher Embeddings for Few-Class Distillation", arXiv 2409.20449, 2024).

With few classes, a teacher's probabilities carry little information; LELP finds informative linear
directions in the teacher's final-layer embedding space, splits every class into pseudo-subclasses
along them, and trains the student to reproduce the teacher's distribution over the
pseudo-subclasses. With h(x) ∈ R^d the teacher embedding, W ∈ R^{C×d} its classifier, z = Wh + b
its logits:

  pre-pass (once, over the training set):
    P = I − W⁺W                                       projector onto the null space of W
    for each class c: the centred projections P·h(x) − μ_c of its training examples (μ_c their
    mean) and their top-k principal directions v_{c,1..k} (unit, in the null space of W), with
    standard deviations σ_{c,j}
  per example:
    u_{c,j}(x) = v_{c,j}·(h(x) − μ_c) / σ_{c,j}        (v ∈ null(W), so v·h = v·P·h)
    a_{c,(j,±)}(x) = ±β·u_{c,j}(x)                     2k pseudo-subclasses per class
    t_{c,m}(x) = z_c(x) + log softmax_m(a_{c,·}(x))    teacher pseudo-subclass logits, (B, C·2k)
  student: its own class logits z^S and a linear head giving within-class logits a^S (B, C, 2k):
    s_{c,m} = z^S_c + log softmax_m(a^S_{c,·})
    L = τ²·KL(softmax(t/τ) ‖ softmax(s/τ))            over the C·2k pseudo-subclasses

Since logsumexp_m t_{c,m} = z_c, the teacher's pseudo-subclass distribution sums back exactly to
its class distribution, and likewise for the student: at τ = 1 the loss is KL over the classes
plus the teacher-probability-weighted KL of the within-class (pseudo-subclass) distributions.

What the material available here confirms (the paper's abstract, the review summary at
themoonlight.io and the reference notes; the paper's full text and any official code could not be
read): the teacher's final-layer embeddings are projected onto the null (zero) space of the
teacher's classification weights, so that the directions that set the output probabilities are
removed; PCA per class on those projections gives informative linear subspaces; these are split
into pseudo-subclasses; the student is trained to replicate the pseudo-subclasses; the
directions come from a pass over the training data with the frozen teacher, computed once.

Decided here where that material is silent (not the paper's stated choices): the two
pseudo-subclasses per direction (its two signs), the standardisation by σ_{c,j}, the sharpness
β, the teacher logits z_c + log softmax(±β·u) (so the class distribution is kept exactly), the
student's factorised pseudo-subclass logits (its own class head plus a linear within-class head on
its embedding, dropped at inference), the KL at temperature τ, the number of directions k, and
the sign convention of each direction (its largest-magnitude coordinate is positive, for
reproducibility). Ties with the paper should be checked against its text before relying on them.

Numerics: the pre-pass runs in float64 (SVD); the per-step maths in float32 through
log_softmax / logsumexp, stable for logits of magnitude 1e4 and bf16 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, check_temperature
from toolkit.functional.kd import kd_loss


def null_space_projector(weight: Tensor) -> Tensor:
    """P = I − W⁺W (d, d): the orthogonal projector onto the null space of W (C, d), float64."""
    if weight.dim() != 2:
        raise ValueError(f"the classifier weight must be (C, d), got {tuple(weight.shape)}")
    w = weight.detach().double()
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    rank = int((s > s.max() * max(w.shape) * torch.finfo(torch.float64).eps).sum()) if s.numel() else 0
    row = vh[:rank]
    return torch.eye(w.shape[1], dtype=torch.float64) - row.T @ row


def lelp_fit(embeddings: Tensor, labels: Tensor, weight: Tensor, num_directions: int) -> dict[str, Tensor]:
    """The pre-pass: per class, the mean μ_c (C, d), the top-k principal directions (C, k, d) of the
    class's embeddings projected onto null(W), and their standard deviations σ (C, k).

    Args:
        embeddings: (N, d) teacher embeddings of training examples.
        labels: (N,) their classes in [0, C).
        weight: (C, d) the teacher's classifier weight.
        num_directions: k ≥ 1 directions per class; every class needs more than k examples, and
            k ≤ d − rank(W) (the null space's dimension).
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"embeddings must be (N, d) and labels (N,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"the classifier weight {tuple(weight.shape)} must be (C, d) with d = {embeddings.shape[1]}, "
            "the embedding size"
        )
    if isinstance(num_directions, bool) or int(num_directions) != num_directions or num_directions < 1:
        raise ValueError(f"num_directions must be an integer >= 1, got {num_directions!r}")
    k, (c, d) = int(num_directions), weight.shape
    proj = null_space_projector(weight)
    null_dim = int(round(float(torch.trace(proj))))
    if k > null_dim:
        raise ValueError(
            f"num_directions={k} exceeds the null space of the teacher's classifier (dimension {null_dim} = "
            f"embedding size {d} - rank of W): use num_directions <= {null_dim}"
        )
    z = embeddings.detach().double() @ proj  # P symmetric
    labels = labels.long()
    means = torch.zeros(c, d, dtype=torch.float64)
    directions = torch.zeros(c, k, d, dtype=torch.float64)
    scales = torch.zeros(c, k, dtype=torch.float64)
    for cls in range(c):
        zc = z[labels == cls]
        if zc.shape[0] <= k:
            raise ValueError(
                f"class {cls} has {zc.shape[0]} training examples; LELP needs more than num_directions={k} "
                "per class (use fewer directions or more data)"
            )
        means[cls] = zc.mean(0)
        centred = zc - means[cls]
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        v = vh[:k]
        # a reproducible sign: the largest-magnitude coordinate of each direction is positive
        pivot = v.abs().argmax(-1, keepdim=True)
        v = v * torch.sign(v.gather(-1, pivot))
        directions[cls] = v
        scales[cls] = s[:k] / (zc.shape[0] - 1) ** 0.5
    return {"mean": means.float(), "directions": directions.float(), "scale": scales.float()}


def _check_state(mean: Tensor, directions: Tensor, scale: Tensor) -> None:
    c, k, d = directions.shape
    if mean.shape != (c, d) or scale.shape != (c, k):
        raise ValueError(
            f"inconsistent LELP state: mean {tuple(mean.shape)}, directions {tuple(directions.shape)}, "
            f"scale {tuple(scale.shape)} (expected (C, d), (C, k, d), (C, k))"
        )


def lelp_within_class_logits(
    embeddings: Tensor, mean: Tensor, directions: Tensor, scale: Tensor, beta: float = 1.0
) -> Tensor:
    """a_{c,(j,±)} = ±β·v_{c,j}·(h − μ_c)/σ_{c,j}: (B, C, 2k), the k "+" halves then the k "−"."""
    _check_state(mean, directions, scale)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = embeddings.float()
    if h.dim() != 2 or h.shape[1] != mean.shape[1]:
        raise ValueError(f"embeddings must be (B, d) with d = {mean.shape[1]}, got {tuple(h.shape)}")
    dirs, mu = directions.to(h.device).float(), mean.to(h.device).float()
    proj = torch.einsum("bd,ckd->bck", h, dirs) - (dirs * mu.unsqueeze(1)).sum(-1)
    sigma = scale.to(h.device).float()
    # a direction with no spread (a class whose projections are constant along it) gives u = 0
    u = torch.where(
        sigma > 0, proj / sigma.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(proj)
    )
    return beta * torch.cat([u, -u], dim=-1)


def lelp_subclass_logits(class_logits: Tensor, within_logits: Tensor) -> Tensor:
    """z_c + log softmax_m(a_{c,m}), flattened class-major to (B, C·S): logsumexp over each class's
    S pseudo-subclasses gives back z_c."""
    if class_logits.dim() != 2 or within_logits.dim() != 3 or within_logits.shape[:2] != class_logits.shape:
        raise ValueError(
            f"class logits (B, C) and within-class logits (B, C, S) must agree, got {tuple(class_logits.shape)} "
            f"and {tuple(within_logits.shape)}"
        )
    out = class_logits.float().unsqueeze(-1) + F.log_softmax(within_logits.float(), dim=-1)
    return out.flatten(1)


def lelp_loss(
    student_subclass_logits: Tensor,
    teacher_subclass_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) over the C·S pseudo-subclasses, per sample."""
    check_reduction(reduction)
    check_temperature(temperature)
    return kd_loss(student_subclass_logits, teacher_subclass_logits, temperature, reduction)
