"""Our KD against torchdistill's `KDLoss` (the peer of `benchmarks/peers.py`): the same values
up to the documented conventions, on logits from real timm networks and on extreme logits."""

import pytest
import torch

pytest.importorskip("torchdistill")

from benchmarks.peers import kd_conventions, our_terms, torchdistill_kd_loss  # noqa: E402
from toolkit.distill import Teacher  # noqa: E402
from toolkit.functional.kd import kd_loss  # noqa: E402
from toolkit.models import create_model  # noqa: E402
from toolkit.modules import DistillationModule  # noqa: E402


def _module(temperature: float, alpha: float, teacher=None, student=None) -> DistillationModule:
    teacher = teacher or create_model("convnet", num_classes=10, in_chans=1, width=4)
    student = student or create_model("convnet", num_classes=10, in_chans=1, width=4)
    return DistillationModule(student, Teacher(teacher), num_classes=10, terms=our_terms(temperature, alpha))


@pytest.mark.parametrize(
    ("temperature", "alpha", "scale"), [(4.0, 0.5, 3.0), (1.0, 0.9, 1.0), (2.0, 0.1, 1e3)]
)
def test_kd_equals_torchdistill_up_to_tau_squared_and_totals_match(temperature, alpha, scale, rng):
    s = torch.randn(32, 10, generator=rng) * scale
    t = torch.randn(32, 10, generator=rng) * scale
    y = torch.randint(0, 10, (32,), generator=rng)
    v = kd_conventions(_module(temperature, alpha), s, t, y, temperature)
    # torchdistill's KDLoss without the CE part (alpha=0) is the bare batchmean KL: ours carries τ²
    assert v["ours_kd"] == pytest.approx(temperature**2 * v["theirs_kl"], rel=1e-5, abs=1e-6)
    # α·CE + (1 − α)·τ²·KL: their total equals our bus total with weights (α, 1 − α)
    assert v["theirs_total"] == pytest.approx(v["ours_total"], rel=1e-5, abs=1e-6)


def test_kd_gradients_match_torchdistill(rng):
    s = torch.randn(16, 10, generator=rng, requires_grad=True)
    t = torch.randn(16, 10, generator=rng)
    y = torch.randint(0, 10, (16,), generator=rng)
    loss = torchdistill_kd_loss(4.0, alpha=0.5)({".": {"output": s}}, {".": {"output": t}}, y)
    (g_theirs,) = torch.autograd.grad(loss, s)
    ours = 0.5 * torch.nn.functional.cross_entropy(s, y) + 0.5 * kd_loss(s, t, 4.0)
    (g_ours,) = torch.autograd.grad(ours, s)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)


def test_same_value_on_real_timm_logits(rng):
    """The benchmark's networks (timm ResNet-18 teacher, ResNet-10t student, built from config)."""
    torch.manual_seed(0)
    teacher = create_model("timm:resnet18", num_classes=10, pretrained=False)
    student = create_model("timm:resnet10t", num_classes=10, pretrained=False)
    module = _module(4.0, 0.5, teacher, student)
    x = torch.randn(8, 3, 32, 32, generator=rng)
    y = torch.randint(0, 10, (8,), generator=rng)
    with torch.no_grad():
        s, t = module.model.eval()(x), module.teacher(x).logits
    v = kd_conventions(module, s, t, y)
    # untrained networks: a KL near 0 (~2e-4), where the two float32 formulas (ours p_t·(log p_t − log p_s),
    # torchdistill's KLDivLoss on softmax targets) differ by cancellation, ~1e-6 in absolute terms
    assert v["ours_kd"] == pytest.approx(16.0 * v["theirs_kl"], rel=1e-5, abs=1e-5)
    assert v["theirs_total"] == pytest.approx(v["ours_total"], rel=1e-5)
