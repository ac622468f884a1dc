"""`RegressionModule`: a model with a regression head trained by a regression loss term (`mse`, or
`hl_gauss` = classification over bins), scored by MAE and RMSE of its decoded predictions.

    module = RegressionModule("mlp", in_chans=10,
                              loss={"loss": "hl_gauss", "min_value": 0, "max_value": 400, "num_bins": 64})

It reuses `ClassificationModule` (the model factory, the loss bus, optimisers, schedules,
checkpointed RNG state, feature taps); what differs is the head and the evaluation: the head size
comes from the loss (`num_outputs`: the bins of `hl_gauss`, 1 for `mse`), predictions are the
head term's `decode` (the expected bin centre, or loc + scale·o), and validation/test log
`val/mae`, `val/rmse`, `test/mae`, `test/rmse`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn

from toolkit.models.output import forward_output
from toolkit.modules.classification import ClassificationModule, record_hparams
from toolkit.modules.config import build_terms
from toolkit.terms import LossTerm
from toolkit.types import as_batch


def regression_head(terms: Mapping[str, tuple[LossTerm, Any]]) -> tuple[str, LossTerm]:
    """The (name, term) that defines the head: the first term with `num_outputs` and `decode`."""
    for name, (term, _) in terms.items():
        if hasattr(term, "decode") and hasattr(term, "num_outputs"):
            return name, term
    raise ValueError(
        f"a RegressionModule needs a regression loss term (one with num_outputs and decode, e.g. 'mse' or "
        f"'hl_gauss'), got terms {list(terms)}"
    )


class RegressionModule(ClassificationModule):
    """Train a scalar regressor with the loss bus.

    Args:
        model: a model spec for `toolkit.models.create_model` (e.g. "mlp") or an `nn.Module` whose
            output size matches the head term's `num_outputs`.
        loss: terms spec (see `toolkit.modules.config`); one term must be a regression head
            (`mse`, `hl_gauss` with its support and bin count).
        in_chans: input features for specs. model_kwargs, optimizer, scheduler: as
            `ClassificationModule`.
    """

    def __init__(
        self,
        model: str | nn.Module,
        loss: Any = "mse",
        in_chans: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        optimizer: str | Mapping[str, Any] | None = None,
        scheduler: str | Mapping[str, Any] | None = None,
    ) -> None:
        terms = build_terms(loss, default_name="loss")
        head_name, head = regression_head(terms)
        super().__init__(
            model,
            num_classes=head.num_outputs,
            loss=None,
            in_chans=in_chans,
            model_kwargs=model_kwargs,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        record_hparams(
            self,
            model=model,
            loss=loss,
            in_chans=in_chans,
            model_kwargs=model_kwargs,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        for name, (term, weight) in terms.items():
            self.add_term(name, term, weight)
        self.head_name = head_name

    def _metrics(self, prefix: str, top_k: int) -> torchmetrics.MetricCollection:
        metrics = {
            "mae": torchmetrics.MeanAbsoluteError(),
            "rmse": torchmetrics.MeanSquaredError(squared=False),
        }
        return torchmetrics.MetricCollection(metrics, prefix=f"{prefix}/")

    @property
    def head(self) -> LossTerm:
        return self.loss_terms[self.head_name]

    def predict(self, x: Any) -> Tensor:
        """Decoded predictions (B,) for inputs `x`."""
        return self.head.decode(forward_output(self.model, x).logits)

    def _eval_step(self, batch: Any, metrics: torchmetrics.MetricCollection, prefix: str) -> None:
        b = as_batch(batch)
        out = forward_output(self.model, b.input).logits
        if self._student_taps is not None:
            self._student_taps.features = {}
        if b.target is None:
            raise ValueError(f"{prefix} batches need targets to compute the error")
        pred = self.head.decode(out)
        target = b.target.float().reshape(-1)
        metrics.update(pred, target)
        self.log_dict(metrics, batch_size=target.shape[0])

    def test_predictions(self, loader) -> tuple[Tensor, Tensor]:
        """(predictions, targets) over a loader, in evaluation mode (for analysis and tests)."""
        was = self.training
        self.eval()
        preds, targets = [], []
        with torch.no_grad():
            for batch in loader:
                b = as_batch(batch)
                preds.append(self.predict(b.input.to(self.device)))
                targets.append(b.target.float().reshape(-1))
        self.train(was)
        return torch.cat(preds).cpu(), torch.cat(targets).cpu()


__all__ = ["RegressionModule", "regression_head"]
