"""Gaussian naive-Bayes probe of frozen embeddings, against a logistic-regression probe on the
same features (Zheng et al., "Revisiting Discriminative vs. Generative Classifiers", ICML 2023).

The embedding pass is `KNNProbe.embeddings` (`toolkit/callbacks/probes.py`); the closed-form
classifier is `toolkit.functional.naive_bayes`; the logistic-regression probe is `linear_probe`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader

from toolkit.callbacks.probes import KNNProbe, linear_probe
from toolkit.functional.naive_bayes import VARIANCES, gaussian_nb_fit, gaussian_nb_predict
from toolkit.registry import register


@register("callback", "naive_bayes_probe")
class NaiveBayesProbe(KNNProbe):
    """Log `val/naive_bayes_probe_acc` and `val/logistic_probe_acc` of the model's frozen embeddings.

    Linear evaluation with a generative classifier (Zheng, Wu, Bao, Cao, Li & Zhu, ICML 2023,
    arXiv 2302.02334; code ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers): Gaussian naive Bayes fitted
    in closed form on the training embeddings, with class priors π_c = n_c/n, class means μ_c and
    the prior-weighted pooled diagonal variance σ² = Σ_c π_c v_c (+ ε), so that
    ŷ = argmax_c log π_c − ½ Σ_d (x_d − μ_cd)² / σ²_d is a linear classifier. The paper's result:
    naive Bayes approaches its (higher) asymptotic error with O(log n) samples against O(n) for
    logistic regression (n = feature dimension), hence it wins with few samples ("two regimes").

    At the end of a validation epoch (every `every_n_epochs` epochs and after the last; never in
    the sanity check) the training and validation sets are embedded once (`KNNProbe.embeddings`:
    eval mode, no gradients, forked RNG), then both probes are fitted on the same training
    embeddings and scored on the validation embeddings. The logistic-regression probe is
    `linear_probe` (AdamW, as `knn_probe` runs it). With `train_sizes`, both are also fitted on
    the first n training embeddings for each n, logged as `..._acc_n{n}` (the paper's accuracy
    against training-set size).

    Args:
        variance: "pooled" (the paper's code, linear) or "per_class" (scikit-learn's GaussianNB).
        var_smoothing: ε = var_smoothing × the largest feature variance (scikit-learn's rule).
        train_sizes: training-set sizes for the sample-efficiency comparison (sizes not below the
            available count are skipped).
        linear_epochs, linear_lr, linear_weight_decay, linear_batch_size, standardize: the
            logistic-regression probe (`linear_epochs=0` disables it).
        every_n_epochs, max_train_samples, embedding_fn, train_dataloader, val_dataloader, prefix:
            as `KNNProbe`.
    """

    def __init__(
        self,
        variance: str = "pooled",
        var_smoothing: float = 1e-9,
        train_sizes: Sequence[int] | None = None,
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
        super().__init__(
            k=1,
            linear_epochs=linear_epochs,
            linear_lr=linear_lr,
            linear_weight_decay=linear_weight_decay,
            linear_batch_size=linear_batch_size,
            standardize=standardize,
            every_n_epochs=every_n_epochs,
            max_train_samples=max_train_samples,
            embedding_fn=embedding_fn,
            train_dataloader=train_dataloader,
            val_dataloader=val_dataloader,
            prefix=prefix,
        )
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        if not var_smoothing >= 0:
            raise ValueError(f"var_smoothing must be >= 0, got {var_smoothing}")
        sizes = list(train_sizes or [])
        for n in sizes:
            if isinstance(n, bool) or int(n) != n or n < 1:
                raise ValueError(f"train_sizes must be integers >= 1, got {train_sizes}")
        self.variance = variance
        self.var_smoothing = float(var_smoothing)
        self.train_sizes = sorted({int(n) for n in sizes})

    @property
    def state_key(self) -> str:
        return self._generate_state_key(variance=self.variance, prefix=self.prefix)

    def probe(self, trainer: L.Trainer, pl_module: Any) -> dict[str, float]:
        """Embed the data and return {"naive_bayes_probe_acc", "logistic_probe_acc", ...}."""
        train_x, train_y, val_x, val_y = self.embeddings(trainer, pl_module)
        num_classes = getattr(pl_module, "num_classes", None) or int(max(train_y.max(), val_y.max())) + 1
        out: dict[str, float] = {}
        n_train = train_x.shape[0]
        skipped = [n for n in self.train_sizes if n >= n_train]
        if skipped:
            warnings.warn(
                f"NaiveBayesProbe: train_sizes {skipped} are not below the {n_train} training embeddings; skipped",
                stacklevel=2,
            )
        for n in [None, *(n for n in self.train_sizes if n < n_train)]:
            tx, ty = (train_x, train_y) if n is None else (train_x[:n], train_y[:n])
            suffix = "" if n is None else f"_n{n}"
            params = gaussian_nb_fit(tx, ty, num_classes, self.variance, self.var_smoothing)
            out[f"naive_bayes_probe_acc{suffix}"] = (
                (gaussian_nb_predict(params, val_x) == val_y).float().mean().item()
            )
            if self.linear_epochs:
                preds, _, _ = linear_probe(
                    tx,
                    ty,
                    val_x,
                    num_classes,
                    self.linear_epochs,
                    self.linear_lr,
                    self.linear_weight_decay,
                    self.linear_batch_size,
                    self.standardize,
                )
                out[f"logistic_probe_acc{suffix}"] = (preds == val_y).float().mean().item()
        return out
