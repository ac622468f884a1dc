"""Saliency callbacks (grad_cam, grad_cam_pp, smooth_grad_cam_pp, eigen_cam, normgrad) and
`toolkit.functional.cam`: values against pytorch-grad-cam (the `grad-cam` package) and against
hand computations written here, limiting cases, gradients of the differentiable form, errors,
Lightning runs that write TensorBoard images and PNG files, and a recipe run."""

from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from toolkit import build, registry
from toolkit.callbacks import (
    EigenCAMCallback,
    GradCAMCallback,
    GradCAMPlusPlusCallback,
    NormGradCallback,
    SmoothGradCAMPlusPlusCallback,
)
from toolkit.functional.cam import (
    capture_layer,
    default_cam_layer,
    eigen_cam_projection,
    grad_cam_pp_weights,
    normgrad_saliency,
    resolve_cam_layer,
    saliency_maps,
)
from toolkit.models import create_model
from toolkit.modules import ClassificationModule

NAMES = ("grad_cam", "grad_cam_pp", "smooth_grad_cam_pp", "eigen_cam", "normgrad")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cnn(seed: int = 0, scale: float = 30.0) -> nn.Sequential:
    """conv-ReLU-conv-ReLU, global average pooling, linear head; the head is scaled so the raw
    maps are O(1) (pytorch-grad-cam's 1e-7 in its two min-max steps is then negligible)."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    with torch.no_grad():
        m[6].weight.mul_(scale)
    return m.eval()


def inputs(seed: int = 1, shape=(3, 2, 7, 9)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def minmax_upsample(raw: torch.Tensor, size) -> torch.Tensor:
    """ReLU, bilinear (half-pixel) upsampling, min-max: written out for the hand checks."""
    m = F.interpolate(F.relu(raw)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / (m.amax(dim=(1, 2), keepdim=True) + 1e-7)


def split_grads(model: nn.Sequential, x: torch.Tensor, target: torch.Tensor, at: int = 4):
    """Activations after model[:at] and d logit_target / d activations by a separate autograd pass."""
    a = model[:at](x).detach().requires_grad_(True)
    logits = model[at:](a)
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
    return a.detach(), g, logits.detach()


# ---------------------------------------------------------------------------- oracle: pytorch-grad-cam
@pytest.mark.parametrize("targets", [None, [0, 3, 4]])
def test_grad_cam_and_grad_cam_pp_match_pytorch_grad_cam(targets):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x = tiny_cnn(), inputs()
    oracle_targets = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
    for ours_kw, cls in (
        ({"method": "grad_cam"}, pgc.GradCAM),
        ({"method": "grad_cam_pp", "eps": 1e-6}, pgc.GradCAMPlusPlus),
    ):
        ours = saliency_maps(model, x, layer="3", targets=targets, **ours_kw).maps
        with cls(model, [model[3]]) as cam:
            theirs = cam(x, oracle_targets)
        assert ours.shape == (3, 7, 9)
        np.testing.assert_allclose(ours.numpy(), theirs, atol=2e-5)


def test_eigen_cam_matches_pytorch_grad_cam():
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    model, x = tiny_cnn(), inputs()
    ours = saliency_maps(model, x, "eigen_cam", "3").maps.numpy()
    acts = model[:4](x).detach()
    proj = get_2d_projection(acts.numpy())  # (B, h, w), LAPACK's sign
    # our sign rule, written independently: correlate positively with the channel-summed map
    total = acts.sum(1).numpy()
    for b in range(proj.shape[0]):
        if np.sum(proj[b] * (total[b] - total[b].mean())) < 0:
            proj[b] = -proj[b]
    expected = scale_cam_image(np.maximum(proj, 0), (9, 7))  # their base_cam tail (W, H)
    np.testing.assert_allclose(ours, scale_cam_image(expected), atol=2e-5)
    # the package's own EigenCAM: equal per sample, up to the arbitrary SVD sign
    with pgc.EigenCAM(model, [model[3]]) as cam:
        theirs = cam(x, None)
    flipped = scale_cam_image(scale_cam_image(np.maximum(-proj, 0), (9, 7)))
    for b in range(x.shape[0]):
        assert np.allclose(ours[b], theirs[b], atol=2e-5) or np.allclose(flipped[b], theirs[b], atol=2e-5)


# ---------------------------------------------------------------------------- hand computations
def test_grad_cam_of_linear_gap_model_is_the_class_weighted_activation_map():
    """For A → global average pooling → linear W, ∂y_c/∂A_k,ij = W_ck / (h·w): Grad-CAM is
    ReLU(Σ_k W_ck A_k) / (h·w), the CAM of Zhou et al."""
    model, x = tiny_cnn(), inputs()
    t = torch.tensor([1, 0, 4])
    raw = saliency_maps(model, x, "grad_cam", "3", t, size=None, normalize=False).maps
    acts = model[:4](x).detach()
    w = model[6].weight.detach()
    h, wd = acts.shape[-2:]
    for b in range(x.shape[0]):
        cam = sum(w[t[b], k] * acts[b, k] for k in range(acts.shape[1]))
        torch.testing.assert_close(raw[b], F.relu(cam) / (h * wd), atol=1e-6, rtol=1e-5)


def test_grad_cam_pp_weights_by_a_loop():
    g = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    g[0, 1] = 0  # a channel without gradient
    g[1, 2, 1:3] = 0  # zero positions
    a = F.relu(torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(4)))
    ours = grad_cam_pp_weights(a, g)
    for b in range(2):
        for k in range(3):
            s = float(a[b, k].sum())
            w = 0.0
            for i in range(4):
                for j in range(5):
                    gij = float(g[b, k, i, j])
                    den = 2 * gij**2 + s * gij**3
                    alpha = gij**2 / den if den != 0 else 0.0
                    w += alpha * max(gij, 0.0)
            assert ours[b, k].item() == pytest.approx(w, rel=1e-5, abs=1e-7)


def test_smooth_grad_cam_pp_by_hand_and_its_noise_free_limit():
    # at the first ReLU (layer "1") the gradient depends on the input (at the last one, before
    # global pooling and a linear head, it is the constant W_c / (h·w) and noise changes nothing)
    model, x = tiny_cnn(), inputs()
    t = torch.tensor([2, 2, 0])
    # zero noise: every copy is the clean input, so D^p = G^p and the map is Grad-CAM++'s
    pp = saliency_maps(model, x, "grad_cam_pp", "1", t).maps
    smooth0 = saliency_maps(model, x, "smooth_grad_cam_pp", "1", t, n_samples=3, noise_level=0.0).maps
    torch.testing.assert_close(smooth0, pp, atol=1e-6, rtol=0)
    # with noise: the averaged derivatives recomputed here, same noise stream
    n, level = 4, 0.2
    ours = saliency_maps(
        model,
        x,
        "smooth_grad_cam_pp",
        "1",
        t,
        n_samples=n,
        noise_level=level,
        generator=torch.Generator().manual_seed(7),
    ).maps
    gen = torch.Generator().manual_seed(7)
    sigma = level * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    d1 = d2 = d3 = 0
    for _ in range(n):
        noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen)
        _, g, _ = split_grads(model, noisy, t, at=2)
        d1, d2, d3 = d1 + g / n, d2 + g**2 / n, d3 + g**3 / n
    a, _, _ = split_grads(model, x, t, at=2)
    s = a.sum(dim=(2, 3), keepdim=True)
    den = 2 * d2 + s * d3
    alpha = torch.where(
        den != 0, d2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den)
    )
    w = (alpha * F.relu(d1)).sum(dim=(2, 3))
    expected = minmax_upsample((w[:, :, None, None] * a).sum(1), (7, 9))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (ours - pp).abs().max() > 1e-2  # the noise did something


def test_normgrad_is_the_per_position_weight_gradient_norm_of_a_virtual_identity():
    model, x = tiny_cnn(), inputs()
    t = torch.tensor([0, 1, 2])
    cap = capture_layer(model, x, "3", t)
    a, g = cap.activations.detach(), cap.gradients
    # a virtual 1x1 identity convolution after the layer: autograd's weight gradient is Σ_u g_u a_uᵀ
    ident = nn.Conv2d(6, 6, 1, bias=False)
    with torch.no_grad():
        ident.weight.copy_(torch.eye(6)[:, :, None, None])
    logits = model[4:](ident(model[:4](x)))
    (gw,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), ident.weight)
    torch.testing.assert_close(gw[:, :, 0, 0], torch.einsum("bchw,bdhw->cd", g, a), atol=1e-5, rtol=1e-5)
    # NormGrad = Frobenius norm of each position's term, by a loop
    ours = normgrad_saliency(a, g)
    sel = normgrad_saliency(a, g, selective=True)
    patch = normgrad_saliency(a, g, patch_size=3)
    unfolded = F.unfold(a, 3, padding=1).view(a.shape[0], 6 * 9, *a.shape[2:])
    for b in range(a.shape[0]):
        for i in range(a.shape[2]):
            for j in range(a.shape[3]):
                term = torch.outer(g[b, :, i, j], a[b, :, i, j])
                assert ours[b, i, j].item() == pytest.approx(
                    torch.linalg.matrix_norm(term).item(), rel=1e-5, abs=1e-7
                )
                term3 = torch.outer(g[b, :, i, j], unfolded[b, :, i, j])
                assert patch[b, i, j].item() == pytest.approx(
                    torch.linalg.matrix_norm(term3).item(), rel=1e-5, abs=1e-7
                )
                pos = [max(float(a[b, k, i, j] * g[b, k, i, j]), 0.0) for k in range(6)]
                assert sel[b, i, j].item() == pytest.approx(
                    math.sqrt(sum(p * p for p in pos)), rel=1e-5, abs=1e-7
                )
    maps = saliency_maps(model, x, "normgrad", "3", t).maps
    torch.testing.assert_close(maps, minmax_upsample(ours, (7, 9)), atol=1e-6, rtol=0)


def test_eigen_cam_properties():
    a = F.relu(torch.randn(2, 5, 4, 6, generator=torch.Generator().manual_seed(5))) + 0.1
    p = eigen_cam_projection(a)
    # invariant to a permutation of the channels
    torch.testing.assert_close(eigen_cam_projection(a[:, torch.randperm(5)]), p, atol=1e-5, rtol=1e-5)
    # uncentred (the paper): with non-negative activations, the top eigenvector of MᵀM (eigh here)
    # has one sign and the projection is non-negative
    for b in range(2):
        m = a[b].flatten(1).T.double()
        v = torch.linalg.eigh(m.T @ m).eigenvectors[:, -1]
        expected = (m @ (v * v.sum().sign())).view(4, 6).float()
        torch.testing.assert_close(
            eigen_cam_projection(a[b : b + 1], center=False)[0], expected, atol=1e-5, rtol=1e-5
        )
    assert (eigen_cam_projection(a, center=False) >= -1e-6).all()
    # signed to correlate positively with the summed activations
    total = a.sum(1)
    assert ((p * (total - total.mean(dim=(1, 2), keepdim=True))).sum(dim=(1, 2)) > 0).all()


# ---------------------------------------------------------------------------- differentiable form, dtypes
@pytest.mark.parametrize("method", NAMES)
def test_gradients_flow_through_the_maps(method):
    model, x = tiny_cnn(scale=3.0), inputs()
    model[4:].train()
    kw = (
        {"n_samples": 2, "generator": torch.Generator().manual_seed(0)}
        if method == "smooth_grad_cam_pp"
        else {}
    )
    res = saliency_maps(model, x, method, "3", torch.tensor([0, 1, 2]), create_graph=True, **kw)
    loss = (res.maps - 0.5).pow(2).mean()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    first_conv = grads[0]
    assert first_conv is not None and torch.isfinite(first_conv).all() and first_conv.abs().sum() > 0
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    if method != "eigen_cam":  # the gradient-based maps depend on the head through ∂y/∂A
        assert grads[-2] is not None and grads[-2].abs().sum() > 0
    # without create_graph the maps are plain tensors and no parameter gradient is touched
    detached = saliency_maps(model, x, method, "3", torch.tensor([0, 1, 2]), **kw).maps
    assert detached.grad_fn is None and all(p.grad is None for p in params)


def test_in_place_ops_after_the_layer_do_not_alter_the_capture():
    convnet = create_model("convnet", num_classes=10, in_chans=1, width=4).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cap = capture_layer(convnet, x, "features.1", targets=[3, 4])  # BatchNorm, then ReLU(inplace=True)
    with torch.no_grad():
        expected = convnet.features[:2](x)
    torch.testing.assert_close(cap.activations.detach(), expected)
    assert (cap.activations < 0).any()
    torch.testing.assert_close(cap.logits.detach(), convnet(x))
    a = expected.clone().requires_grad_(True)
    h = convnet.features[3:](F.relu(a))  # the in-place ReLU written out of place
    logits = convnet.fc(torch.flatten(F.adaptive_avg_pool2d(h, 4), 1))
    (g,) = torch.autograd.grad(logits[[0, 1], [3, 4]].sum(), a)
    torch.testing.assert_close(cap.gradients, g)


def test_bf16_model_and_inference_mode():
    model, x = tiny_cnn(), inputs()
    with torch.inference_mode():  # as Lightning validates: the function leaves it
        ref = saliency_maps(model, x, "grad_cam", "3").maps
    assert ref.shape == (3, 7, 9) and not ref.is_inference()
    bf = saliency_maps(model.to(torch.bfloat16), x.to(torch.bfloat16), "grad_cam_pp", "3").maps
    assert bf.dtype == torch.float32 and torch.isfinite(bf).all() and bf.min() >= 0 and bf.max() <= 1


# ---------------------------------------------------------------------------- layers and errors
def test_default_layers_and_bad_paths():
    timm = pytest.importorskip("timm")
    assert default_cam_layer(create_model("resnet8", num_classes=10), torch.randn(1, 3, 16, 16)) == "layer3"
    assert default_cam_layer(create_model("wrn_16_1", num_classes=10), torch.randn(1, 3, 16, 16)) == "relu"
    convnet = create_model("convnet", num_classes=10, in_chans=1, width=4)
    assert default_cam_layer(convnet, torch.randn(1, 1, 8, 8)) == "features"
    assert (
        default_cam_layer(timm.create_model("resnet10t", num_classes=3), torch.randn(1, 3, 32, 32))
        == "layer4"
    )
    assert default_cam_layer(tiny_cnn(), inputs()[:1]) == "3"  # plain nn.Module: last spatial module
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(
        ValueError, match=r"no submodule 'featurs'.*Closest: features.*features\.0 \(4, 8, 8\)"
    ):
        resolve_cam_layer(convnet, "featurs", x)
    with pytest.raises(ValueError, match=r"'fc' .* gives no \(B, C, H, W\) output.*features\.2"):
        resolve_cam_layer(convnet, "fc", x)
    with pytest.raises(ValueError, match="unknown saliency method 'gradcam'.*'grad_cam'"):
        saliency_maps(convnet, x, "gradcam", "features")
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        saliency_maps(convnet, x, "grad_cam", "features", targets=10)
    with pytest.raises(ValueError, match=r"one class per sample \(1,\)"):
        saliency_maps(convnet, x, "grad_cam", "features", targets=[1, 2])
    with pytest.raises(ValueError, match="patch_size must be an odd integer"):
        saliency_maps(convnet, x, "normgrad", "features", patch_size=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"target": "truth"}, "target must be one of"),
        ({"layer": ""}, "layer must be a module path"),
        ({"alpha": 2}, r"alpha must be in \[0, 1\]"),
        ({"cmap": "nope"}, "colormap"),
        ({"prefix": "a/b"}, "prefix"),
    ],
)
def test_callback_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradCAMCallback(**kwargs)
    with pytest.raises(TypeError, match="n_sample"):
        GradCAMCallback(n_sample=3)  # an option of another method (or a typo) fails at construction


def test_method_option_errors():
    with pytest.raises(ValueError, match="n_samples"):
        SmoothGradCAMPlusPlusCallback(n_samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        SmoothGradCAMPlusPlusCallback(noise_level=-1)
    with pytest.raises(ValueError, match="patch_size must be 1"):
        NormGradCallback(selective=True, patch_size=3)
    with pytest.raises(ValueError, match="eps"):
        GradCAMPlusPlusCallback(eps=-1)
    for name, cls in zip(
        NAMES,
        (
            GradCAMCallback,
            GradCAMPlusPlusCallback,
            SmoothGradCAMPlusPlusCallback,
            EigenCAMCallback,
            NormGradCallback,
        ),
    ):
        assert registry.get("callback", name) is cls


def digits_module():
    torch.manual_seed(0)
    return ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        loss="cross_entropy",
        model_kwargs={"width": 8},
        optimizer={"name": "adam", "lr": 0.01},
    )


def quiet_trainer(**kw):
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=1,
    )
    base.update(kw)
    return L.Trainer(**base)


def test_fit_errors_name_the_fix(tmp_path):
    dm = build("data", "digits", batch_size=32, val_split=20)
    with pytest.raises(ValueError, match=r"only 20 samples, fewer than num_samples=64.*probe="):
        quiet_trainer(max_epochs=1, callbacks=[GradCAMCallback(num_samples=64)]).fit(
            digits_module(), datamodule=dm
        )
    with pytest.raises(
        ValueError, match=r"no submodule 'layer3'.*\(B, C, H, W\) output.*features\.7 \(16, 2, 2\)"
    ):
        quiet_trainer(max_epochs=1, callbacks=[GradCAMCallback(layer="layer3", dirpath=tmp_path)]).fit(
            digits_module(), datamodule=dm
        )
    with pytest.warns(UserWarning, match="computed no saliency maps"):
        quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[GradCAMCallback(dirpath=tmp_path)]).fit(
            digits_module(), datamodule=dm
        )
    with pytest.warns(UserWarning, match="during fit only"):
        quiet_trainer(callbacks=[GradCAMCallback()]).validate(digits_module(), datamodule=dm, verbose=False)


def test_compute_restores_modes_hooks_and_grads():
    dm = build("data", "digits", batch_size=32)
    dm.setup("fit")
    module = digits_module()
    x, y = next(iter(dm.val_dataloader()))[:2]
    cb = NormGradCallback(probe=(x[:12], y[:12]), target="label")
    trainer = quiet_trainer(max_epochs=1)
    cb.setup(trainer, module, "fit")
    cb.on_fit_start(trainer, module)
    module.train()
    module.model.features[1].eval()  # a mixed state, as with frozen BatchNorm
    modes = {n: m.training for n, m in module.named_modules()}
    with torch.inference_mode():
        maps, targets, preds = cb.compute(module)
    assert maps.shape == (12, 8, 8) and torch.equal(targets, y[:12]) and preds.shape == (12,)
    assert {n: m.training for n, m in module.named_modules()} == modes
    assert all(not m._forward_hooks for m in module.modules())
    assert all(p.grad is None for p in module.parameters())


# ---------------------------------------------------------------------------- Lightning runs
def test_lightning_run_writes_tensorboard_images_and_pngs(tmp_path):
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dm = build("data", "digits", batch_size=32)
    logger = TensorBoardLogger(str(tmp_path), name="run", version="")
    cbs = [GradCAMCallback(every_n_epochs=2), EigenCAMCallback(num_samples=5, target="label", nrow=4)]
    quiet_trainer(max_epochs=3, logger=logger, callbacks=cbs).fit(digits_module(), datamodule=dm)
    # every 2 epochs and after the last: epochs 1 and 2 (0-based) for grad_cam, every epoch for eigen_cam
    grad_pngs = sorted(p.name for p in (tmp_path / "run" / "saliency" / "grad_cam").glob("*.png"))
    assert grad_pngs == ["epoch=001.png", "epoch=002.png"]
    assert len(list((tmp_path / "run" / "saliency" / "eigen_cam").glob("*.png"))) == 3
    acc = EventAccumulator(str(tmp_path / "run")).Reload()
    assert {"saliency/grad_cam", "saliency/eigen_cam"} <= set(acc.Tags()["images"])
    # 16 probe images of 8x8 upscaled 8x to 64 px, rows of 8: inputs, overlays, inputs, overlays
    grad_events = acc.Images("saliency/grad_cam")
    assert len(grad_events) == 2
    assert (grad_events[-1].height, grad_events[-1].width) == (4 * 64 + 5 * 2, 8 * 64 + 9 * 2)
    eig = acc.Images("saliency/eigen_cam")[-1]  # 5 images, rows of 4 (the last row padded)
    assert (eig.height, eig.width) == (4 * 64 + 5 * 2, 4 * 64 + 5 * 2)
    png = imread(tmp_path / "run" / "saliency" / "grad_cam" / "epoch=002.png")
    assert png.shape[:2] == (grad_events[-1].height, grad_events[-1].width)
    assert cbs[0].layer_path == "features" and cbs[0].last_maps.shape == (16, 8, 8)
    assert 0 <= cbs[0].last_maps.min() and cbs[0].last_maps.max() <= 1 + 1e-6


class PlainNet(L.LightningModule):
    """No `.model`, no timm API: paths are relative to the LightningModule itself."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))

    def training_step(self, batch, _):
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_every_callback_on_a_plain_lightning_module_without_datamodule(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 1, 6, 6, generator=g), torch.randint(0, 10, (24,), generator=g))
    cbs = [
        GradCAMCallback(num_samples=10, dirpath=tmp_path),
        GradCAMPlusPlusCallback(num_samples=10, dirpath=tmp_path),
        SmoothGradCAMPlusPlusCallback(num_samples=10, dirpath=tmp_path, n_samples=2),
        EigenCAMCallback(num_samples=10, dirpath=tmp_path),
        NormGradCallback(num_samples=10, dirpath=tmp_path, layer="conv1", patch_size=3),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_epochs=1, callbacks=cbs, limit_val_batches=None, num_sanity_val_steps=1).fit(
            PlainNet(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)
        )
    for cb in cbs:
        assert cb.layer_path == ("conv1" if cb.method == "normgrad" else "conv2")
        # the first 10 validation samples (the sanity check's single batch is not counted twice)
        assert torch.equal(cb.probe_inputs, data.tensors[0][:10])
        assert cb.last_maps.shape == (10, 6, 6) and torch.isfinite(cb.last_maps).all()
        assert (tmp_path / cb.name / "epoch=000.png").is_file()


def test_recipe_run_with_grad_cam(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from recipes import train

    res = train.main(
        [
            "--data",
            "digits",
            "--fast",
            "--callbacks",
            "grad_cam",
            "--callbacks.grad_cam.num_samples",
            "8",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["config"]["callbacks"] == {"grad_cam": {"num_samples": 8}}
    images = {}
    for events in (tmp_path / "tb").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events)).Reload()
        images.update({t: acc.Images(t) for t in acc.Tags()["images"]})
    assert len(images["saliency/grad_cam"]) == 1
    assert (images["saliency/grad_cam"][0].height, images["saliency/grad_cam"][0].width) == (
        2 * 64 + 3 * 2,
        8 * 64 + 9 * 2,
    )
    assert len(list((tmp_path / "tb").rglob("saliency/grad_cam/epoch=000.png"))) == 1
