"""Dual-Head Knowledge Distillation as a loss term; maths in `toolkit.functional.dhkd`."""

from __future__ import annotations

from torch import Tensor

from toolkit.distill.fitnet import check_path, feature_at
from toolkit.distill.heads import HeadSet
from toolkit.functional._reduce import check_temperature
from toolkit.functional.dhkd import binary_kl_loss, binary_kl_norm_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step

LOSSES = {"binary_kl_norm": binary_kl_norm_loss, "binary_kl": binary_kl_loss}
HEADS = ("linear", "mlp")


@register("distiller", "dhkd")
class DHKDLoss(LossTerm):
    """DHKD: an auxiliary head h₂ on the student's penultimate feature f takes the logit-level
    loss BinaryKL-Norm(h₂(f), t) = τ²·Σ_c log cosh((h₂(f)_c − t_c)/(2τ)), per sample.

    Yang et al., "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an
    Auxiliary Head" (arXiv 2411.08937); follows the official penghui-yang/DHKD code. The paper
    finds that a logit-level loss (BinaryKL, which keeps what the softmax forgets, e.g. the logits'
    shift) and the probability-level CE conflict on a shared linear classifier (the head
    collapses) but not in the backbone; so the student's classifier h₁ keeps CE alone and a second
    head h₂, fed the same feature, takes the logit-level loss. Both train the backbone; h₂ is
    discarded at inference.

    The whole method is L = γ·CE(h₁(f), y) + α·BinaryKL-Norm(h₂(f), t) (`helper/loops.py`), written
    as two bus terms: `{"ce": {"loss": "cross_entropy", "weight": γ}, "dhkd": {"distiller":
    "dhkd", "weight": α}}`. No probability-level KD term on h₁ (the official `dhkd` run has none;
    add a `kd` term to try one). This term owns h₂ (model surgery without editing the model): it
    taps the input of the student's classifier (`feature="fc:input"`, i.e. the pooled, flattened
    embedding h₁ sees) and builds h₂ from the dry run's feature size; h₂ is optimised and
    checkpointed with the student.

    Confirmed against the official code: h₂ reads the same pooled feature as h₁ (`fc2(x)` beside
    `fc(x)` in `models/resnet.py`); CIFAR-100 uses the non-linear h₂ (`--nonlinear`:
    Linear(d, 200) → Dropout(0.1) → BatchNorm1d → ReLU → Linear(200, C)), γ = 1, α = 1, τ = 2;
    ImageNet (ResNet-34 → ResNet-18) a linear h₂, γ = 1, α = 0.1, τ = 2. Not reproduced: the
    README's CIFAR-100 command also passes `--ga`, a PCGrad-style projection of the BinaryKL
    gradient against the CE gradient over all parameters (`helper/optimizer.py`), which needs one
    backward pass per loss and does not fit a per-step loss term (it is off by default in the
    code, and the ImageNet loop has none). The code's σ clamp is not reproduced either (see
    `toolkit.functional.dhkd`).

    When to use: logit distillation where the teacher's raw logits (not just their softmax)
    carry information, with a student whose classifier input can be tapped. Reported: better than
    KD and DKD on CIFAR-100 and ImageNet (the paper's tables; not reproduced here). Needs a teacher
    predicting the same classes; the aux head costs one extra linear layer (or small MLP).

    Args:
        temperature: τ > 0 of BinaryKL-Norm (paper: 2).
        head: "linear" (ImageNet) or "mlp" (CIFAR-100: 200 hidden units, dropout 0.1).
        hidden, dropout: the "mlp" head's width and dropout (200, 0.1).
        feature: student tap path of the feature h₂ reads; default "fc:input", the classifier's
            input (`fc` in the toolkit's CIFAR nets and convnet; in timm models `fc`, `head`,
            `head.fc` or `classifier`: give e.g. "head:input").
            4-D maps are average-pooled, token sequences read at the first token.
        loss: "binary_kl_norm" (DHKD) or "binary_kl" (the plain per-class Bernoulli KL, the
            paper's ablation).
    """

    needs_teacher = True
    needs_target = False

    def __init__(
        self,
        temperature: float = 2.0,
        head: str = "linear",
        hidden: int = 200,
        dropout: float = 0.1,
        feature: str = "fc:input",
        loss: str = "binary_kl_norm",
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        if head not in HEADS:
            raise ValueError(
                f"dhkd: head must be one of {HEADS} (CIFAR-100: 'mlp', ImageNet: 'linear'), got {head!r}"
            )
        if loss not in LOSSES:
            raise ValueError(f"dhkd: loss must be one of {tuple(LOSSES)}, got {loss!r}")
        if int(hidden) < 1:
            raise ValueError(f"dhkd: hidden must be >= 1, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dhkd: dropout must be in [0, 1), got {dropout}")
        self.temperature = float(temperature)
        self.head = head
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.feature = check_path(feature, "feature", "dhkd")
        self.loss = loss
        self.student_features = (self.feature,)
        self.heads = HeadSet()

    def setup(self, example: Step) -> None:
        f = feature_at(example.student.features, self.feature, "student", "dhkd")
        if f.dim() not in (2, 3, 4) or f.shape[0] != example.student.logits.shape[0]:
            raise ValueError(
                f"dhkd: the student feature {self.feature!r} has shape {tuple(f.shape)}; the auxiliary head needs "
                "one (B, D), (B, N, D) or (B, C, H, W) feature per sample, such as the classifier's input 'fc:input'"
            )
        self.heads.ensure(
            "aux", f, example.student.logits.shape[-1], self.head, hidden=self.hidden, dropout=self.dropout
        )

    def aux_logits(self, feature: Tensor) -> Tensor:
        """h₂(f): the auxiliary head's logits."""
        return self.heads["aux"](feature)

    def forward(self, step: Step) -> Tensor:
        if "aux" not in self.heads:
            raise RuntimeError(
                "dhkd's auxiliary head is not built yet: the module's dry run (prepare) did not run"
            )
        f = feature_at(step.student.features, self.feature, "student", "dhkd")
        return LOSSES[self.loss](self.aux_logits(f), step.teacher.logits, self.temperature, reduction="none")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, head={self.head!r}, feature={self.feature!r}, loss={self.loss!r}"
