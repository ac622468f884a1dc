"""SAF, sharpness-aware training for free: the trajectory loss as a loss-bus term, attached by a callback.

    trainer = L.Trainer(callbacks=[SAF(weight=0.3, temperature=5, start_epoch=5, minus_epoch=3)])
    python -m recipes.train --callbacks saf --callbacks.saf.start_epoch 5

Maths in `toolkit.functional.saf`; the per-sample memory is `toolkit.distill.memory.SampleMemory`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from toolkit.distill.memory import MEMORY_DTYPES, SampleMemory
from toolkit.functional._reduce import check_temperature
from toolkit.functional.saf import saf_slots, saf_trajectory_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step
from toolkit.types import require_index


class SAFTerm(LossTerm):
    """Per-sample trajectory loss τ²·KL(softmax(ŷ^(e−Ẽ)/τ) ‖ softmax(f_θ(x)/τ)) (see `toolkit.functional.saf`).

    Keeps, per sample index, the training logits of the last Ẽ+1 epochs (`SampleMemory` rows of
    (Ẽ+1, C) logits plus the epoch each slot was written in, so a slot is used only if it holds
    exactly epoch e − Ẽ; samples without such a record contribute 0). Every training step writes
    the current logits (detached) into slot e mod (Ẽ+1). The loss is non-zero only in the epochs
    e with start_epoch < e < end_epoch (0-based, as the official code). Memory state is saved in
    checkpoints through the module (resume continues exactly) and gathered across DDP ranks.
    """

    needs_index = True
    needs_target = False

    def __init__(
        self,
        temperature: float = 5.0,
        start_epoch: int = 5,
        minus_epoch: int = 3,
        end_epoch: int | None = None,
        memory_dtype: str = "float32",
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        for name, value, low in (("start_epoch", start_epoch, 0), ("minus_epoch", minus_epoch, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        if end_epoch is not None and (int(end_epoch) != end_epoch or end_epoch <= start_epoch + 1):
            raise ValueError(
                f"end_epoch must be None or an integer > start_epoch + 1 = {start_epoch + 1} "
                f"(the loss applies in start_epoch < epoch < end_epoch), got {end_epoch}"
            )
        if memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {', '.join(MEMORY_DTYPES)}, got {memory_dtype!r}")
        self.temperature = float(temperature)
        self.start_epoch = int(start_epoch)
        self.minus_epoch = int(minus_epoch)
        self.end_epoch = None if end_epoch is None else int(end_epoch)
        self.memory_dtype = memory_dtype
        self.logits_memory: SampleMemory | None = None
        self.epoch_memory: SampleMemory | None = None

    def active(self, epoch: int) -> bool:
        """Whether the loss applies in this (0-based) epoch."""
        return epoch > self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def memories(self, num_classes: int) -> tuple[SampleMemory, SampleMemory]:
        slots = self.minus_epoch + 1
        if self.logits_memory is None:
            self.logits_memory = SampleMemory((slots, num_classes), getattr(torch, self.memory_dtype))
            # the epoch + 1 each slot was written in (0: never)
            self.epoch_memory = SampleMemory(slots, torch.int64)
        elif self.logits_memory.row_shape != (slots, num_classes):
            raise ValueError(
                f"saf keeps rows of {self.logits_memory.row_shape[1]} classes but the logits have {num_classes}"
            )
        assert self.epoch_memory is not None
        return self.logits_memory, self.epoch_memory

    def setup(self, example: Step) -> None:
        self.memories(example.student.logits.shape[-1])

    def past(self, index: Tensor, num_classes: int, epoch: int) -> tuple[Tensor, Tensor]:
        """(logits recorded Ẽ epochs before `epoch`, whether they exist) for these samples."""
        logits_mem, epoch_mem = self.memories(num_classes)
        _, read_slot = saf_slots(epoch, self.minus_epoch)
        rows, _ = logits_mem.read(index)
        stamps, _ = epoch_mem.read(index)
        wanted = epoch - self.minus_epoch  # stamps hold epoch + 1; 0 means never written
        valid = stamps[:, read_slot] == wanted + 1
        if wanted < 0:
            valid = torch.zeros_like(valid)
        return rows[:, read_slot].float(), valid

    def forward(self, step: Step) -> Tensor:
        index = require_index(step.batch, "saf")
        logits = step.student.logits
        if logits.dim() != 2:
            raise ValueError(f"saf needs (B, C) class logits, got shape {tuple(logits.shape)}")
        epoch = step.progress.epoch
        num_classes = logits.shape[-1]
        if self.active(epoch):
            past, valid = self.past(index, num_classes, epoch)
            loss = saf_trajectory_loss(logits, past, self.temperature, valid=valid, reduction="none")
        else:
            loss = logits.new_zeros(logits.shape[0], dtype=torch.float32)
        if self.training:
            self.record(index, logits, epoch)
        return loss

    @torch.no_grad()
    def record(self, index: Tensor, logits: Tensor, epoch: int) -> None:
        """Store these samples' logits as the outputs of `epoch`."""
        logits_mem, epoch_mem = self.memories(logits.shape[-1])
        write_slot, _ = saf_slots(epoch, self.minus_epoch)
        rows, _ = logits_mem.read(index)
        stamps, _ = epoch_mem.read(index)
        rows, stamps = rows.clone(), stamps.clone()
        rows[:, write_slot] = logits.detach().to(rows.dtype)
        stamps[:, write_slot] = epoch + 1
        logits_mem.write(index, rows)
        epoch_mem.write(index, stamps)

    def get_extra_state(self) -> dict[str, Any]:
        mem = self.logits_memory
        return {"num_classes": None if mem is None else mem.row_shape[1]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("num_classes") is not None:
            self.memories(int(state["num_classes"]))

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, start_epoch={self.start_epoch}, minus_epoch={self.minus_epoch}, "
            f"end_epoch={self.end_epoch}"
        )


@register("callback", "saf")
class SAF(Callback):
    """Sharpness-Aware Training for Free: L = (the module's loss) + λ·mean_i L_tra,i.

    Du et al., NeurIPS 2022 (arXiv 2205.14083). The trajectory loss L_tra,i =
    τ²·KL(softmax(ŷ_i^(e−Ẽ)/τ) ‖ softmax(f_θ(x_i)/τ)) compares the current outputs with those the
    network gave the same sample Ẽ epochs earlier; minimising it avoids sudden loss drops into
    sharp minima, which the paper shows reduces sharpness like SAM at almost no extra compute (an
    N×(Ẽ+1)×C memory of past logits instead of a second forward/backward pass). Paper: better
    ImageNet accuracy than SAM at the base optimiser's cost.

    At `setup` it registers a `SAFTerm` named `term_name` on the module's loss bus with weight λ
    (so it is logged as `train/loss/saf`); a module without a bus is an error at setup. Needs
    sample indices in the batches (the toolkit's DataModules give them). The term, its memory and
    therefore the callback's effect are saved in the module's checkpoints.

    Args:
        weight: λ (README `--reinforce`: 0.3 for SAF); a number or a schedule dict.
        temperature: τ (README: 5).
        start_epoch: E_start; the loss applies in 0-based epochs e > start_epoch (README: 5, or
            30% of the epochs).
        minus_epoch: Ẽ, how many epochs back the reference outputs are (README: 2 or 3; code: 3).
        end_epoch: the loss stops at this epoch (exclusive); None: never.
        memory_dtype: "float32", "float16" or "bfloat16" storage of the logit memory.
        term_name: name of the term on the bus.
    """

    def __init__(
        self,
        weight: float | dict = 0.3,
        temperature: float = 5.0,
        start_epoch: int = 5,
        minus_epoch: int = 3,
        end_epoch: int | None = None,
        memory_dtype: str = "float32",
        term_name: str = "saf",
    ) -> None:
        super().__init__()
        if isinstance(weight, (int, float)) and not weight >= 0:
            raise ValueError(f"weight (λ) must be >= 0, got {weight}")
        if not isinstance(term_name, str) or not term_name:
            raise ValueError(f"term_name must be a non-empty string, got {term_name!r}")
        self.weight = weight
        self.term_kwargs = dict(
            temperature=temperature,
            start_epoch=start_epoch,
            minus_epoch=minus_epoch,
            end_epoch=end_epoch,
            memory_dtype=memory_dtype,
        )
        SAFTerm(**self.term_kwargs)  # validates the arguments now, not at setup
        self.term_name = term_name

    @property
    def state_key(self) -> str:
        return self._generate_state_key(term_name=self.term_name)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "add_term", None)):
            raise TypeError(
                f"saf changes the loss, so it needs a module with a loss bus: {type(pl_module).__name__} has none. "
                "Use a toolkit module (ClassificationModule, DistillationModule) or add toolkit.modules.LossBus to "
                "your LightningModule's bases and return self.loss_from(logits, batch) from training_step"
            )
        existing = pl_module.terms.get(self.term_name)
        if existing is not None:
            if not isinstance(existing, SAFTerm):
                raise ValueError(
                    f"saf: the module already has a loss term named {self.term_name!r} "
                    f"({type(existing).__name__}); give term_name=... another name"
                )
            return  # already attached (a second fit, or a module restored with it)
        # Every stage adds the term, so checkpoints written with it load in validate/test too.
        pl_module.add_term(self.term_name, SAFTerm(**self.term_kwargs), self.weight)
        max_epochs = trainer.max_epochs
        start = self.term_kwargs["start_epoch"]
        if stage == "fit" and max_epochs is not None and 0 < max_epochs <= start + 1:
            rank_zero_warn(
                f"saf: the trajectory loss applies from epoch {start + 1} (0-based, epochs > start_epoch) but the "
                f"run has {max_epochs} epochs, so it never applies; lower start_epoch"
            )
