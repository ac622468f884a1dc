"""TGeo-KD as a loss term with its own bilevel-trained fusion ratio network; maths in
`toolkit.functional.tgeo_kd`, look-ahead in `toolkit.meta`."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from toolkit.functional._reduce import check_temperature
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.functional.tgeo_kd import FEATURE_BLOCKS, tgeo_features, tgeo_kd_loss
from toolkit.meta import apply_meta_gradients, average_across_processes, lookahead_hypergradient
from toolkit.models.output import as_model_output, unwrap
from toolkit.registry import register
from toolkit.terms import LossTerm, Step
from toolkit.types import as_batch

META_SOURCES = ("val", "train")


class FusionRatioNet(nn.Module):
    """The fusion ratio network g_ω: Linear(9C, hidden) → ReLU → Linear(hidden, 1), α = σ(g_ω(r)),
    and the teacher's per-class mean prediction T̄ (running sums and counts over training samples)."""

    def __init__(self, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(FEATURE_BLOCKS * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        self.register_buffer("class_sums", torch.zeros(num_classes, num_classes))
        self.register_buffer("class_counts", torch.zeros(num_classes))
        # True once T̄ comes from a full pass over the training data (then no more online updates)
        self.register_buffer("means_final", torch.zeros((), dtype=torch.bool))

    def class_means(self) -> Tensor:
        return self.class_sums / self.class_counts.clamp_min(1).unsqueeze(-1)

    @torch.no_grad()
    def observe(self, teacher_logits: Tensor, target: Tensor) -> None:
        probs = torch.softmax(teacher_logits.float(), dim=-1)
        self.class_sums.index_add_(0, target, probs.to(self.class_sums.dtype))
        self.class_counts.index_add_(0, target, torch.ones_like(target, dtype=self.class_counts.dtype))

    def forward(self, features: Tensor) -> Tensor:
        """α (B,) in (0, 1)."""
        return torch.sigmoid(self.net(features)).squeeze(-1)


@register("distiller", "tgeo_kd")
class TGeoKDLoss(LossTerm):
    """TGeo-KD: α_i·τ²·KL(p_t^τ ‖ p_s^τ) + (1 − α_i)·CE(s_i, y_i) with α_i learnt per sample.

    Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry for Knowledge
    Distillation" (ICLR 2024). A fusion ratio network α_i = σ(g_ω(r_i)) reads the trilateral
    geometry of the student prediction S, the teacher prediction T, the ground truth G and the
    teacher's class-mean prediction T̄ (features: `toolkit.functional.tgeo_kd.tgeo_features`) and
    decides, sample by sample, how much to learn from the teacher and how much from the label. The
    term replaces the CE + KD pair: list it alone (weight 1).

    How ω is optimised (bilevel, one-step look-ahead, inside `forward` at every training step):
        1. θ'(ω) = θ − η·∇_θ mean_i L_i(θ, ω) on the training batch (a virtual SGD step of the
           student, `toolkit.meta.lookahead_hypergradient`, run with `torch.func.functional_call`;
           the student's weights, `.grad` and BatchNorm statistics are not touched);
        2. the outer loss CE(f(x_val; θ'), y_val) on a held-out batch (`meta_source="val"`, drawn
           in order from the DataModule's validation loader) or on the same training batch
           (`meta_source="train"`);
        3. ∂outer/∂ω → the term's own Adam (`meta_lr`, `meta_weight_decay`) steps ω;
        4. the returned loss uses α from the updated ω, detached: the student's optimiser trains
           θ only, never ω (the ratio network's parameters have `requires_grad=False`, so neither
           the main optimiser nor DDP sees a gradient for them).
    η is `inner_lr`, by default the student optimiser's current learning rate (Meta-Weight-Net's
    choice). The ratio network, T̄, the meta-optimiser's state and the step counters are in the
    module's `state_dict` (checkpointed; a resumed run continues exactly). T̄ is computed in
    `on_train_start` by a pass of the frozen teacher over the DataModule's training loader
    (all-reduced under DDP); without one it is accumulated from the training batches seen so far.

    Confirmed from the paper (abstract) and the official code (github.com/Chengming0501/TGeo-KD,
    see `toolkit.functional.tgeo_kd`): the fused loss, the inputs, the ratio network's shape, the
    bilevel scheme with the upper level on a validation split and the ground-truth loss as its
    objective (`src/fusion_ratio_bilevel.py`: "upper level optimization: train MLP network with
    fusion ratio (validation set)", a CE of the student on the validation data). The paper's
    method section and appendix (meta learning rate, size of the meta split) could not be read
    here; the official scripts do not compute a look-ahead hypergradient (`src/fusion_ratio_bilevel.py`
    computes α under `no_grad`, so its upper step gets no gradient; `HIL/control_kd_bilevel.py`
    fits α directly to the fused loss on the validation data; the CIFAR-100 code trains the ratio
    network jointly with the student on the training loss). Decided here: the standard one-step
    look-ahead hypergradient (Ren et al. 2018; Shu et al. 2019), Adam 1e-3 for ω, one meta step
    per training step.

    When to use: a KD run where the teacher is wrong or unreliable on part of the data (noisy
    labels, a weak or domain-shifted teacher), with a held-out split to spare. Expected effect
    (paper): small, consistent gains over constant-α KD and other re-weighting methods (CIFAR-100,
    ImageNet, attack detection, CTR prediction). Cost: about 3× a KD step (look-ahead forward,
    double backward, a forward on the meta batch).

    Args:
        temperature: τ > 0 of the KD part (official CIFAR-100 default 1).
        hidden: width of the ratio network's hidden layer (official: 128).
        meta_lr: learning rate of the ratio network's Adam (decided: 1e-3).
        meta_weight_decay: its weight decay (0; the tabular official code used 0.05 at lr 0.1).
        inner_lr: η of the virtual step; None = the student optimiser's current learning rate.
        meta_source: "val" (the paper: a held-out validation split) or "train" (the same batch;
            no extra data, weaker signal).
        meta_every: one meta step every this many training steps (1 = every step, the paper's
            alternating scheme).
    """

    needs_teacher = True
    needs_target = True

    def __init__(
        self,
        temperature: float = 1.0,
        hidden: int = 128,
        meta_lr: float = 1e-3,
        meta_weight_decay: float = 0.0,
        inner_lr: float | None = None,
        meta_source: str = "val",
        meta_every: int = 1,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        if int(hidden) != hidden or hidden < 1:
            raise ValueError(f"hidden must be a positive integer (the ratio network's width), got {hidden}")
        if not meta_lr > 0:
            raise ValueError(f"meta_lr must be > 0, got {meta_lr}; the paper's code uses Adam, e.g. 1e-3")
        if not meta_weight_decay >= 0:
            raise ValueError(f"meta_weight_decay must be >= 0, got {meta_weight_decay}")
        if inner_lr is not None and not inner_lr >= 0:
            raise ValueError(
                f"inner_lr must be >= 0 or None (None = the student's learning rate), got {inner_lr}"
            )
        if meta_source not in META_SOURCES:
            raise ValueError(
                f"meta_source must be one of {META_SOURCES} ('val': a held-out batch, as the paper), got {meta_source!r}"
            )
        if int(meta_every) != meta_every or meta_every < 1:
            raise ValueError(f"meta_every must be an integer >= 1, got {meta_every}")
        self.temperature = float(temperature)
        self.hidden = int(hidden)
        self.meta_lr = float(meta_lr)
        self.meta_weight_decay = float(meta_weight_decay)
        self.inner_lr = None if inner_lr is None else float(inner_lr)
        self.meta_source = meta_source
        self.meta_every = int(meta_every)
        self.ratio_net: FusionRatioNet | None = None
        self.meta_steps = 0  # meta updates done (also the position in the meta loader)
        self.calls = 0  # training forwards seen
        self._meta_opt: torch.optim.Optimizer | None = None
        self._pending_opt_state: dict[str, Any] | None = None
        self._meta_iter: Any = None
        self._meta_loader: Any = None

    # -- parts ----------------------------------------------------------------------------
    def _ensure(self, num_classes: int, device: torch.device | None = None) -> FusionRatioNet:
        if self.ratio_net is None:
            net = FusionRatioNet(num_classes, self.hidden)
            net.requires_grad_(False)  # optimised by the meta step only (see the class docstring)
            self.ratio_net = net.to(device) if device is not None else net
        elif self.ratio_net.num_classes != num_classes:
            raise ValueError(
                f"the fusion ratio network was built for {self.ratio_net.num_classes} classes, got {num_classes}"
            )
        return self.ratio_net

    def _optimizer(self) -> torch.optim.Optimizer:
        if self._meta_opt is None:
            self._meta_opt = torch.optim.Adam(
                self.ratio_net.net.parameters(), lr=self.meta_lr, weight_decay=self.meta_weight_decay
            )
            if self._pending_opt_state is not None:
                self._meta_opt.load_state_dict(self._pending_opt_state)  # casts to the params' device
                self._pending_opt_state = None
        return self._meta_opt

    def setup(self, example: Step) -> None:
        self._ensure(example.student.logits.shape[-1], example.student.logits.device)

    # -- lifecycle ------------------------------------------------------------------------
    def on_train_start(self, module: Any) -> None:
        self._meta_iter = None  # the meta loader restarts at position meta_steps (exact resume)
        net = self.ratio_net
        if net is None or bool(net.means_final):
            return
        teacher = getattr(module, "teacher", None)
        dm = getattr(getattr(module, "trainer", None), "datamodule", None)
        if teacher is None or dm is None or not hasattr(dm, "train_dataloader"):
            return  # T̄ is accumulated online from the training batches instead
        sums, counts = torch.zeros_like(net.class_sums), torch.zeros_like(net.class_counts)
        with _fork_rng(module.device), torch.no_grad():
            for raw in dm.train_dataloader():
                batch = _to_device(as_batch(raw), module.device)
                probs = torch.softmax(teacher(batch.input).logits.float(), dim=-1)
                sums.index_add_(0, batch.target, probs)
                counts.index_add_(0, batch.target, torch.ones_like(batch.target, dtype=counts.dtype))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        net.class_sums.copy_(sums)
        net.class_counts.copy_(counts)
        net.means_final.fill_(True)

    # -- the loss -------------------------------------------------------------------------
    def forward(self, step: Step) -> Tensor:
        s, t, y = step.student.logits, step.teacher.logits, step.target
        net = self._ensure(s.shape[-1], s.device)
        if self.training and not bool(net.means_final):
            net.observe(t, y)
        module = step.module
        if self.training and torch.is_grad_enabled() and module is not None:
            if self.calls % self.meta_every == 0:
                self._meta_step(step, net)
            self.calls += 1
        with torch.no_grad():
            alpha = net(tgeo_features(s.detach(), t, y, net.class_means()))
        _log(module, "train/tgeo_kd/alpha", alpha.mean())
        return tgeo_kd_loss(s, t, y, alpha, self.temperature, reduction="none")

    def _meta_step(self, step: Step, net: FusionRatioNet) -> None:
        module = step.module
        model = getattr(module, "model", None)
        if not isinstance(model, nn.Module):
            raise ValueError(
                "tgeo_kd's meta step runs the student functionally: the LightningModule must keep it in "
                "`self.model` (as ClassificationModule/DistillationModule do)"
            )
        student = unwrap(model)
        x, t, y = step.batch.input, step.teacher.logits, step.target
        features = tgeo_features(step.student.logits.detach(), t, y, net.class_means())
        x_meta, y_meta = (x, y) if self.meta_source == "train" else self._meta_batch(module)
        lr = self.inner_lr if self.inner_lr is not None else _current_lr(module)
        meta = {k: p.detach().clone().requires_grad_(True) for k, p in net.net.named_parameters()}

        def inner(f):
            alpha = torch.sigmoid(functional_call(net.net, meta, (features,))).squeeze(-1)
            return tgeo_kd_loss(_logits(f, x), t, y, alpha, self.temperature)

        def outer(f):
            return cross_entropy(_logits(f, x_meta), y_meta)

        result = lookahead_hypergradient(student, inner, outer, meta, lr)
        grads = average_across_processes(result.meta_grads)
        apply_meta_gradients(self._optimizer(), dict(net.net.named_parameters()), grads)
        self.meta_steps += 1
        _log(module, "train/tgeo_kd/meta_loss", result.outer_loss)

    def _meta_batch(self, module: Any) -> tuple[Any, Tensor]:
        if self._meta_iter is None:
            loader = _validation_loader(module)
            n = len(loader)
            if n == 0:
                raise ValueError("tgeo_kd: the validation loader is empty; give a validation split")
            self._meta_loader = loader
            with _fork_rng(module.device):
                self._meta_iter = iter(loader)
                for _ in range(self.meta_steps % n):  # resume at the same meta batch
                    next(self._meta_iter)
        with _fork_rng(module.device):
            try:
                raw = next(self._meta_iter)
            except StopIteration:
                self._meta_iter = iter(self._meta_loader)
                raw = next(self._meta_iter)
        batch = _to_device(as_batch(raw), module.device)
        if batch.target is None:
            raise ValueError("tgeo_kd: validation batches need targets for the meta objective")
        return batch.input, batch.target

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        opt = self._meta_opt.state_dict() if self._meta_opt is not None else self._pending_opt_state
        return {
            "num_classes": None if self.ratio_net is None else self.ratio_net.num_classes,
            "hidden": self.hidden,
            "meta_steps": self.meta_steps,
            "calls": self.calls,
            "optimizer": opt,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("hidden", self.hidden) != self.hidden:
            raise ValueError(
                f"the checkpoint's fusion ratio network has hidden={state['hidden']}, this term hidden={self.hidden}"
            )
        if state.get("num_classes") is not None:
            self._ensure(state["num_classes"])
        self.meta_steps = int(state.get("meta_steps", 0))
        self.calls = int(state.get("calls", 0))
        self._pending_opt_state = state.get("optimizer")
        self._meta_opt = None
        self._meta_iter = None

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, hidden={self.hidden}, meta_lr={self.meta_lr}, "
            f"meta_source={self.meta_source!r}, meta_every={self.meta_every}"
        )


def _logits(f, x: Any) -> Tensor:
    out = f(**x) if isinstance(x, Mapping) else f(x)
    return as_model_output(out).logits


def _current_lr(module: Any) -> float:
    trainer = getattr(module, "_trainer", None)
    optimizers = getattr(trainer, "optimizers", None) if trainer is not None else None
    if not optimizers:
        raise ValueError(
            "tgeo_kd needs the look-ahead step size: set inner_lr, or train under a Trainer whose optimiser "
            "gives the current learning rate"
        )
    return float(optimizers[0].param_groups[0]["lr"])


def _validation_loader(module: Any):
    trainer = getattr(module, "_trainer", None)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    if dm is not None and hasattr(dm, "val_dataloader"):
        if getattr(dm, "val_set", None) is not None and dm.val_set is getattr(dm, "test_set", None):
            raise ValueError(
                "tgeo_kd (meta_source='val'): the DataModule validates on the test split (val_split=0); hold "
                "out a validation split (e.g. --data.val_split 5000) or use meta_source='train'"
            )
        return dm.val_dataloader()
    loaders = getattr(trainer, "val_dataloaders", None) if trainer is not None else None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ValueError(
            "tgeo_kd (meta_source='val') needs held-out data: train with a DataModule that has a validation "
            "split, or set meta_source='train'"
        )
    return loaders


def _to_device(batch, device: torch.device):
    from lightning.pytorch.utilities import move_data_to_device

    return move_data_to_device(batch, device)


def _fork_rng(device: torch.device):
    """Data drawn outside the training loop must not shift the global random stream (exact resume)."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device.index or 0])
    return torch.random.fork_rng(devices=[]) if device.type == "cpu" else contextlib.nullcontext()


def _log(module: Any, name: str, value: Tensor) -> None:
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.training:
        module.log(name, value.detach().float(), batch_size=1)
