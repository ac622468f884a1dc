"""k-NN and linear-probe evaluation of a model's embeddings, as a Lightning callback.

Representation-learning methods (self-supervised or label-free distillation such as
`random_teacher`) are judged by how well a frozen encoder's embeddings separate the classes:

- k-NN: each validation embedding takes the majority label of its k nearest training embeddings
  (Euclidean distance, or cosine), ties between labels going to the smallest class index;
- linear probe: a linear classifier (zero-initialised weights and bias) trained with AdamW on the
  training embeddings, in mini-batches in a fixed order, then its validation accuracy.

Follows the Random Teachers code (safelix/dinopl `dinopl/probing.py`: `KNNAnalysis` with a
flat L2 index and the mode of the neighbours' labels, k = 20; `LinearAnalysis`: `nn.Linear`
trained with `AdamW()` defaults, lr 1e-3 and weight decay 1e-2, for `probing_epochs` = 10,
optional standardisation of the embeddings with the training mean and std). Decided here: zero
initialisation (the probe is convex, so its result then depends on nothing random) and no
shuffling, so the probe is deterministic and does not touch the global random state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader

from toolkit.models.output import forward_output
from toolkit.registry import register
from toolkit.types import as_batch

METRICS = ("l2", "cosine")


@torch.no_grad()
def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    k: int,
    num_classes: int,
    metric: str = "l2",
    chunk: int = 1024,
) -> Tensor:
    """Majority label of the k nearest training embeddings for each test embedding (B_test,)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    k = min(k, train_x.shape[0])
    a = train_x.float()
    if metric == "cosine":
        a = F.normalize(a, dim=-1)
    a_sq = a.pow(2).sum(-1)
    preds = []
    for start in range(0, test_x.shape[0], chunk):
        b = test_x[start : start + chunk].float()
        if metric == "cosine":
            dist = -(F.normalize(b, dim=-1) @ a.t())
        else:
            dist = b.pow(2).sum(-1, keepdim=True) - 2 * b @ a.t() + a_sq
        idx = dist.topk(k, dim=-1, largest=False).indices
        votes = F.one_hot(train_y[idx], num_classes).sum(1)
        preds.append(votes.argmax(-1))  # first maximum: ties go to the smallest class index
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    num_classes: int,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    standardize: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train a zero-initialised linear classifier with AdamW on (train_x, train_y), mini-batches
    in order; returns (test predictions, weight (C, D), bias (C,)). Works inside Lightning's
    evaluation loop (which runs under `torch.inference_mode`)."""
    with torch.inference_mode(False), torch.enable_grad():
        train_x, test_x, train_y = train_x.float().clone(), test_x.float().clone(), train_y.clone()
        if standardize:
            mean = train_x.mean(0)
            std = train_x.std(0) if train_x.shape[0] > 1 else torch.ones_like(mean)
            std = torch.where(std < 10 * torch.finfo(std.dtype).eps, torch.ones_like(std), std)  # as sklearn
            train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        weight = torch.zeros(num_classes, train_x.shape[1], device=train_x.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=train_x.device, requires_grad=True)
        opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            for start in range(0, train_x.shape[0], batch_size):
                x, y = train_x[start : start + batch_size], train_y[start : start + batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(x @ weight.t() + bias, y).backward()
                opt.step()
        with torch.no_grad():
            preds = (test_x @ weight.t() + bias).argmax(-1)
    return preds, weight.detach(), bias.detach()


@register("callback", "knn_probe")
class KNNProbe(Callback):
    """Log `val/knn_acc` and `val/linear_probe_acc` of the model's embeddings after validation.

    At the end of a validation epoch (never during the sanity check), every `every_n_epochs`
    epochs and after the last one, the callback embeds the training set and the validation set
    with the current model (eval mode, no grad), then runs the k-NN classifier and the linear
    probe (see the module docstring) and logs both accuracies (to the progress bar's metrics
    too, so `ModelCheckpoint(monitor="val/knn_acc")` works). It needs no labels during training,
    so it evaluates label-free methods such as `random_teacher`.

    Data: the DataModule's training set, read in order without shuffling (`train_set`, or the
    `train_dataloader` given here), and its validation loader (`val_dataloader`). Augmentation,
    if the data set applies it, is drawn under a forked random state (the training stream is
    unchanged). Under DDP every process computes the same probe on the full data.

    Args:
        k: neighbours of the k-NN classifier (dinopl: 20).
        metric: "l2" (dinopl's flat L2 index) or "cosine".
        linear_epochs: epochs of the linear probe; 0 disables it (dinopl: 10).
        linear_lr, linear_weight_decay: AdamW settings (dinopl: the defaults 1e-3 and 1e-2).
        linear_batch_size: its mini-batch size.
        standardize: standardise embeddings with the training mean/std first (dinopl's `normalize`).
        every_n_epochs: probe every this many epochs (and after the last epoch).
        max_train_samples: use at most this many training samples (the first ones, in order).
        embedding_fn: `fn(pl_module, x) -> (B, D)`; default: the penultimate embedding of
            `pl_module.model` (`toolkit.models.forward_output(...).embedding`).
        train_dataloader, val_dataloader: explicit data instead of the DataModule's.
        prefix: the logged names are `{prefix}/knn_acc` and `{prefix}/linear_probe_acc`.
    """

    def __init__(
        self,
        k: int = 20,
        metric: str = "l2",
        linear_epochs: int = 10,
        linear_lr: float = 1e-3,
        linear_weight_decay: float = 1e-2,
        linear_batch_size: int = 256,
        standardize: bool = False,
        every_n_epochs: int = 1,
        max_train_samples: int | None = None,
        embedding_fn: Callable[[Any, Any], Tensor] | None = None,
        train_dataloader: DataLoader | None = None,
        val_dataloader: DataLoader | None = None,
        prefix: str = "val",
    ) -> None:
        super().__init__()
        for name, value in (
            ("k", k),
            ("linear_batch_size", linear_batch_size),
            ("every_n_epochs", every_n_epochs),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value}")
        if int(linear_epochs) != linear_epochs or linear_epochs < 0:
            raise ValueError(
                f"linear_epochs must be an integer >= 0 (0 disables the linear probe), got {linear_epochs}"
            )
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not linear_lr > 0:
            raise ValueError(f"linear_lr must be > 0, got {linear_lr}")
        if not linear_weight_decay >= 0:
            raise ValueError(f"linear_weight_decay must be >= 0, got {linear_weight_decay}")
        if max_train_samples is not None and (
            int(max_train_samples) != max_train_samples or max_train_samples < 1
        ):
            raise ValueError(f"max_train_samples must be None or an integer >= 1, got {max_train_samples}")
        if embedding_fn is not None and not callable(embedding_fn):
            raise TypeError("embedding_fn must be callable as fn(pl_module, x) -> (B, D) embeddings")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/', e.g. 'val'; got {prefix!r}")
        self.k = int(k)
        self.metric = metric
        self.linear_epochs = int(linear_epochs)
        self.linear_lr = float(linear_lr)
        self.linear_weight_decay = float(linear_weight_decay)
        self.linear_batch_size = int(linear_batch_size)
        self.standardize = bool(standardize)
        self.every_n_epochs = int(every_n_epochs)
        self.max_train_samples = None if max_train_samples is None else int(max_train_samples)
        self.embedding_fn = embedding_fn
        self.train_loader = train_dataloader
        self.val_loader = val_dataloader
        self.prefix = prefix
        self.results: list[dict[str, float]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            k=self.k, metric=self.metric, linear_epochs=self.linear_epochs, prefix=self.prefix
        )

    # -- data -----------------------------------------------------------------------------
    def _loaders(self, trainer: L.Trainer) -> tuple[Any, Any]:
        train, val = self.train_loader, self.val_loader
        dm = trainer.datamodule
        if train is None:
            train_set = getattr(dm, "train_set", None) if dm is not None else None
            if train_set is None:
                raise ValueError(
                    f"{type(self).__name__} needs training data: use a toolkit DataModule (it reads its train_set) or give "
                    "train_dataloader=..."
                )
            batch_size = getattr(dm, "eval_batch_size", 256)
            train = DataLoader(
                train_set, batch_size=batch_size, shuffle=False, collate_fn=getattr(dm, "collate_fn", None)
            )
        if val is None:
            if dm is None or not hasattr(dm, "val_dataloader"):
                raise ValueError(
                    f"{type(self).__name__} needs validation data: use a DataModule or give val_dataloader=..."
                )
            val = dm.val_dataloader()
        return train, val

    def _embed(self, pl_module: Any, loader: Any, limit: int | None = None) -> tuple[Tensor, Tensor]:
        xs, ys, n = [], [], 0
        for raw in loader:
            batch = as_batch(raw)
            if batch.target is None:
                raise ValueError(
                    f"{type(self).__name__} needs labelled batches (targets) to probe the embeddings"
                )
            x = pl_module.transfer_batch_to_device(batch, pl_module.device, 0).input
            emb = self._embedding(pl_module, x)
            xs.append(emb.detach().float())
            ys.append(batch.target.to(emb.device).long())
            n += emb.shape[0]
            if limit is not None and n >= limit:
                break
        x, y = torch.cat(xs), torch.cat(ys)
        return (x[:limit], y[:limit]) if limit is not None else (x, y)

    def _embedding(self, pl_module: Any, x: Any) -> Tensor:
        if self.embedding_fn is not None:
            return self.embedding_fn(pl_module, x)
        model = getattr(pl_module, "model", None)
        if model is None:
            raise ValueError(
                f"{type(self).__name__}: the module has no `model`; give embedding_fn=fn(pl_module, x)"
            )
        emb = forward_output(model, x).embedding
        if emb is None:
            raise ValueError(
                f"{type(self).__name__}: the model gives no penultimate embedding (timm-style forward_features/forward_head "
                "needed); give embedding_fn=fn(pl_module, x)"
            )
        return emb.flatten(1)

    # -- the probe ------------------------------------------------------------------------
    def embeddings(self, trainer: L.Trainer, pl_module: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(train_x, train_y, val_x, val_y): the frozen embeddings of the training data (in order,
        at most `max_train_samples`) and of the validation data, computed in eval mode without
        gradients under a forked random state; the module's train/eval mode is restored."""
        train_loader, val_loader = self._loaders(trainer)
        device = pl_module.device
        devices = [device.index or 0] if device.type == "cuda" else []
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                train_x, train_y = self._embed(pl_module, train_loader, self.max_train_samples)
                val_x, val_y = self._embed(pl_module, val_loader)
        finally:
            pl_module.train(was_training)
        return train_x, train_y, val_x, val_y

    def probe(self, trainer: L.Trainer, pl_module: Any) -> dict[str, float]:
        """Embed the data and return {"knn_acc", "linear_probe_acc"} (the latter if enabled)."""
        train_x, train_y, val_x, val_y = self.embeddings(trainer, pl_module)
        num_classes = getattr(pl_module, "num_classes", None) or int(max(train_y.max(), val_y.max())) + 1
        out = {
            "knn_acc": (knn_predict(train_x, train_y, val_x, self.k, num_classes, self.metric) == val_y)
            .float()
            .mean()
            .item()
        }
        if self.linear_epochs:
            preds, _, _ = linear_probe(
                train_x,
                train_y,
                val_x,
                num_classes,
                self.linear_epochs,
                self.linear_lr,
                self.linear_weight_decay,
                self.linear_batch_size,
                self.standardize,
            )
            out["linear_probe_acc"] = (preds == val_y).float().mean().item()
        return out

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs - 1
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        out = self.probe(trainer, pl_module)
        self.results.append({"epoch": epoch, **out})
        for name, value in out.items():
            pl_module.log(f"{self.prefix}/{name}", value, prog_bar=name == "knn_acc")

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"results": [dict(r) for r in self.results]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = [dict(r) for r in state_dict.get("results", [])]
