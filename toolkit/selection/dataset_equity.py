"""`dataset_equity`: weight each sample by the rarity of its appearance cluster (DatasetEquity,
ICCV 2023 Workshops); maths in `toolkit.functional.dataset_equity`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from toolkit.functional.dataset_equity import (
    CLUSTERINGS,
    LIKELIHOODS,
    check_dataset_equity,
    cluster_features,
    cluster_likelihood,
    dataset_equity_weight,
)
from toolkit.models.output import forward_output
from toolkit.registry import register
from toolkit.selection.scorer import scoring_model
from toolkit.selection.scores import SampleScores
from toolkit.selection.weighting import SampleWeighting, as_sample_scores, lookup, training_pass
from toolkit.terms import Step
from toolkit.types import Batch, require_index

FEATURES = ("model", "input")


@register("selector", "dataset_equity")
class DatasetEquity(SampleWeighting):
    """DatasetEquity: w_i = (η + (1 − p_i)^γ)/(η + 1), p_i the frequency of i's appearance cluster.

    Shrivastava, Zhang, Nagesh & Parchami, *DatasetEquity: Are All Samples Created Equal? In The
    Quest For Equity Within Datasets* (ICCV 2023 Workshops, arXiv 2308.09878). Samples of common
    appearance get a smaller loss weight (down to η/(η + 1)), rare ones keep weight ≈ 1.

    The likelihoods are computed once, at the start of the first fit (kept in checkpoints: a
    resumed run does not recompute them with the trained model): features of every training
    sample (a pass over `datamodule.scoring_dataloader()`: no augmentation, eval mode), clustered,
    p_i = cluster size / N. The paper: an ImageNet ResNet-101's penultimate features → t-SNE →
    DBSCAN (`cluster="tsne_dbscan"`). Default here, which works offline and in seconds: the
    penultimate embedding of the model being trained (the paper's setting when it starts from a
    pretrained network; a random-feature clustering for a fresh one), k-means with `n_clusters`.
    Or give a feature extractor (`features=<nn.Module>`, e.g. a pretrained backbone), the raw
    inputs (`features="input"`), or the likelihoods themselves (`likelihoods=`, a file saved by
    `save_likelihoods` in an earlier run or any per-sample p ∈ [0, 1]). Under DDP every rank
    computes the features of its share, rank 0 clusters them and broadcasts the result.

    When to use: data sets with over-represented appearance modes and rare ones that matter
    (the paper: KITTI and nuScenes 3D detection, > 200% AP on Cyclist). Expected effect: better
    accuracy on rare modes, at some cost on the common ones.

    Args:
        eta: η ≥ 0 (README default 1.0; training scripts 0.3, 0.5, 1.0).
        gamma: γ ≥ 0 (README default 5.0; training scripts 2.0, 5.0).
        features: "model" (the training model's penultimate embedding; logits if it gives none),
            "input" (flattened inputs) or an `nn.Module` feature extractor (its embedding, or its
            output flattened), run in eval mode on the module's device.
        cluster: "kmeans" (default) or "tsne_dbscan" (the paper).
        n_clusters: k for k-means (our choice: 10).
        likelihood: "frequency" (p = cluster size / N) or "max" (p = size / largest size).
        pca_dims: PCA reduction before clustering (0: none).
        dbscan_eps, dbscan_min_samples, perplexity: DBSCAN and t-SNE settings (eps default: the
            0.9 quantile of the k-nearest-neighbour distance in the t-SNE map, k = min_samples).
        seed: seeds PCA, k-means and t-SNE.
        likelihoods: precomputed p per sample (.pt/.npy file, `SampleScores`, or a dense tensor
            keyed by sample index): no feature pass.
        save_likelihoods: write the likelihoods here (.pt or .npy, keyed by sample index).
        log_every_n_steps: see `SampleWeighting`.
    """

    name = "dataset_equity"

    def __init__(
        self,
        eta: float = 1.0,
        gamma: float = 5.0,
        features: str | nn.Module = "model",
        cluster: str = "kmeans",
        n_clusters: int = 10,
        likelihood: str = "frequency",
        pca_dims: int = 50,
        dbscan_eps: float | None = None,
        dbscan_min_samples: int = 5,
        perplexity: float = 30.0,
        seed: int = 0,
        likelihoods: str | Path | SampleScores | Tensor | None = None,
        save_likelihoods: str | Path | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(log_every_n_steps)
        check_dataset_equity(eta, gamma)
        if not isinstance(features, nn.Module) and features not in FEATURES:
            raise ValueError(
                f"features must be one of {FEATURES} or an nn.Module feature extractor, got {features!r}"
            )
        if cluster not in CLUSTERINGS:
            raise ValueError(f"cluster must be one of {CLUSTERINGS}, got {cluster!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
            raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
        if dbscan_eps is not None and not dbscan_eps > 0:
            raise ValueError(f"dbscan_eps must be > 0 or None, got {dbscan_eps}")
        if save_likelihoods is not None and Path(save_likelihoods).suffix not in (".pt", ".npy"):
            raise ValueError(f"save_likelihoods must end in .pt or .npy, got {save_likelihoods!r}")
        self.eta, self.gamma = float(eta), float(gamma)
        self.features, self.cluster, self.n_clusters, self.likelihood = (
            features,
            cluster,
            n_clusters,
            likelihood,
        )
        self.pca_dims, self.seed = pca_dims, seed
        self.dbscan_eps, self.dbscan_min_samples, self.perplexity = dbscan_eps, dbscan_min_samples, perplexity
        self.given = None if likelihoods is None else as_sample_scores(likelihoods, "likelihoods")
        if self.given is not None:
            p = self.given.score
            if len(p) and (p.min() < 0 or p.max() > 1):
                raise ValueError("likelihoods must be in [0, 1]")
        self.save_likelihoods = None if save_likelihoods is None else Path(save_likelihoods)
        # state: p per sample index (NaN where none), cluster label per sample index (-2: none)
        self.p: Tensor | None = None
        self.labels: Tensor | None = None
        self._table: Tensor | None = None

    @property
    def state_key(self) -> str:
        return f"SampleWeighting[{self.name}, eta={self.eta}, gamma={self.gamma}]"

    # -- likelihoods -------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._module is None or self.p is not None:
            return  # not set up for fit, or restored from a checkpoint
        if self.given is not None:
            dm = trainer.datamodule
            if dm is not None and hasattr(dm, "train_sample_indices"):
                self.given.check_covers(dm.train_sample_indices, "the training set")
            self.p, self.labels = self.given.dense().double(), None
        else:
            self.p, self.labels = self.compute(trainer, pl_module)
        self._table = None
        if self.save_likelihoods is not None and trainer.is_global_zero:
            out = SampleScores(
                {"selector": self.name, "cluster": self.cluster, "likelihood": self.likelihood}
            )
            seen = ~torch.isnan(self.p)
            out.add(torch.nonzero(seen).flatten(), self.p[seen])
            out.save(self.save_likelihoods)

    def _features(self, pl_module: L.LightningModule, batch: Batch) -> Tensor:
        if self.features == "input":
            if not isinstance(batch.input, Tensor):
                raise ValueError(
                    "features='input' needs tensor inputs; give a feature extractor for other inputs"
                )
            return batch.input.flatten(1).float()
        net = scoring_model(pl_module) if self.features == "model" else self.features
        out = forward_output(net, batch.input)
        feats = out.embedding if out.embedding is not None else out.logits
        return feats.flatten(1).float()

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """(p, labels), dense over sample indices: the feature pass, then clustering on rank 0."""
        if isinstance(self.features, nn.Module):
            self.features.to(pl_module.device).eval()
        index, feats = training_pass(trainer, pl_module, lambda b: self._features(pl_module, b), self.name)
        if not len(index):
            raise ValueError(f"{self.name}: the training set is empty")
        n = int(index.max()) + 1
        rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        labels = torch.zeros(len(index), dtype=torch.long)
        if rank0:
            labels = cluster_features(
                feats,
                self.cluster,
                min(self.n_clusters, len(index)),
                self.seed,
                self.pca_dims,
                self.perplexity,
                self.dbscan_eps,
                self.dbscan_min_samples,
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = pl_module.device if dist.get_backend() == "nccl" else torch.device("cpu")
            labels = labels.to(device)
            dist.broadcast(labels, src=0)
            labels = labels.cpu()
        p = torch.full((n,), float("nan"), dtype=torch.float64)
        p[index] = cluster_likelihood(labels, self.likelihood)
        dense_labels = torch.full((n,), -2, dtype=torch.long)
        dense_labels[index] = labels
        return p, dense_labels

    # -- weights -----------------------------------------------------------------------------
    def sample_weights(self) -> Tensor:
        """(N,) weight per sample index (NaN for samples without a likelihood)."""
        if self.p is None:
            raise RuntimeError(f"{self.name}: the likelihoods are computed at the start of fit")
        w = torch.full_like(self.p, float("nan"), dtype=torch.float32)
        seen = ~torch.isnan(self.p)
        w[seen] = dataset_equity_weight(self.p[seen], self.eta, self.gamma)
        return w

    def weights(self, step: Step, per_sample_loss: Tensor) -> Tensor:
        index = require_index(step.batch, self.name)
        if self._table is None or self._table.device != index.device:
            self._table = self.sample_weights().to(index.device)
        return lookup(self._table, index, self.name)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "p": None if self.p is None else self.p.clone(),
            "labels": None if self.labels is None else self.labels.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p = None if state["p"] is None else state["p"].double()
        self.labels = state["labels"]
        self._table = None
