"""Cross-entropy from the hidden states and the output layer's weight, without the logits, as a
loss term; maths in `toolkit.functional.linear_cross_entropy`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional.linear_cross_entropy import IMPLS, linear_cross_entropy
from toolkit.losses._lm import head_inputs
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "linear_cross_entropy")
class LinearCrossEntropyLoss(LossTerm):
    """Cut Cross-Entropy (Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models",
    ICLR 2025): the cross-entropy of cap(h·Wᵀ + b) computed tile by tile, never forming the
    (tokens × vocabulary) logit matrix.

        ℓ_i = lse_i − (1 − ε)·z_{i,y_i} − (ε/V)·Σ_v z_iv + λ·lse_i²,   z = cap(h·Wᵀ + b)

    When to use: language models with large vocabularies, where the logits (and their gradient)
    dominate training memory; the value and gradients equal `cross_entropy` on the materialised
    logits. Under `CausalLMModule` the logits are then never computed (this term sets
    `needs_logits = False`; other terms that need logits make the module compute them).

    Hyper-parameters: `label_smoothing` ε (0), `softcap` s (None; the model's own final-logit
    softcap, e.g. Gemma 2's 30, is used when this is None), `z_loss` λ (0; PaLM uses 1e-4),
    `ignore_index` (-100), tile sizes `token_chunk` × `vocab_chunk` (1024 × 2048), `filter_eps`
    (None: exact gradients), `impl` ("auto": the `cut-cross-entropy` Triton kernel on CUDA when
    installed). `per_sample=True` returns per-token losses (the bus's per-sample form; the
    backward recomputes the tiles), `per_sample=False` the batch mean (gradients computed in the
    forward pass: one matmul pass fewer, no per-token losses for sample weighters).

    Expected effect: the same training as `cross_entropy` (up to float rounding) at a fraction of
    the memory: measured in `docs/benchmarks.md`.
    """

    needs_logits = False  # read by CausalLMModule: this term never looks at step.student.logits

    def __init__(
        self,
        label_smoothing: float = 0.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        ignore_index: int = -100,
        token_chunk: int = 1024,
        vocab_chunk: int = 2048,
        per_sample: bool = True,
        filter_eps: float | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {softcap}")
        if not z_loss >= 0:
            raise ValueError(f"z_loss must be >= 0 (PaLM uses 1e-4), got {z_loss}")
        for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if filter_eps is not None and not filter_eps >= 0:
            raise ValueError(f"filter_eps must be >= 0 or None, got {filter_eps}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.z_loss = z_loss
        self.ignore_index = ignore_index
        self.token_chunk = token_chunk
        self.vocab_chunk = vocab_chunk
        self.per_sample = per_sample
        self.filter_eps = filter_eps
        self.impl = impl

    def forward(self, step: Step) -> Tensor:
        hidden, weight, bias, model_softcap = head_inputs(step, "linear_cross_entropy")
        kw = dict(
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            softcap=self.softcap if self.softcap is not None else model_softcap,
            z_loss=self.z_loss,
            token_chunk=self.token_chunk,
            vocab_chunk=self.vocab_chunk,
            filter_eps=self.filter_eps,
            impl=self.impl,
        )
        if self.per_sample:
            return linear_cross_entropy(hidden, weight, step.target, bias, reduction="none", **kw)
        return linear_cross_entropy(hidden, weight, step.target, bias, reduction="mean", **kw)

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={self.label_smoothing}, softcap={self.softcap}, z_loss={self.z_loss}, "
            f"chunks=({self.token_chunk}, {self.vocab_chunk}), per_sample={self.per_sample}"
        )
