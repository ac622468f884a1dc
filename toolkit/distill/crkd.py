"""Cr-KD for novel class discovery as a loss term; maths in `toolkit.functional.crkd`; the
known-class teacher and the discovery run as recipe stages (`recipes/configs/distill/crkd.yaml`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from toolkit.functional._reduce import check_nonnegative, check_temperature
from toolkit.functional.crkd import (
    cluster_accuracy,
    crkd_kd_loss,
    ncd_targets,
    split_cluster_accuracy,
    swapped_prediction_loss,
)
from toolkit.models.output import forward_output
from toolkit.registry import register
from toolkit.terms import LossTerm, Step
from toolkit.types import as_batch


class PadClasses(nn.Module):
    """A network predicting K classes seen as one predicting `num_classes` ≥ K: its logits
    followed by NaN for the other classes. For a known-class teacher (Cr-KD) beside a student over
    known + novel classes: `DistillationModule` requires equal class counts, and only terms that
    read the first K teacher logits may use it (any other would see NaN and fail loudly)."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)

    def forward(self, x: Any) -> Tensor:
        logits = forward_output(self.net, x).logits
        extra = self.num_classes - logits.shape[-1]
        if extra < 0:
            raise ValueError(
                f"the network predicts {logits.shape[-1]} classes, more than num_classes={self.num_classes}"
            )
        return torch.cat([logits, logits.new_full((*logits.shape[:-1], extra), float("nan"))], dim=-1)


def _second_view(x: Tensor, generator: torch.Generator, padding: int, flip: bool) -> Tensor:
    """A random translation (zero padding then a crop back to size) and horizontal flip per image."""
    b, _, h, w = x.shape
    if padding:
        padded = torch.nn.functional.pad(x, [padding] * 4)
        shifts = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, r : r + h, c : c + w] for i, (r, c) in enumerate(shifts)])
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask.view(b, 1, 1, 1), x.flip(-1), x)
    return x


@register("distiller", "crkd")
class CRKDLoss(LossTerm):
    """Novel class discovery with class-relation KD: UNO's swapped prediction + α·Cr-KD, per sample.

    Gu, Zhang, Xu & He, "Class-relation Knowledge Distillation for Novel Class Discovery" (ICCV
    2023), following the official kleinzcy/Cr-KD-NCD code (formula and what is confirmed: see
    `toolkit.functional.crkd`). The batch holds labelled samples of the K known classes (labels
    0..K-1) and unlabelled samples of the novel classes: a sample is unlabelled when its label is
    ≥ K, and its label is never read otherwise (toolkit DataModules give this layout with
    `known_classes=K, class_split="all"`, which puts the known classes first). The student
    predicts K + N classes (its first K outputs are the known head); the teacher, trained on the
    known classes only, is frozen and predicts K (wrap it in `PadClasses` for `DistillationModule`).

    Per step: a second view of the batch (a random translation by up to `view_padding` pixels and,
    with `view_flip`, a horizontal flip, drawn from a generator seeded by the step: resumes are
    exact) goes through the student too; each view's targets (one-hot for labelled samples,
    Sinkhorn-Knopp over the novel logits for the others) supervise the other view's predictions;
    the KD term makes the known head's distribution on unlabelled samples follow the teacher's,
    weighted by how known-like the student finds the sample. The per-sample values are scaled so
    that their batch mean is the official mean_i L_cluster + α·mean_{unlabelled} L_KD.

    Differences from the official model, which this term cannot change: the student's known and
    novel heads are one linear classifier of the toolkit model (UNO: L2-normalised prototype heads
    on normalised features, 4 novel heads, an MLP projector, 2 large + 2 small crops, and a
    best-head choice). τ = 0.1 is tuned for cosine-similarity logits in [-1, 1]; with a plain
    linear head the configs use τ = 1 (say so if you change it).

    `stage_metrics(module, datamodule)` (called by the recipe after the stage): clustering
    accuracy with Hungarian matching of the novel head on the unlabelled training samples
    (`novel_acc`, the standard NCD metric), of the novel head on the novel test samples
    (`test_novel_acc`, task-aware), and task-agnostic over all test samples (`test_all_acc`,
    `test_seen_acc`, `test_agnostic_novel_acc`: one assignment over the K + N outputs).

    When to use: novel class discovery with a known-class model to transfer from. Expected effect
    (paper): better novel-class clustering accuracy than UNO-style discovery alone (`alpha=0`
    here is that baseline) on CIFAR-100, Stanford Cars, CUB, FGVC-Aircraft.

    Args:
        num_known: K; None reads the DataModule's `num_known` (from `known_classes`).
        alpha: α ≥ 0, the weight of Cr-KD (official CIFAR-100: 0.1; 0 = no teacher, the UNO baseline).
        temperature: τ > 0 of the heads' softmax (official 0.1 for cosine heads).
        kd_temperature: T > 0 (official 4).
        sk_iters, sk_epsilon: Sinkhorn-Knopp iterations and ε (official 3, 0.05).
        num_views: 2 (swapped prediction between the batch and its second view) or 1
            (self-labelling on the batch alone; for inputs that are not image tensors).
        view_padding, view_flip: the second view's translation (pixels) and flip.
        view_seed: base seed of the second view's generator.
    """

    needs_target = True

    def __init__(
        self,
        num_known: int | None = None,
        alpha: float = 0.1,
        temperature: float = 0.1,
        kd_temperature: float = 4.0,
        sk_iters: int = 3,
        sk_epsilon: float = 0.05,
        num_views: int = 2,
        view_padding: int = 2,
        view_flip: bool = True,
        view_seed: int = 0,
    ) -> None:
        super().__init__()
        if num_known is not None and (
            isinstance(num_known, bool) or int(num_known) != num_known or num_known < 1
        ):
            raise ValueError(
                f"num_known must be an integer >= 1 (or None: from the DataModule), got {num_known!r}"
            )
        check_nonnegative("alpha", alpha)
        check_temperature(temperature)
        check_temperature(kd_temperature)
        if int(sk_iters) < 1 or not sk_epsilon > 0:
            raise ValueError(f"sk_iters must be >= 1 and sk_epsilon > 0, got {sk_iters}, {sk_epsilon}")
        if num_views not in (1, 2):
            raise ValueError(f"num_views must be 1 or 2, got {num_views}")
        if int(view_padding) < 0:
            raise ValueError(f"view_padding must be >= 0, got {view_padding}")
        self.num_known = None if num_known is None else int(num_known)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.kd_temperature = float(kd_temperature)
        self.sk_iters = int(sk_iters)
        self.sk_epsilon = float(sk_epsilon)
        self.num_views = int(num_views)
        self.view_padding = int(view_padding)
        self.view_flip = bool(view_flip)
        self.view_seed = int(view_seed)
        self.needs_teacher = self.alpha > 0  # alpha = 0: discovery without the teacher (UNO)

    def _known(self, module: Any) -> int:
        if self.num_known is None:
            trainer = getattr(module, "_trainer", None) if module is not None else None
            k = getattr(getattr(trainer, "datamodule", None), "num_known", None)
            if k is None:
                raise ValueError(
                    "crkd needs num_known: pass it, or use a DataModule with known_classes (class_split='all')"
                )
            self.num_known = int(k)
        return self.num_known

    def setup(self, example: Step) -> None:
        k = self._known(example.module)
        c = example.student.logits.shape[-1]
        if not 1 <= k < c:
            raise ValueError(f"crkd: num_known={k} must be in [1, {c}) for a student over {c} classes")
        if self.needs_teacher and example.teacher is not None and example.teacher.logits.shape[-1] < k:
            raise ValueError(
                f"crkd: the teacher predicts {example.teacher.logits.shape[-1]} classes, fewer than K={k}"
            )
        if self.num_views == 2 and not (
            isinstance(example.batch.input, Tensor) and example.batch.input.dim() == 4
        ):
            raise ValueError(
                "crkd's second view needs image tensors (B, C, H, W): use num_views=1 for other inputs"
            )

    def forward(self, step: Step) -> Tensor:
        k = self._known(step.module)
        target = step.target
        logits = step.student.logits
        unlabelled = target >= k
        views = [logits]
        if self.num_views == 2:
            g = torch.Generator().manual_seed(self.view_seed * 1_000_003 + step.progress.global_step)
            x2 = _second_view(step.batch.input, g, self.view_padding, self.view_flip)
            views.append(forward_output(step.module.model, x2).logits)
        targets = [ncd_targets(v.detach(), target, k, self.sk_iters, self.sk_epsilon) for v in views]
        loss = swapped_prediction_loss(views, targets, self.temperature)
        if self.alpha > 0 and bool(unlabelled.any()):
            kd = crkd_kd_loss(
                logits,
                step.teacher.logits[:, :k],
                unlabelled,
                self.temperature,
                self.kd_temperature,
                reduction="none",
            )
            # scaled so that the batch mean is the official mean over the unlabelled samples
            loss = loss + self.alpha * kd * (logits.shape[0] / unlabelled.sum())
        return loss

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def stage_metrics(self, module: Any, datamodule: Any) -> dict[str, float]:
        """Clustering accuracies (see the class docstring), in [0, 1]."""
        k = self._known(module)
        device = next(module.parameters()).device
        was_training = module.training
        module.eval()
        try:
            train_pred, train_true = [], []
            for batch in datamodule.train_dataloader():
                b = as_batch(batch)
                novel = b.target >= k
                if novel.any():
                    logits = forward_output(module.model, b.input.to(device)).logits.cpu()
                    train_pred.append(logits[novel, k:].argmax(-1))
                    train_true.append(b.target[novel] - k)
            all_pred, all_true, novel_pred = [], [], []
            for batch in datamodule.test_dataloader():
                b = as_batch(batch)
                logits = forward_output(module.model, b.input.to(device)).logits.cpu()
                all_pred.append(logits.argmax(-1))
                all_true.append(b.target)
                novel_pred.append(logits[:, k:].argmax(-1))
        finally:
            module.train(was_training)
        metrics: dict[str, float] = {}
        if train_pred:
            metrics["novel_acc"] = cluster_accuracy(torch.cat(train_pred), torch.cat(train_true))
        y, novel_head = torch.cat(all_true), torch.cat(novel_pred)
        if bool((y >= k).any()):
            metrics["test_novel_acc"] = cluster_accuracy(novel_head[y >= k], y[y >= k] - k)
        split = split_cluster_accuracy(torch.cat(all_pred), y, k)
        metrics.update(
            test_all_acc=split["all"], test_seen_acc=split["seen"], test_agnostic_novel_acc=split["novel"]
        )
        return metrics

    def extra_repr(self) -> str:
        return (
            f"num_known={self.num_known}, alpha={self.alpha}, temperature={self.temperature}, "
            f"kd_temperature={self.kd_temperature}, num_views={self.num_views}"
        )
