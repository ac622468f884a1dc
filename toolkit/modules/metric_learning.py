"""`EmbeddingModule`: a backbone from the model factory trained as an embedding with
metric-learning loss terms (`multi_similarity`, `soft_infonce`, `one_to_k_contrastive`), scored by
Recall@K.

    module = EmbeddingModule("convnet", in_chans=1, embedding_dim=64, loss="multi_similarity")

The embedding is the backbone's pooled penultimate features (`embedding_dim=None`: the classifier
is removed) or a linear embedding layer of `embedding_dim` outputs (the model's classifier,
resized). Terms read it as `step.student.embedding`. It reuses `ClassificationModule` (factory,
loss bus, optimisers, checkpointed RNG state); evaluation gathers the embeddings of the whole
validation/test split (across DDP ranks) and logs `val/recall@K` / `test/recall@K`, leave-one-out
retrieval within the split (`toolkit.functional.recall_at_k`). Train with class-balanced P×K
batches (DataModule option `samples_per_class`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from toolkit.functional.retrieval import recall_at_k
from toolkit.models.factory import create_model
from toolkit.models.output import forward_output, unwrap
from toolkit.modules.classification import ClassificationModule, record_hparams
from toolkit.modules.config import build_terms
from toolkit.types import Batch, ModelOutput, as_batch


class RecallAtK(torchmetrics.Metric):
    """Leave-one-out Recall@K over every embedding seen (states concatenated across processes)."""

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8), normalize: bool = True) -> None:
        super().__init__()
        self.ks, self.normalize = tuple(int(k) for k in ks), normalize
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(labels.detach().long())

    def compute(self) -> dict[str, Tensor]:
        emb, lab = dim_zero_cat(self.embeddings), dim_zero_cat(self.labels)
        ks = [k for k in self.ks if k < len(lab)]
        values = recall_at_k(emb, lab, ks, self.normalize)
        return {f"recall@{k}": v for k, v in zip(ks, values)}


def drop_classifier(model: nn.Module) -> nn.Module:
    """Replace the model's classifier by the identity (its output becomes the pooled embedding)."""
    core = unwrap(model)
    if hasattr(core, "reset_classifier") and not hasattr(core, "fc"):
        core.reset_classifier(0)  # timm
        return model
    classifier = core.get_classifier() if hasattr(core, "get_classifier") else None
    for name, child in core.named_children():
        if child is classifier:
            setattr(core, name, nn.Identity())
            core.num_classes = 0
            return model
    raise ValueError(
        f"cannot find the classifier of {type(core).__name__} to remove: give embedding_dim (the classifier "
        "becomes the embedding layer) or pass a model whose output is the embedding"
    )


class EmbeddingModule(ClassificationModule):
    """Train an embedding network with metric-learning loss terms; Recall@K metrics.

    Args:
        model: a model spec for `create_model` ("convnet", "resnet8", "timm:NAME") or an
            `nn.Module` whose output is the embedding.
        embedding_dim: size of a linear embedding layer (the model's classifier, resized); None
            uses the pooled penultimate features (classifier removed; specs only).
        loss: terms spec (see `toolkit.modules.config`), e.g. "multi_similarity".
        in_chans, model_kwargs, optimizer, scheduler: as `ClassificationModule`.
        recall_ks: the K of the Recall@K metrics.
    """

    def __init__(
        self,
        model: str | nn.Module,
        embedding_dim: int | None = None,
        loss: Any = "multi_similarity",
        in_chans: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        optimizer: str | Mapping[str, Any] | None = None,
        scheduler: str | Mapping[str, Any] | None = None,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        if embedding_dim is not None and (isinstance(embedding_dim, bool) or embedding_dim < 1):
            raise ValueError(f"embedding_dim must be a positive integer or None, got {embedding_dim!r}")
        if not recall_ks or min(int(k) for k in recall_ks) < 1:
            raise ValueError(f"recall_ks must be positive integers, got {recall_ks!r}")
        self._recall_ks = tuple(int(k) for k in recall_ks)
        if isinstance(model, str):
            net = create_model(
                model, num_classes=embedding_dim or 1, in_chans=in_chans, **dict(model_kwargs or {})
            )
            if embedding_dim is None:
                drop_classifier(net)
        else:
            net = model
        dim = embedding_dim or getattr(unwrap(net), "num_features", None)
        if dim is None:
            raise ValueError(
                "give embedding_dim: the model does not declare its embedding width (num_features)"
            )
        terms = build_terms(loss, default_name="loss")
        super().__init__(net, num_classes=int(dim), loss=None, optimizer=optimizer, scheduler=scheduler)
        record_hparams(
            self,
            model=model,
            embedding_dim=embedding_dim,
            loss=loss,
            in_chans=in_chans,
            model_kwargs=model_kwargs,
            optimizer=optimizer,
            scheduler=scheduler,
            recall_ks=list(self._recall_ks),
        )
        for name, (term, weight) in terms.items():
            self.add_term(name, term, weight)
        self.embedding_dim = int(dim)
        # labels are classes of the data, not of an output layer: no range check against the width
        self.__dict__["_targets_checked"] = True

    def _metrics(self, prefix: str, top_k: int) -> torchmetrics.Metric:
        return RecallAtK(self._recall_ks)

    def forward(self, x: Any) -> Tensor:
        return forward_output(self.model, x).logits

    def student_output(self, batch: Batch) -> ModelOutput:
        out = forward_output(self.model, batch.input)
        features = self._student_taps.pop() if self._student_taps is not None else {}
        return ModelOutput(out.logits, out.logits, features)

    def _eval_step(self, batch: Any, metrics: torchmetrics.Metric, prefix: str) -> None:
        b = as_batch(batch)
        emb = forward_output(self.model, b.input).logits
        if self._student_taps is not None:
            self._student_taps.features = {}
        if b.target is None:
            raise ValueError(f"{prefix} batches need labels to compute Recall@K")
        metrics.update(emb, b.target)

    def _log_recall(self, metrics: RecallAtK, prefix: str) -> None:
        if not metrics.update_called:
            return
        values = metrics.compute()  # gathered across processes: every rank logs the same value
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()})
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_recall(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_recall(self.test_metrics, "test")

    @torch.no_grad()
    def embed(self, loader) -> tuple[Tensor, Tensor]:
        """(embeddings, labels) over a loader, in evaluation mode."""
        was = self.training
        self.eval()
        embs, labels = [], []
        for batch in loader:
            b = as_batch(batch)
            embs.append(self(b.input.to(self.device)).float().cpu())
            labels.append(b.target.cpu())
        self.train(was)
        return torch.cat(embs), torch.cat(labels)


__all__ = ["EmbeddingModule", "RecallAtK", "drop_classifier"]
