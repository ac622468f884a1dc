"""Random-teacher distillation as a loss term that owns its frozen random teacher; maths in
`toolkit.functional.random_teacher`."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.distill.teacher import Teacher
from toolkit.functional._reduce import check_temperature
from toolkit.functional.random_teacher import random_teacher_loss
from toolkit.models.output import forward_output, unwrap
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


class DINOHead(nn.Module):
    """The DINO projection head: MLP (Linear + GELU per hidden layer) → linear bottleneck →
    L2-normalisation → weight-normalised linear layer to `out_dim` outputs (no bias).

    As dinopl's `DINOHead` (`hidden_dims=[2048, 2048]`, `l2bot_dim=256`, `out_dim=65536`, GELU,
    no BatchNorm; L2-bottleneck config `lb/fn/wn/l`: linear bottleneck, feature normalisation,
    weight-normalised linear). The weight norm's gain g starts at 1 and is trained
    (`wn_freeze_epochs = 0` in the random-teacher config). Weights of the MLP and bottleneck are
    drawn from a truncated normal (std 0.02) with zero biases, as in DINO.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dims: Sequence[int] = (2048, 2048),
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden_dims:
            layers += [nn.Linear(d, h), nn.GELU()]
            d = h
        self.mlp = nn.Sequential(*layers)
        self.bottleneck = nn.Linear(d, bottleneck_dim)
        self.weight = nn.Parameter(torch.empty(out_dim, bottleneck_dim))  # direction v of the last layer
        self.gain = nn.Parameter(torch.ones(out_dim))  # its weight-norm gain g
        for m in [*self.mlp, self.bottleneck]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.bottleneck(self.mlp(x)), dim=-1)
        return z @ (self.gain.unsqueeze(-1) * F.normalize(self.weight, dim=-1)).t()


class EncoderWithHead(nn.Module):
    """encoder's penultimate embedding → DINO head: `forward(x)` returns the head's outputs."""

    def __init__(self, encoder: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def embed(self, x: Any) -> Tensor:
        emb = forward_output(self.encoder, x).embedding
        if emb is None:
            raise ValueError("the random teacher's encoder gives no embedding: use a timm-style model")
        return emb

    def forward(self, x: Any) -> Tensor:
        return self.head(self.embed(x))


@register("distiller", "random_teacher")
class RandomTeacherLoss(LossTerm):
    """Distil a frozen, randomly initialised teacher: H(softmax(t/τ_t), softmax(h(s)/τ_s)).

    Sarnthein, Bachmann, Anagnostidis & Hofmann, "Random Teachers are Good Teachers" (ICML 2023);
    follows the official dinopl code (`dinopl/core.py`, `configs/cifar10_distillation_v2.json`).
    The student's penultimate embedding goes through a DINO head (`DINOHead`, owned by this term,
    trained with the student); the teacher is an encoder of the same architecture as the student
    plus its own DINO head, both drawn at random from `seed` and never updated, run in eval mode
    (BatchNorm at its initial statistics) on the same input. No labels are used (`needs_target`
    False) and no trained teacher either (`needs_teacher` False: the module's teacher is not run).

    The teacher is built in `setup` (the module's dry run) from the student's model spec (the same
    constructor under `torch.manual_seed(seed)`; a student given as a module is deep-copied and
    re-initialised with `reset_parameters` under the seed), so it is the same network in every
    process and after a resume. Like `Teacher`, it is neither optimised nor saved; a checksum of
    its weights is saved and checked on load. The student's DINO head is saved with the student.

    When to use: to study or exploit the implicit regularisation of self-distillation, as a
    label-free pre-training of the encoder (evaluate it by probing: `toolkit.callbacks.KNNProbe`
    logs `val/knn_acc` and `val/linear_probe_acc`). Expected effect (paper): the student's
    embeddings probe much better than the random teacher's (CIFAR-10, also CIFAR-100, STL-10,
    TinyImageNet); the student's classifier itself is not trained by this term.

    Args:
        seed: seed of the random teacher (encoder and head).
        out_dim: head outputs K (paper 65536).
        hidden_dims: the head's MLP widths (paper [2048, 2048]).
        bottleneck_dim: the L2 bottleneck (paper 256).
        student_temperature, teacher_temperature: τ_s, τ_t (paper 1 and 1; no centering).
        teacher_model: None (the student's architecture, the paper's setting) or another model spec
            for `toolkit.models.create_model`, with `teacher_model_args`.
    """

    needs_teacher = False
    needs_target = False

    def __init__(
        self,
        seed: int = 0,
        out_dim: int = 65536,
        hidden_dims: Sequence[int] = (2048, 2048),
        bottleneck_dim: int = 256,
        student_temperature: float = 1.0,
        teacher_temperature: float = 1.0,
        teacher_model: str | None = None,
        teacher_model_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_temperature(student_temperature)
        check_temperature(teacher_temperature)
        for name, value in (("out_dim", out_dim), ("bottleneck_dim", bottleneck_dim)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        hidden_dims = [hidden_dims] if isinstance(hidden_dims, int) else list(hidden_dims)
        if any(int(h) != h or h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive integers (e.g. [2048, 2048]), got {hidden_dims}")
        if int(seed) != seed:
            raise ValueError(f"seed must be an integer, got {seed}")
        self.seed = int(seed)
        self.out_dim = int(out_dim)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.bottleneck_dim = int(bottleneck_dim)
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.teacher_model = teacher_model
        self.teacher_model_args = dict(teacher_model_args or {})
        self.head: DINOHead | None = None
        self.teacher: Teacher | None = None
        self._expected_fingerprint: float | None = None

    # -- parts ----------------------------------------------------------------------------
    def _make_head(self, in_dim: int) -> DINOHead:
        return DINOHead(in_dim, self.out_dim, self.hidden_dims, self.bottleneck_dim)

    def _ensure_head(self, in_dim: int, device: torch.device | None = None) -> DINOHead:
        if self.head is None:
            self.head = self._make_head(in_dim).to(device) if device is not None else self._make_head(in_dim)
        elif self.head.in_dim != in_dim:
            raise ValueError(
                f"the student's DINO head was built for embeddings of size {self.head.in_dim}, got {in_dim}"
            )
        return self.head

    def _build_encoder(self, module: Any, example_input: Any) -> nn.Module:
        from toolkit.models.factory import create_model

        num_classes = getattr(module, "num_classes", None)
        if self.teacher_model is not None:
            kw = dict(self.teacher_model_args)
            if isinstance(example_input, Tensor) and example_input.dim() == 4:
                kw.setdefault("in_chans", example_input.shape[1])
            return create_model(self.teacher_model, num_classes=num_classes, **kw)
        spec = getattr(module, "model_spec", None)
        if spec:
            return create_model(spec["name"], **spec["kwargs"])
        model = getattr(module, "model", None)
        if not isinstance(model, nn.Module):
            raise ValueError(
                "random_teacher copies the student's architecture: the module must keep the student in "
                "`self.model`, or set teacher_model to a model spec"
            )
        enc = copy.deepcopy(unwrap(model)).cpu()
        for m in enc.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
        return enc

    def _build_teacher(self, module: Any, example_input: Any) -> Teacher:
        x = example_input.detach().cpu() if isinstance(example_input, Tensor) else example_input
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            encoder = self._build_encoder(module, x).cpu().eval()
            with torch.no_grad():
                emb = forward_output(encoder, x).embedding
            if emb is None:
                raise ValueError("the random teacher's encoder gives no embedding: use a timm-style model")
            net = EncoderWithHead(encoder, self._make_head(emb.shape[-1]))
        return Teacher(net)

    def fingerprint(self) -> float:
        """A checksum of the random teacher's weights (same seed and architecture: same value)."""
        if self.teacher is None:
            raise ValueError("the random teacher is built in setup(): run the module's dry run first")
        net = self.teacher.nets[0]
        return float(sum(t.double().sum() for t in net.state_dict().values() if t.is_floating_point()))

    def setup(self, example: Step) -> None:
        emb = example.student.embedding
        if emb is None:
            raise ValueError(
                "random_teacher needs the student's penultimate embedding (ModelOutput.embedding): use a "
                "timm-style student (forward_features + forward_head(pre_logits=True))"
            )
        self._ensure_head(emb.shape[-1], emb.device)
        if self.teacher is None:
            teacher = self._build_teacher(example.module, example.batch.input)
            device = emb.device
            self.teacher = teacher.to(device)
            self._check_fingerprint()

    def _check_fingerprint(self) -> None:
        if self._expected_fingerprint is not None and self.teacher is not None:
            got = self.fingerprint()
            if got != self._expected_fingerprint:
                raise ValueError(
                    f"the random teacher rebuilt from seed {self.seed} differs from the checkpoint's (weights "
                    f"checksum {got} != {self._expected_fingerprint}): same seed, architecture and torch version needed"
                )

    def teacher_embedding(self, x: Any) -> Tensor:
        """The random teacher encoder's embedding of `x` (for probing the teacher)."""
        if self.teacher is None:
            raise ValueError("the random teacher is built in setup(): run the module's dry run first")
        x = self.teacher.input_transform(x) if self.teacher.input_transform is not None else x
        with torch.no_grad():
            return self.teacher.nets[0].embed(x).float()

    # -- the loss -------------------------------------------------------------------------
    def forward(self, step: Step) -> Tensor:
        emb = step.student.embedding
        if emb is None:
            raise ValueError("random_teacher needs the student's embedding (ModelOutput.embedding)")
        if self.head is None or self.teacher is None:
            raise ValueError(
                "random_teacher is built by the module's dry run (setup); call module.prepare(x) first"
            )
        student = self.head(emb)
        teacher = self.teacher(step.batch.input).logits
        return random_teacher_loss(
            student, teacher, self.student_temperature, self.teacher_temperature, reduction="none"
        )

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "embed_dim": None if self.head is None else self.head.in_dim,
            "teacher_fingerprint": None if self.teacher is None else self.fingerprint(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("embed_dim") is not None:
            self._ensure_head(int(state["embed_dim"]))
        self._expected_fingerprint = state.get("teacher_fingerprint")
        self._check_fingerprint()

    def extra_repr(self) -> str:
        return (
            f"seed={self.seed}, out_dim={self.out_dim}, hidden_dims={self.hidden_dims}, "
            f"bottleneck_dim={self.bottleneck_dim}, student_temperature={self.student_temperature}, "
            f"teacher_temperature={self.teacher_temperature}"
        )
