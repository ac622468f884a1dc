"""LELP as a loss term; maths in `toolkit.functional.lelp`, pre-pass as a recipe stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from toolkit.distill.heads import HeadSet
from toolkit.functional._reduce import check_temperature
from toolkit.functional.lelp import lelp_fit, lelp_loss, lelp_subclass_logits, lelp_within_class_logits
from toolkit.registry import register
from toolkit.terms import LossTerm, Step

STATE_KEYS = ("mean", "directions", "scale")


@register("distiller", "lelp")
class LELPLoss(LossTerm):
    """LELP: KD over pseudo-subclasses found by PCA of the teacher's embeddings in the null space
    of its classifier.

    Loo, Iliopoulos, Hu & Vee, "Linear Projections of Teacher Embeddings for Few-Class
    Distillation" (arXiv 2409.20449). Formula and what is confirmed or decided: see
    `toolkit.functional.lelp` (the paper's full text could not be read here: the null-space
    projection, the per-class PCA, the pseudo-subclasses and the student replicating them are
    confirmed; the construction of the pseudo-subclass logits, the ± split, β and the loss form
    are this implementation's choices).

    The pre-pass (per class: mean, top-k directions and their spread, from the teacher's
    embeddings of the training set) is computed once and kept in the term's state, so it is
    saved in checkpoints and a resumed run does not recompute it. Three ways to get it:
    `artifact="path.pt"` (a file written by `prepass`; the recipe's `lelp` config runs the
    pre-pass as its first stage, OUT/stages/lelp_prepass/, and hands it on with
    `artifact: "stage:lelp_prepass"`), `load_prepass(state)`, or nothing: then it is computed in
    `on_train_start` from the module's teacher and the DataModule's training loader.

    The student gets a linear head (a submodule of the term, trained and saved with the student,
    not used for predictions) from its embedding to the within-class logits (C × 2k); its own class
    logits stay its predictions. Needs a single teacher whose classifier is reachable through
    `get_classifier()` (timm-style and toolkit models) and which gives an embedding, and a student
    that gives one too.

    When to use: binary and few-class tasks, where the teacher's class probabilities carry little
    information (the paper: Amazon Reviews, Sentiment140). Expected effect (paper): competitive
    with or better than the best distillers for binary / few-class problems. Usually mixed with
    cross-entropy (the demonstration: 0.5·CE + 0.5·LELP).

    Args:
        num_directions: k principal directions per class (2k pseudo-subclasses; chosen here: 5).
        beta: sharpness β > 0 of the split along each standardised direction (chosen here: 1).
        temperature: τ > 0 of the KL over pseudo-subclasses (chosen here: 1).
        artifact: path of a saved pre-pass (`torch.save` of `prepass`'s dict), loaded lazily.
    """

    needs_teacher = True
    needs_target = False

    def __init__(
        self,
        num_directions: int = 5,
        beta: float = 1.0,
        temperature: float = 1.0,
        artifact: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_directions, bool) or int(num_directions) != num_directions or num_directions < 1:
            raise ValueError(f"num_directions must be an integer >= 1, got {num_directions!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        check_temperature(temperature)
        self.num_directions = int(num_directions)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.artifact = None if artifact is None else str(artifact)
        self.heads = HeadSet()
        self.state: dict[str, Tensor] | None = None

    # -- the pre-pass ---------------------------------------------------------------------
    @torch.no_grad()
    def prepass(self, teacher: Any, datamodule: Any) -> dict[str, Tensor]:
        """Teacher embeddings of the training set (one pass over `train_dataloader()`), fitted
        into the per-class means, directions and spreads; also kept as this term's state."""
        from toolkit.types import as_batch, to_device_input

        net = self._single_net(teacher)
        weight = net.get_classifier().weight.detach().cpu()
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        embeddings, labels = [], []
        for batch in datamodule.train_dataloader():
            b = as_batch(batch)
            if b.target is None:
                raise ValueError(
                    "the LELP pre-pass needs labelled training data (classes define the subspaces)"
                )
            out = teacher(to_device_input(b.input, device))
            if out.embedding is None:
                raise ValueError("the teacher gives no embedding: LELP needs a timm-style or toolkit model")
            embeddings.append(out.embedding.float().cpu())
            labels.append(b.target.cpu())
        state = lelp_fit(torch.cat(embeddings), torch.cat(labels), weight, self.num_directions)
        self.load_prepass(state)
        return state

    def load_prepass(self, state: dict[str, Tensor]) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"a LELP pre-pass needs {STATE_KEYS}, missing {missing}")
        k = state["directions"].shape[1]
        if k != self.num_directions:
            raise ValueError(
                f"the pre-pass has {k} directions per class but num_directions={self.num_directions}: "
                "compute it again with this setting, or set num_directions to match"
            )
        self.state = {key: state[key].detach().float().cpu() for key in STATE_KEYS}

    def _ensure_state(self) -> dict[str, Tensor]:
        if self.state is None and self.artifact is not None:
            path = Path(self.artifact)
            if not path.exists():
                raise FileNotFoundError(
                    f"LELP pre-pass artifact {path} does not exist: run the pre-pass stage first"
                )
            self.load_prepass(torch.load(path, map_location="cpu", weights_only=True))
        if self.state is None:
            raise RuntimeError(
                "LELP has no pre-pass: give artifact=PATH, call prepass(teacher, datamodule) or load_prepass, "
                "or train inside a Trainer (it is computed in on_train_start)"
            )
        return self.state

    @staticmethod
    def _single_net(teacher: Any):
        nets = getattr(teacher, "nets", [teacher])
        if len(nets) != 1:
            raise ValueError("LELP needs a single teacher network (its classifier defines the null space)")
        net = nets[0]
        if not callable(getattr(net, "get_classifier", None)):
            raise ValueError(
                "LELP reads the teacher's classifier weight through get_classifier() (timm-style and toolkit models)"
            )
        return net

    # -- lifecycle ------------------------------------------------------------------------
    def setup(self, example: Step) -> None:
        if example.student.embedding is None:
            raise ValueError("LELP needs the student's embedding: use a timm-style or toolkit student")
        c = example.student.logits.shape[-1]
        self.heads.ensure("within", example.student.embedding, c * 2 * self.num_directions)
        if self.artifact is not None:
            self._ensure_state()

    def on_train_start(self, module: Any) -> None:
        if self.state is None and self.artifact is None:
            self.prepass(module.teacher, module.trainer.datamodule)

    def forward(self, step: Step) -> Tensor:
        state = self._ensure_state()
        if step.teacher.embedding is None or step.student.embedding is None:
            raise ValueError("LELP needs the teacher's and the student's embeddings")
        c = step.teacher.logits.shape[-1]
        if state["mean"].shape[0] != c:
            raise ValueError(
                f"the pre-pass has {state['mean'].shape[0]} classes but the teacher predicts {c}"
            )
        within_t = lelp_within_class_logits(
            step.teacher.embedding, state["mean"], state["directions"], state["scale"], self.beta
        )
        teacher_sub = lelp_subclass_logits(step.teacher.logits, within_t)
        within_s = self.heads["within"](step.student.embedding).view(step.student.logits.shape[0], c, -1)
        student_sub = lelp_subclass_logits(step.student.logits, within_s)
        return lelp_loss(student_sub, teacher_sub, self.temperature, reduction="none")

    # -- checkpoints ----------------------------------------------------------------------
    def get_extra_state(self) -> Any:
        return {"prepass": None if self.state is None else dict(self.state)}

    def set_extra_state(self, state: Any) -> None:
        if state.get("prepass") is not None:
            self.load_prepass(state["prepass"])

    def extra_repr(self) -> str:
        return f"num_directions={self.num_directions}, beta={self.beta}, temperature={self.temperature}"
