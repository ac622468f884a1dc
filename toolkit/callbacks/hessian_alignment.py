"""`hessian_alignment`: align the classifier head's Hessians and gradients across training domains
(HGP or Hutchinson), as a loss term the callback registers on the module's loss bus.
Maths in `toolkit.functional.hessian_alignment`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from toolkit.callbacks._probe import check_int
from toolkit.distill.taps import resolve_module
from toolkit.functional.hessian_alignment import DEFAULTS, METHODS, domain_risks, hessian_alignment_parts
from toolkit.models.output import unwrap
from toolkit.registry import register
from toolkit.terms import LossTerm, Step
from toolkit.types import Batch, require_index

DomainFn = Callable[[Batch], Tensor]


class HessianAlignmentTerm(LossTerm):
    """The Hessian Alignment penalty on one batch (a batch-level scalar).

    Splits the batch by domain id, takes each present domain's mean cross-entropy R_e of the
    student's logits, and returns α·(Hessian part) + β·(gradient part) over the head's
    parameters (see `toolkit.functional.hessian_alignment`). Domains missing from a batch are
    left out of that step's mean; with a single domain present the penalty is 0.

    The head is referenced, not owned (it stays the model's submodule: optimised and saved once).
    Domain ids come from `domain_fn(batch)` or from `domain_table[batch.index]`.
    """

    needs_target = True

    def __init__(
        self,
        head: nn.Module,
        method: str = "hgp",
        alpha: float | None = None,
        beta: float | None = None,
        num_probes: int = 300,
        seed: int = 0,
        domain_table: Tensor | None = None,
        domain_fn: DomainFn | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.alpha = float(DEFAULTS[method]["alpha"] if alpha is None else alpha)
        self.beta = float(DEFAULTS[method]["beta"] if beta is None else beta)
        for name, v in (("alpha", self.alpha), ("beta", self.beta)):
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.num_probes = check_int("num_probes", num_probes)
        self.seed = int(seed)
        if (domain_table is None) == (domain_fn is None):
            raise ValueError(
                "give exactly one of domain_table (ids by sample index) and domain_fn(batch) -> ids"
            )
        self.needs_index = domain_table is not None
        self.__dict__["_head"] = head  # not a submodule: it belongs to the model
        self.__dict__["_table"] = None if domain_table is None else torch.as_tensor(domain_table).long()
        self.domain_fn = domain_fn
        self.last_parts: dict[str, float] = {}

    @property
    def head(self) -> nn.Module:
        return self.__dict__["_head"]

    def domains(self, batch: Batch) -> Tensor:
        if self.domain_fn is not None:
            ids = torch.as_tensor(self.domain_fn(batch))
        else:
            index = require_index(batch, "hessian_alignment (domain ids are looked up by sample index)")
            table = self.__dict__["_table"]
            if int(index.max()) >= len(table):
                raise ValueError(
                    f"sample index {int(index.max())} has no domain id (the table covers {len(table)} samples)"
                )
            ids = table.to(index.device)[index.long()]
        if ids.shape != (batch.size,):
            raise ValueError(
                f"domain ids must be one per sample ({batch.size}), got shape {tuple(ids.shape)}"
            )
        return ids

    def forward(self, step: Step) -> Tensor:
        logits = step.student.logits
        ids = self.domains(step.batch).to(logits.device)
        risks, _ = domain_risks(logits, step.target, ids)
        params = [p for p in self.head.parameters() if p.requires_grad]
        if not params:
            raise ValueError("hessian_alignment: the classifier head has no trainable parameters")
        if not logits.requires_grad:
            raise ValueError(
                "hessian_alignment: the student's logits carry no gradient (a frozen model or no_grad forward)"
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step.progress.global_step)
        try:
            hess, grad = hessian_alignment_parts(risks, params, self.method, self.num_probes, g)
        except ValueError as e:
            if "do not depend on params" in str(e):
                raise ValueError(
                    "hessian_alignment: the student's logits do not depend on the chosen head's parameters; "
                    "set head= to the module path of the classifier that produces the logits"
                ) from e
            raise
        self.last_parts = {
            "hessian": float(hess.detach()),
            "gradient": float(grad.detach()),
            "domains": len(risks),
        }
        return self.alpha * hess + self.beta * grad

    def extra_repr(self) -> str:
        return f"method={self.method!r}, alpha={self.alpha}, beta={self.beta}, num_probes={self.num_probes}"


def _default_head(pl_module: Any) -> tuple[str, nn.Module]:
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module):
        core = unwrap(model)
        get = getattr(core, "get_classifier", None)
        head = get() if callable(get) else None
        if isinstance(head, nn.Module):
            for name, m in pl_module.named_modules():
                if m is head:
                    return name, head
    raise ValueError(
        "hessian_alignment cannot find the classifier head: give head= the module path (under the "
        "LightningModule) of the layer that produces the logits, e.g. head='model.fc'. Modules: "
        + ", ".join(n for n, _ in pl_module.named_modules() if n and "." not in n)
    )


@register("callback", "hessian_alignment")
class HessianAlignment(Callback):
    """Hessian Alignment for domain generalisation (HGP or Hutchinson) on the classifier head.

    Hemati, Zhang, Estiri, Chen, "Understanding Hessian Alignment for Domain Generalization"
    (ICCV 2023, arXiv:2308.11778; code huawei-noah/Federated-Learning/HessianAlignment). The
    spectral norm of the difference between domains' head Hessians bounds the transfer measure;
    matching head Hessians and gradients across training domains improves out-of-distribution
    accuracy. Per batch, with R_e the cross-entropy of domain e's samples and g_e, H_e the
    gradient and Hessian of R_e with respect to the head's parameters:

        HGP:        (1/E) Σ_e [ α ‖H_e g_e − sg(H̄ḡ)‖² + β ‖g_e − sg(ḡ)‖² ]     (α 1e-4, β 5e-3)
        Hutchinson: (1/E) Σ_e [ α ‖diaĝ H_e − sg(diaĝ H̄)‖² + β ‖g_e − sg(ḡ)‖² ]  (α 1e-3, β 5e-3,
                                                                                  300 probes)

    At setup the callback registers a `HessianAlignmentTerm` named `name` on the module's loss
    bus (weight `weight`), which adds the penalty to the module's own loss (its cross-entropy
    over the pooled batch; the paper's mean of per-domain risks equals it for equal domain
    sizes). It needs a module with the bus (`ClassificationModule`, `DistillationModule`, or a
    module mixing in `toolkit.modules.LossBus`) and per-sample domain ids: by default from the
    DataModule's `domains` option (`DigitsDataModule(domains=3)`, ids looked up by `Batch.index`),
    or `domain_fn(batch) -> (B,) ids`; in a recipe: `--callbacks hessian_alignment --data.domains 3`
    (or `data_args: {domains: ...}` in YAML). The penalty's parts are logged as
    `{name}/hessian` and `{name}/gradient` (unweighted); the term itself as `train/loss/{name}`.

    Cost: double backward through the head for every domain (HGP: 2 products per domain; the
    Hutchinson penalty: `num_probes` per domain, each kept in the graph).

    Args:
        method: "hgp" or "hutchinson".
        alpha, beta: weights of the Hessian and gradient parts (None: the paper's defaults).
        num_probes: Rademacher probes of the Hutchinson diagonal (shared by the domains).
        head: module path of the classifier head under the LightningModule (default: the
            model's `get_classifier()`, e.g. "model.fc").
        weight: the term's weight on the bus (a number or a schedule dict).
        domain_fn: `fn(batch) -> (B,) domain ids`, instead of the DataModule's `domains`.
        seed: seeds the probes (with the global step).
        name: the term's name on the bus.
    """

    def __init__(
        self,
        method: str = "hgp",
        alpha: float | None = None,
        beta: float | None = None,
        num_probes: int = 300,
        head: str | None = None,
        weight: Any = 1.0,
        domain_fn: DomainFn | None = None,
        seed: int = 0,
        name: str = "hessian_alignment",
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for label, v in (("alpha", alpha), ("beta", beta)):
            if v is not None and not v >= 0:
                raise ValueError(f"{label} must be >= 0 or None (the paper's default), got {v}")
        self.num_probes = check_int("num_probes", num_probes)
        if head is not None and (not isinstance(head, str) or not head):
            raise ValueError(f"head must be a module path such as 'model.fc' or None, got {head!r}")
        if domain_fn is not None and not callable(domain_fn):
            raise TypeError("domain_fn must be callable as fn(batch) -> (B,) domain ids")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"name must be a non-empty name without '/', got {name!r}")
        self.method, self.alpha, self.beta = method, alpha, beta
        self.head_path, self.weight, self.domain_fn, self.seed, self.name = (
            head,
            weight,
            domain_fn,
            int(seed),
            name,
        )
        self.term: HessianAlignmentTerm | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            if self.term is None:  # silent for the test/validate stages that follow a fit
                stage_name = getattr(stage, "value", stage)
                warnings.warn(
                    f"HessianAlignment changes the training loss only; nothing to do for stage {stage_name!r}",
                    stacklevel=2,
                )
            return
        if not callable(getattr(pl_module, "add_term", None)):
            raise TypeError(
                f"hessian_alignment adds a penalty to the training loss, but {type(pl_module).__name__} has no "
                "loss bus: use ClassificationModule / DistillationModule, or mix toolkit.modules.LossBus into "
                "your LightningModule (class MyModule(LossBus, L.LightningModule)) and return "
                "self.loss_from(logits, batch) from training_step"
            )
        if self.name in pl_module.terms:
            existing = pl_module.terms[self.name]
            if isinstance(existing, HessianAlignmentTerm):  # a second fit with the same callback
                self.term = existing
                return
            raise KeyError(f"the module already has a loss term named {self.name!r}; give name=...")
        if self.head_path is None:
            path, head = _default_head(pl_module)
        else:
            path, head = self.head_path, resolve_module(pl_module, self.head_path)
        if not any(p.requires_grad for p in head.parameters()):
            raise ValueError(f"hessian_alignment: the head {path!r} has no trainable parameters")
        table = None
        if self.domain_fn is None:
            dm = trainer.datamodule
            table = getattr(dm, "domain_ids", None) if dm is not None else None
            if table is None:
                raise ValueError(
                    "hessian_alignment needs the domain of every training sample: build the DataModule with "
                    "domains=... (e.g. build('data', 'digits', domains=3), a list of per-sample ids or a rule), "
                    "or give domain_fn=fn(batch) -> ids"
                )
            if int(torch.as_tensor(table).max()) < 1:
                warnings.warn(
                    "hessian_alignment: every training sample is in one domain, so the penalty is always 0",
                    stacklevel=2,
                )
        self.term = HessianAlignmentTerm(
            head, self.method, self.alpha, self.beta, self.num_probes, self.seed, table, self.domain_fn
        )
        pl_module.add_term(self.name, self.term, weight=self.weight)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.term is not None and self.term.last_parts:
            parts = self.term.last_parts
            pl_module.log(f"{self.name}/hessian", parts["hessian"])
            pl_module.log(f"{self.name}/gradient", parts["gradient"])
