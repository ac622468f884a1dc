"""Teacher contract, FeatureTaps and projectors."""

import pytest
import torch
from torch import nn

from toolkit.distill import FeatureTaps, Projector, ProjectorSet, Renormalize, Teacher
from toolkit.models import create_model, forward_output


def small(num_classes=10, seed=0):
    torch.manual_seed(seed)
    return create_model("convnet", num_classes=num_classes, in_chans=1, width=4)


def test_teacher_is_frozen_hidden_and_always_eval():
    net = small()
    teacher = Teacher(net)
    holder = nn.Module()
    holder.teacher = teacher
    holder.student = nn.Linear(2, 2)
    assert list(teacher.parameters()) == []
    assert all(not k.startswith("teacher") for k in holder.state_dict())
    assert not any(p.requires_grad for p in net.parameters())
    holder.train()
    assert not net.training and not any(m.training for m in net.modules())
    # dtype/device moves reach the hidden network
    holder.to(torch.float64)
    assert next(net.parameters()).dtype == torch.float64
    holder.to(torch.float32)
    out = teacher(torch.randn(3, 1, 8, 8))
    assert out.logits.shape == (3, 10) and not out.logits.requires_grad
    assert out.embedding is not None


def test_teacher_outputs_enter_autograd_graphs():
    teacher = Teacher(small())
    s = torch.randn(3, 10, requires_grad=True)
    t = teacher(torch.randn(3, 1, 8, 8)).logits
    (s * t).sum().backward()  # would fail with an inference tensor from inference_mode
    assert s.grad is not None


def test_ensemble_combines_members():
    a, b = small(seed=0), small(seed=1)
    x = torch.randn(5, 1, 8, 8)
    la, lb = a.eval()(x).detach(), b.eval()(x).detach()
    mean_logits = Teacher([a, b])(x).logits
    assert torch.allclose(mean_logits, (la + lb) / 2, atol=1e-6)
    probs = Teacher([a, b], combine="probs")(x).logits
    assert torch.allclose(probs.exp(), (la.softmax(-1) + lb.softmax(-1)) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="different class counts"):
        _ = Teacher([small(10), small(7)]).num_classes


def test_teacher_input_transform_and_precision():
    x = torch.rand(2, 3, 4, 4)
    ren = Renormalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    raw = x * 0.5 + 0.5
    expected = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    assert torch.allclose(ren(x), expected, atol=1e-6)
    seen = {}

    def record(t):
        seen["x"] = t
        return t

    net = small()
    Teacher(net, input_transform=record)(torch.ones(1, 1, 8, 8))
    assert torch.equal(seen["x"], torch.ones(1, 1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    full = Teacher(net)(x).logits
    low = Teacher(net, precision="bf16")(x).logits
    assert low.dtype == torch.float32 and not torch.equal(low, full)
    assert torch.allclose(low, full, atol=0.1)
    with pytest.raises(ValueError, match="precision"):
        Teacher(net, precision="int8")


def test_feature_taps_and_wrappers():
    net = create_model("resnet8", num_classes=10)
    taps = FeatureTaps(net, ["layer2", "layer3.0.conv1"])
    net(torch.randn(2, 3, 16, 16))
    feats = taps.pop()
    assert feats["layer2"].shape == (2, 32, 8, 8) and feats["layer3.0.conv1"].shape == (2, 64, 4, 4)
    assert taps.features == {}
    with pytest.raises(RuntimeError, match="did not run"):
        taps.pop()
    taps.remove()
    # paths resolve through DDP-like (.module) and torch.compile (._orig_mod) wrappers
    wrapper = nn.Module()
    wrapper.module = torch.compile(net)
    with FeatureTaps(wrapper, ["layer1"]) as t2:
        forward_output(net, torch.randn(1, 3, 8, 8))
        assert "layer1" in t2.pop()
    with pytest.raises(ValueError, match=r"no submodule 'layer4'.*Closest module paths: .*layer1"):
        FeatureTaps(net, ["layer4"])


def test_projector_shapes():
    s, t = torch.randn(2, 16, 8, 8), torch.randn(2, 64, 4, 4)
    p = Projector.between(s, t)
    assert p(s).shape == t.shape
    p = Projector.between(torch.randn(2, 8, 4, 4), torch.randn(2, 32, 8, 8))
    assert p(torch.randn(2, 8, 4, 4)).shape == (2, 32, 8, 8)
    p = Projector.between(torch.randn(2, 10), torch.randn(2, 20))
    assert p(torch.randn(2, 10)).shape == (2, 20)
    with pytest.raises(ValueError, match="rank"):
        Projector.between(torch.randn(2, 10), torch.randn(2, 3, 4, 4))


def test_projector_set_rebuilds_from_state_dict_strictly():
    a = ProjectorSet()
    a.ensure("hint", torch.randn(2, 16, 8, 8), torch.randn(2, 64, 4, 4))
    a.ensure("emb", torch.randn(2, 10), torch.randn(2, 20))
    state = a.state_dict()
    b = ProjectorSet()
    b.load_state_dict(state, strict=True)
    x = torch.randn(3, 16, 8, 8)
    a.eval(), b.eval()
    assert torch.equal(a["hint"](x), b["hint"](x))
    c = ProjectorSet()
    c.ensure("hint", torch.randn(2, 8, 8, 8), torch.randn(2, 64, 4, 4))
    with pytest.raises(ValueError, match="checkpoint projector .* has spec"):
        c.load_state_dict(state)
