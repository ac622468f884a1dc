"""Model factory, CIFAR family, `forward_output`/`num_classes_of` and toolkit checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.models import create_model, forward_output, load_model_checkpoint, num_classes_of
from toolkit.models.cifar import CifarResNet, WideResNet


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the named sub-modules during one forward pass."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out.detach()))
        for n in names
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


# -- CIFAR family ------------------------------------------------------------------------------

# Parameter counts (millions, 100 classes) reported by CRD (Tian et al. 2020) / mdistiller.
PAPER_PARAMS_M = {
    "resnet8": 0.08,
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.26,
    "wrn_40_1": 0.57,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_cifar_parameter_counts_match_the_kd_papers(name):
    model = create_model(name, num_classes=100)
    assert round(n_params(model) / 1e6, 2) == PAPER_PARAMS_M[name]
    assert num_classes_of(model) == 100


def test_resnet8_parameter_count_exactly():
    # Count by hand: stem conv+BN, 3 stages of one BasicBlock (16->16, 16->32 with 1x1 shortcut,
    # 32->64 with 1x1 shortcut), linear 64->100.
    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    def block(cin, cout):
        n = conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
        return n + (conv(cin, cout, 1) + bn(cout) if cin != cout else 0)

    expected = conv(3, 16, 3) + bn(16) + block(16, 16) + block(16, 32) + block(32, 64) + 64 * 100 + 100
    assert n_params(create_model("resnet8", num_classes=100)) == expected


@pytest.mark.parametrize("depth", [9, 10, 7, 21])
def test_cifar_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth)


@pytest.mark.parametrize("depth", [15, 17, 41])
def test_wrn_depth_must_be_6n_plus_4(depth):
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth, 2)


@pytest.mark.parametrize(("depth", "blocks"), [(8, 1), (14, 2), (20, 3), (32, 5)])
def test_cifar_resnet_blocks_per_stage(depth, blocks):
    model = CifarResNet(depth)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [blocks] * 3


@pytest.mark.parametrize(("depth", "blocks"), [(10, 1), (16, 2), (40, 6)])
def test_wrn_blocks_per_stage(depth, blocks):
    model = WideResNet(depth, 1)
    assert [len(getattr(model, f"block{i}")) for i in (1, 2, 3)] == [blocks] * 3


@pytest.mark.parametrize(
    ("name", "stages", "widths"),
    [
        ("resnet8", ["layer1", "layer2", "layer3"], (16, 32, 64)),
        ("resnet20", ["layer1", "layer2", "layer3"], (16, 32, 64)),
        ("resnet8x4", ["layer1", "layer2", "layer3"], (64, 128, 256)),
        ("wrn_16_2", ["block1", "block2", "block3"], (32, 64, 128)),
        ("wrn_16_1", ["block1", "block2", "block3"], (16, 32, 64)),
    ],
)
def test_cifar_stage_shapes_on_32x32(name, stages, widths):
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    outs = stage_outputs(model, stages, x)
    expected = [(2, widths[0], 32, 32), (2, widths[1], 16, 16), (2, widths[2], 8, 8)]
    assert [tuple(outs[s].shape) for s in stages] == expected
    assert model.num_features == widths[2]
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_cifar_nets_take_one_channel_inputs():
    grey = create_model("resnet8", num_classes=10, in_chans=1)
    rgb = create_model("resnet8", num_classes=10, in_chans=3)
    assert grey.conv1.in_channels == 1
    # only the stem's input channels differ: 16 filters of 3x3 over 2 fewer channels
    assert n_params(rgb) - n_params(grey) == 16 * 3 * 3 * 2
    with torch.no_grad():
        assert grey.eval()(torch.randn(3, 1, 32, 32)).shape == (3, 10)
        wrn = create_model("wrn_16_1", num_classes=5, in_chans=1).eval()
        assert wrn(torch.randn(3, 1, 32, 32)).shape == (3, 5)


# -- forward_output / num_classes_of ----------------------------------------------------------


def test_forward_output_timm_model():
    torch.manual_seed(0)
    model = create_model("timm:resnet10t", num_classes=7, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = forward_output(model, x)
        expected_logits = model(x)
        expected_embedding = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(out.logits, expected_logits)
    torch.testing.assert_close(out.embedding, expected_embedding)
    assert out.logits.shape == (2, 7)
    assert out.embedding.shape == (2, model.num_features)
    assert num_classes_of(model) == 7


@pytest.mark.parametrize(("name", "dim"), [("resnet8", 64), ("resnet8x4", 256), ("wrn_16_2", 128)])
def test_forward_output_cifar_nets(name, dim):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    last = "layer3" if name.startswith("resnet") else "bn"
    with torch.no_grad():
        out = forward_output(model, x)
        logits = model(x)
        feats = stage_outputs(model, [last], x)[last]
    torch.testing.assert_close(out.logits, logits)
    # the embedding is the global average of the last feature map (after WRN's final BN+ReLU)
    pooled = (feats if name.startswith("resnet") else torch.relu(feats)).mean(dim=(2, 3))
    assert out.embedding.shape == (3, dim)
    torch.testing.assert_close(out.embedding, pooled)
    torch.testing.assert_close(out.embedding @ model.fc.weight.T + model.fc.bias, logits)
    assert num_classes_of(model) == 10


def test_forward_output_plain_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x = torch.randn(5, 3, 2, 2)
    out = forward_output(model, x)
    torch.testing.assert_close(out.logits, model(x))
    assert out.embedding is None
    assert num_classes_of(model) is None


def test_forward_output_sees_through_wrappers():
    class Wrapper(nn.Module):  # like DDP: the real network under `.module`
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    model = create_model("resnet8", num_classes=6).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = forward_output(Wrapper(model), x)
        torch.testing.assert_close(out.logits, model(x))
    assert out.embedding.shape == (2, 64)
    assert num_classes_of(Wrapper(model)) == 6


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("tiny_bert")
    BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    ).save_pretrained(str(path))
    return path


def test_forward_output_hf_model(tiny_bert_dir):
    torch.manual_seed(0)
    model = create_model(f"hf:{tiny_bert_dir}", num_classes=3).eval()
    ids = torch.randint(5, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        out = forward_output(model, x)
        ref = model(**x, output_hidden_states=True)
    assert out.logits.shape == (4, 3)
    assert out.embedding.shape == (4, 32)
    torch.testing.assert_close(out.logits, ref.logits)
    # the first ([CLS]) token's state in the last layer
    torch.testing.assert_close(out.embedding, ref.hidden_states[-1][:, 0])
    assert num_classes_of(model) == 3
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1


# -- create_model errors -----------------------------------------------------------------------


def test_unknown_toolkit_model_suggests_close_names():
    with pytest.raises(ValueError, match="resnet8x4") as e:
        create_model("resnet8x5", num_classes=10)
    assert "Did you mean" in str(e.value)
    assert "timm:NAME" in str(e.value)


def test_unknown_timm_model_suggests_close_names():
    with pytest.raises(ValueError, match="unknown timm model 'resnet10x'") as e:
        create_model("timm:resnet10x", num_classes=10)
    assert "resnet10t" in str(e.value)


# -- checkpoints -------------------------------------------------------------------------------


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_checkpoint(tmp_path / "nope.ckpt")


def test_random_bytes_checkpoint_is_reported_corrupt(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes()
    )
    with pytest.raises(ValueError, match="corrupt"):
        load_model_checkpoint(path)


def test_file_without_toolkit_spec_is_explained(tmp_path):
    model = create_model("resnet8", num_classes=10)
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(ValueError, match="architecture is unknown"):
        load_model_checkpoint(path)
    tensor_path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_path)
    with pytest.raises(ValueError, match="not written by a toolkit module"):
        load_model_checkpoint(tensor_path)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A resnet8 trained briefly on digits with a real Lightning Trainer, saved as a checkpoint."""
    import lightning as L

    from toolkit.data import DigitsDataModule
    from toolkit.modules import ClassificationModule

    torch.manual_seed(0)
    module = ClassificationModule("resnet8", num_classes=10, in_chans=1)
    dm = DigitsDataModule(batch_size=32, val_split=0.1, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / "trained.ckpt"
    trainer.save_checkpoint(path)
    x = next(iter(dm.val_dataloader())).input
    return path, module, x


def test_load_model_checkpoint_reproduces_the_trained_model(trained_checkpoint):
    path, module, x = trained_checkpoint
    trained = module.model.eval()
    loaded = load_model_checkpoint(path).eval()
    assert isinstance(loaded, CifarResNet)
    assert loaded.conv1.in_channels == 1 and num_classes_of(loaded) == 10
    # training moved the BatchNorm statistics away from their initial values, and they were loaded
    assert not torch.equal(loaded.bn1.running_mean, torch.zeros_like(loaded.bn1.running_mean))
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
        fresh = create_model("resnet8", num_classes=10, in_chans=1).eval()
        assert not torch.allclose(fresh(x), trained(x))
    # the checkpoint path is also a model name
    with torch.no_grad():
        assert torch.equal(create_model(str(path)).eval()(x), trained(x))


def test_teacher_from_checkpoint_gives_the_trained_logits(trained_checkpoint):
    from toolkit.distill import Teacher

    path, module, x = trained_checkpoint
    teacher = Teacher.from_checkpoint(path)
    with torch.no_grad():
        expected = module.model.eval()(x)
    out = teacher(x)
    assert torch.equal(out.logits, expected)
    assert teacher.num_classes == 10


def test_truncated_checkpoint_is_reported_corrupt(trained_checkpoint, tmp_path):
    path, _, _ = trained_checkpoint
    data = path.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_model_checkpoint(cut)


def test_checkpoint_of_another_architecture_is_a_mismatch(trained_checkpoint, tmp_path):
    path, _, _ = trained_checkpoint
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["toolkit"]["model"]["name"] = "resnet14"
    wrong = tmp_path / "wrong.ckpt"
    torch.save(ckpt, wrong)
    with pytest.raises(ValueError, match="does not match model 'resnet14'"):
        load_model_checkpoint(wrong)
