"""Class activation maps: Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, Eigen-CAM and NormGrad.

One shared core for every method: the activations A (B, C, h, w) of a target layer and the
gradients G = ∂y^c/∂A of the target class score y^c (the logit, before softmax) → the method's
rule → a raw map (B, h, w) → ReLU → bilinear upsampling to the input size (half-pixel centres,
`align_corners=False`) → per-sample min-max normalisation to [0, 1]:

    map = (m − min m) / (max m − min m + 1e-7),  m = upsample(ReLU(raw))

Only the rule differs between the methods:

- Grad-CAM (Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra, "Grad-CAM: Visual Explanations
  from Deep Networks via Gradient-based Localization", ICCV 2017, arXiv 1610.02391):
      w_k = (1/Z) Σ_ij G_k,ij,   raw = Σ_k w_k A_k           (Eq. 1-2, Z = h·w)
- Grad-CAM++ (Chattopadhay, Sarkar, Howlader & Balasubramanian, WACV 2018, arXiv 1710.11063), the
  closed form of Eq. 19 for an exponential output, in which only powers of the first derivative
  appear:
      α_k,ij = G²_k,ij / (2·G²_k,ij + Σ_ab A_k,ab · G³_k,ij)    (0 where the denominator is 0)
      w_k = Σ_ij α_k,ij · ReLU(G_k,ij),   raw = Σ_k w_k A_k
- Smooth Grad-CAM++ (Omeiza, Speakman, Cintas & Weldemariam, arXiv 1908.01224, 2019): Grad-CAM++
  with the first, second and third derivatives each averaged over n noisy copies x + N(0, σ²)
  of the input (SmoothGrad, Smilkov et al. 2017, arXiv 1706.03825):
      D^p = (1/n) Σ_m G(x + ε_m)^p,  α = D² / (2·D² + Σ_ab A_ab · D³),  w = Σ_ij α · ReLU(D¹)
  with A the activations of the clean input.
- Eigen-CAM (Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal Components",
  IJCNN 2020, arXiv 2008.00299): gradient-free and class-agnostic. M = A reshaped to (h·w, C),
  column-centred; raw = M·v₁ with v₁ its first right singular vector.
- NormGrad (Rebuffi, Fong, Ji & Vedaldi, "There and Back Again: Revisiting Backpropagation
  Saliency Methods", CVPR 2020, arXiv 2004.02866): the gradient of a virtual 1×1 identity
  convolution inserted after the layer is Σ_u g_u a_uᵀ; the saliency of position u is the
  Frobenius norm of its term, ‖g_u a_uᵀ‖_F = ‖g_u‖₂·‖a_u‖₂ (norms over channels). With a virtual
  k×k convolution (`patch_size=k`) a_u is the unfolded k×k patch (zero padding). The selective
  variant is ‖max(0, a_u ⊙ g_u)‖₂ (virtual scaling layer, positive contributions only).

What was confirmed, and from where:
- Grad-CAM / Grad-CAM++ / Eigen-CAM: against the maintained `grad-cam` package (jacobgil/
  pytorch-grad-cam 1.5.7: `grad_cam.py` = spatial mean of the gradients; `grad_cam_plusplus.py`
  = Eq. 19 with α zeroed where G = 0; `utils/svd_on_activations.py` = centred M, projection on
  the first row of Vᵀ; `base_cam.py` = ReLU, `scale_cam_image` min-max with 1e-7 then resize).
  tests/test_callbacks_saliency.py compares the maps with that package. Their min-max before
  resizing and again after it equals one min-max after resizing (bilinear resizing is a convex
  combination of pixels, so it commutes with affine maps), which is what is computed here.
  Their Grad-CAM++ adds 1e-6 to the denominator; here it is exact with a 0/0 guard (the
  `where(alpha_denom != 0, alpha_denom, 1)` of the Keras/TF ports of the authors' code), `eps`
  to reproduce theirs. Those ports also divide α by its per-channel spatial sum before weighting;
  Eq. 19, pytorch-grad-cam and torch-cam do not, and neither is it done here.
- Smooth Grad-CAM++: the paper averages each derivative order over the noisy samples; its printed
  α has D¹ in the numerator, a typo noted by torch-cam (frgfm/torch-cam `methods/gradient.py`):
  with it n = 1, σ = 0 would not give Grad-CAM++. D² is used here, so σ = 0 gives Grad-CAM++
  exactly (tested). The noise follows SmoothGrad: σ = noise_level · (max x − min x) per sample,
  noise_level 0.15 (SmoothGrad recommends 10-20 %); n = 25 samples by default (decided: the paper
  gives no value; torch-cam uses 4, yiskw713/SmoothGradCAMplusplus 25, SmoothGrad ~50).
- Eigen-CAM: the paper writes the projection of the activations themselves (L = O·V₁, no
  centring, per the reference notes; only the abstract of the full text was reachable here);
  pytorch-grad-cam centres them ("otherwise the image returned is negative"). Centred by default
  (as the maintained package), `center=False` gives the uncentred projection. The sign of v₁ is arbitrary (LAPACK's choice in the
  package); decided here: the sign that makes the projection correlate positively with the
  channel-summed activation map, so strongly activated regions are bright. Without centring and
  with non-negative activations this is the Perron-Frobenius sign, i.e. the paper's map.
- NormGrad: the official code (srebuffi/revisiting_saliency `resnet50_grid_saliency.py`, phase 1
  "conv1x1"/"conv3x3", phase 2 "norm") and the authors' TorchRay fork (ruthcfong/TorchRay
  `torchray/attribution/norm_grad.py`: `gradient_to_norm_grad_saliency` = ‖G_u‖·‖A_u‖ at the
  layer output, `gradient_to_norm_grad_selective_saliency` = ‖clamp(A ⊙ G, min=0)‖) — both
  upsample bilinearly and min-max normalise, as here. Not implemented: the paper's multi-layer
  products and its meta-learning "class sensitivity" step.

The functions are differentiable: `saliency_maps(..., create_graph=True)` keeps the graph of the
gradients, so a loss can be put on the maps (the tensor-level functions are differentiable in
their inputs; Eigen-CAM through the SVD, ill-conditioned when σ₁ ≈ σ₂). Everything is computed
in float32 (bf16/fp16 inputs are upcast; float64 stays float64).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.models.output import as_model_output, unwrap

METHODS = ("grad_cam", "grad_cam_pp", "smooth_grad_cam_pp", "eigen_cam", "normgrad")
GRADIENT_FREE = ("eigen_cam",)
NORM_EPS = 1e-7  # pytorch-grad-cam's `scale_cam_image`

Size = int | Sequence[int] | None


# ---------------------------------------------------------------------------- checks
def _up(t: Tensor) -> Tensor:
    """float32 for low-precision tensors (float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check_maps(name: str, t: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"{name} must be a (B, C, H, W) feature map of a convolutional layer, got {shape}; "
            "pick a layer whose output is spatial (e.g. the last conv stage)"
        )
    return t


def _check_pair(activations: Tensor, gradients: Tensor) -> None:
    _check_maps("activations", activations)
    _check_maps("gradients", gradients)
    if activations.shape != gradients.shape:
        raise ValueError(
            f"activations {tuple(activations.shape)} and gradients {tuple(gradients.shape)} must have the same shape"
        )


def _size(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be None, an int or (H, W) with positive entries, got {size}")
    return size


# ---------------------------------------------------------------------------- the shared core
def weighted_activations(activations: Tensor, weights: Tensor) -> Tensor:
    """Σ_k w_k A_k: (B, C, h, w) activations and (B, C) channel weights → (B, h, w)."""
    _check_maps("activations", activations)
    if weights.shape != activations.shape[:2]:
        raise ValueError(
            f"weights must be (B, C) = {tuple(activations.shape[:2])}, got {tuple(weights.shape)}"
        )
    return torch.einsum("bc,bchw->bhw", _up(weights), _up(activations))


def finish_map(
    raw: Tensor, size: Size = None, relu: bool = True, normalize: bool = True, eps: float = NORM_EPS
) -> Tensor:
    """The common tail of every method: (B, h, w) raw map → ReLU → bilinear upsampling to `size`
    (None keeps h×w) → per-sample min-max to [0, 1] (a constant map becomes 0)."""
    if raw.dim() != 3:
        raise ValueError(f"a raw map must be (B, h, w), got {tuple(raw.shape)}")
    m = _up(raw)
    if relu:
        m = F.relu(m)
    size = _size(size)
    if size is not None and tuple(m.shape[-2:]) != size:
        m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if normalize:
        m = m - m.amin(dim=(1, 2), keepdim=True)
        m = m / (m.amax(dim=(1, 2), keepdim=True) + eps)
    return m


# ---------------------------------------------------------------------------- weighting rules
def grad_cam_weights(gradients: Tensor) -> Tensor:
    """Grad-CAM channel weights w_k = mean_ij ∂y^c/∂A_k,ij: (B, C, h, w) → (B, C)."""
    return _up(_check_maps("gradients", gradients)).mean(dim=(2, 3))


def grad_cam_pp_weights(
    activations: Tensor,
    gradients: Tensor,
    grad_pow2: Tensor | None = None,
    grad_pow3: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """Grad-CAM++ channel weights (B, C): w_k = Σ_ij α_k,ij ReLU(G_k,ij) with
    α = G² / (2G² + Σ_ab A_k,ab · G³ + eps), 0 where the denominator is 0.

    `gradients` is D¹; `grad_pow2` / `grad_pow3` replace G² / G³ (Smooth Grad-CAM++ passes the
    averages over noisy samples; default: the powers of `gradients`). `eps=1e-6` reproduces
    pytorch-grad-cam."""
    _check_pair(activations, gradients)
    g = _up(gradients)
    g2 = g.pow(2) if grad_pow2 is None else _up(grad_pow2)
    g3 = g.pow(3) if grad_pow3 is None else _up(grad_pow3)
    if g2.shape != g.shape or g3.shape != g.shape:
        raise ValueError("grad_pow2 and grad_pow3 must have the shape of gradients")
    total = _up(activations).sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + total * g3 + eps
    nonzero = denom != 0
    alpha = torch.where(
        nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(g2)
    )
    return (alpha * F.relu(g)).sum(dim=(2, 3))


def eigen_cam_projection(activations: Tensor, center: bool = True) -> Tensor:
    """Eigen-CAM raw map (B, h, w): the (column-centred if `center`) (h·w, C) activation matrix
    projected on its first right singular vector, signed to correlate positively with Σ_k A_k."""
    a = _up(_check_maps("activations", activations))
    b, _, h, w = a.shape
    m = a.flatten(2).transpose(1, 2)  # (B, hw, C)
    if center:
        m = m - m.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    proj = (m @ vh[:, 0, :, None])[..., 0]  # (B, hw)
    total = a.sum(dim=1).flatten(1)
    corr = (proj * (total - total.mean(dim=1, keepdim=True))).sum(dim=1)
    sign = torch.where(corr < 0, -torch.ones_like(corr), torch.ones_like(corr)).detach()
    return (proj * sign[:, None]).view(b, h, w)


def normgrad_saliency(
    activations: Tensor, gradients: Tensor, selective: bool = False, patch_size: int = 1
) -> Tensor:
    """NormGrad raw map (B, h, w): ‖G_u‖₂·‖A_u‖₂ per position u (norms over channels; with
    `patch_size` k > 1, ‖A_u‖ is the norm of the zero-padded k×k patch around u), or with
    `selective` ‖max(0, A_u ⊙ G_u)‖₂."""
    _check_pair(activations, gradients)
    if int(patch_size) != patch_size or patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(
            f"patch_size must be an odd integer >= 1 (1 = virtual 1x1 identity), got {patch_size}"
        )
    a, g = _up(activations), _up(gradients)
    if selective:
        if patch_size != 1:
            raise ValueError("selective NormGrad uses the virtual scaling layer: patch_size must be 1")
        return torch.linalg.vector_norm(F.relu(a * g), dim=1)
    grad_norm = torch.linalg.vector_norm(g, dim=1)
    if patch_size == 1:
        act_norm = torch.linalg.vector_norm(a, dim=1)
    else:
        sq = a.pow(2).sum(dim=1, keepdim=True)
        ones = torch.ones(1, 1, patch_size, patch_size, dtype=sq.dtype, device=sq.device)
        act_norm = F.conv2d(sq, ones, padding=patch_size // 2)[:, 0].clamp_min(0).sqrt()
    return grad_norm * act_norm


# ---------------------------------------------------------------------------- maps from tensors
def grad_cam(activations: Tensor, gradients: Tensor, size: Size = None, normalize: bool = True) -> Tensor:
    """Grad-CAM map (B, H, W) from a layer's activations and the target-score gradients."""
    _check_pair(activations, gradients)
    return finish_map(
        weighted_activations(activations, grad_cam_weights(gradients)), size, normalize=normalize
    )


def grad_cam_pp(
    activations: Tensor,
    gradients: Tensor,
    size: Size = None,
    normalize: bool = True,
    grad_pow2: Tensor | None = None,
    grad_pow3: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """Grad-CAM++ map (B, H, W); with averaged `grad_pow2`/`grad_pow3` (and averaged `gradients`)
    it is the Smooth Grad-CAM++ map."""
    w = grad_cam_pp_weights(activations, gradients, grad_pow2, grad_pow3, eps)
    return finish_map(weighted_activations(activations, w), size, normalize=normalize)


def eigen_cam(activations: Tensor, size: Size = None, normalize: bool = True, center: bool = True) -> Tensor:
    """Eigen-CAM map (B, H, W) from a layer's activations (no gradients, no class)."""
    return finish_map(eigen_cam_projection(activations, center), size, normalize=normalize)


def normgrad(
    activations: Tensor,
    gradients: Tensor,
    size: Size = None,
    normalize: bool = True,
    selective: bool = False,
    patch_size: int = 1,
) -> Tensor:
    """NormGrad map (B, H, W) at a layer's output (virtual identity after the layer)."""
    return finish_map(
        normgrad_saliency(activations, gradients, selective, patch_size), size, normalize=normalize
    )


# ---------------------------------------------------------------------------- layers of a model
def _first_tensor(output: Any) -> Any:
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


def _run(model: nn.Module, forward: Callable[[Tensor], Any] | None, x: Tensor) -> Tensor:
    out = forward(x) if forward is not None else model(x)
    logits = out if isinstance(out, Tensor) else as_model_output(out).logits
    if logits.dim() != 2:
        raise ValueError(
            f"saliency maps need (B, num_classes) logits from the forward pass, got shape {tuple(logits.shape)}"
        )
    return logits


def cam_layer_candidates(
    model: nn.Module, example: Tensor, forward: Callable[[Tensor], Any] | None = None
) -> dict[str, tuple[int, ...]]:
    """{module path: output shape} of every submodule of `model` with a (B, C, H, W) output in a
    forward pass on `example` (`forward(example)`, default `model(example)`; eval mode, no grad,
    modes restored), in order of completion."""
    root = unwrap(model)
    found: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(_m, _i, output):
            t = _first_tensor(output)
            if isinstance(t, Tensor) and t.dim() == 4:
                found.pop(name, None)
                found[name] = tuple(t.shape)

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in root.named_modules() if n]
    modes = {m: m.training for m in root.modules()}
    root.eval()
    try:
        with torch.no_grad():
            forward(example) if forward is not None else root(example)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return found


def default_cam_layer(
    model: nn.Module, example: Tensor, forward: Callable[[Tensor], Any] | None = None
) -> str:
    """The last convolutional stage: for timm-style models (`forward_features`: timm CNNs and the
    toolkit's CIFAR nets / convnet) the outermost module producing the `forward_features` map
    (timm ResNets: "layer4", EfficientNet: "bn2", ConvNeXt: "norm_pre"; CIFAR ResNets: "layer3",
    WRN: "relu", convnet: "features"; an error for token outputs such as ViTs'); other models: the
    last module in the forward pass with a (B, C, H, W) output larger than 1×1."""
    root = unwrap(model)
    if hasattr(root, "forward_features") and hasattr(root, "forward_head"):
        modes = {m: m.training for m in root.modules()}
        root.eval()
        try:
            with torch.no_grad():
                feats = root.forward_features(example)
        finally:
            for m, t in modes.items():
                m.training = t
        shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        if not isinstance(feats, Tensor) or feats.dim() != 4:
            raise ValueError(
                f"{type(root).__name__}.forward_features gives {shape}, not a (B, C, H, W) feature map (a "
                "transformer?): these CAMs need a convolutional layer; give layer=... explicitly"
            )
        cands = cam_layer_candidates(root, example, root.forward_features)  # the head's modules excluded
        same = [n for n, s in cands.items() if s == shape]
        if same:
            return same[-1]
    cands = cam_layer_candidates(root, example, forward)
    if not cands:
        raise ValueError(
            f"{type(root).__name__} has no submodule with a (B, C, H, W) output: CAMs need a convolutional "
            "feature map; give layer=... explicitly"
        )
    spatial = [n for n, s in cands.items() if s[2] * s[3] > 1]
    return (spatial or list(cands))[-1]


def _candidates_text(cands: dict[str, tuple[int, ...]], path: str = "", limit: int = 30) -> str:
    names = list(cands)
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.4) if path else []
    shown = names if len(names) <= limit else names[-limit:]
    listed = ", ".join(f"{n} {tuple(cands[n][1:])}" for n in shown)
    more = f" (last {limit} of {len(names)})" if len(names) > limit else ""
    hint = f" Closest: {', '.join(close)}." if close else ""
    return f"{hint} Modules with a (B, C, H, W) output{more}, as (C, H, W): {listed or 'none'}"


def resolve_cam_layer(
    model: nn.Module,
    layer: str | nn.Module | None,
    example: Tensor | None = None,
    forward: Callable[[Tensor], Any] | None = None,
) -> tuple[str, nn.Module]:
    """(path, module) of the target layer: a module path relative to the unwrapped `model`, a
    submodule, or None for `default_cam_layer` (needs `example`). A wrong path is an error that
    lists the modules with a (B, C, H, W) output (found by a dry run on `example`)."""
    root = unwrap(model)
    if isinstance(layer, nn.Module):
        for name, mod in root.named_modules():
            if mod is layer:
                return name, mod
        raise ValueError(
            f"the given layer module ({type(layer).__name__}) is not a submodule of {type(root).__name__}"
        )
    if layer is None:
        if example is None:
            raise ValueError("layer=None picks the default layer by a dry run: give an example input")
        layer = default_cam_layer(root, example, forward)
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module path (str), a submodule or None, got {type(layer).__name__}")
    try:
        module = root if layer in ("", ".") else root.get_submodule(layer)
    except AttributeError:
        if example is not None:
            listing = _candidates_text(cam_layer_candidates(root, example, forward), layer)
        else:
            names = [n for n, _ in root.named_modules() if n]
            close = difflib.get_close_matches(layer, names, n=5, cutoff=0.4)
            listing = (
                f" Closest module paths: {', '.join(close) or 'none'}. Module paths: {', '.join(names[-30:])}"
            )
        raise ValueError(f"{type(root).__name__} has no submodule {layer!r}.{listing}") from None
    if example is not None:
        cands = cam_layer_candidates(root, example, forward)
        if layer not in cands:
            raise ValueError(
                f"layer {layer!r} of {type(root).__name__} gives no (B, C, H, W) output in the forward pass "
                f"(CAMs need a spatial feature map).{_candidates_text(cands, layer)}"
            )
    return layer, module


# ---------------------------------------------------------------------------- model-level entry points
class LayerCapture(NamedTuple):
    activations: Tensor  # (B, C, h, w) output of the target layer
    gradients: Tensor | None  # ∂(Σ_b y_b^{c_b}) / ∂activations, or None
    logits: Tensor  # (B, K)
    targets: Tensor  # (B,) the explained class of every sample


class SaliencyResult(NamedTuple):
    maps: Tensor  # (B, H, W), in [0, 1] when normalised
    targets: Tensor  # (B,) explained classes
    logits: Tensor  # (B, K) logits of the clean input


def _targets(logits: Tensor, targets: int | Tensor | Sequence[int] | None) -> Tensor:
    b, k = logits.shape
    if targets is None:
        return logits.detach().argmax(dim=1)
    if isinstance(targets, int):
        t = torch.full((b,), targets, dtype=torch.long, device=logits.device)
    else:
        t = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
    if t.shape != (b,):
        raise ValueError(
            f"targets must be None (the predicted class), an int or one class per sample ({b},), got {tuple(t.shape)}"
        )
    if (t < 0).any() or (t >= k).any():
        raise ValueError(
            f"targets must be class indices in [0, {k}), got values {t.min().item()}..{t.max().item()}"
        )
    return t


def capture_layer(
    model: nn.Module,
    inputs: Tensor,
    layer: str | nn.Module,
    targets: int | Tensor | Sequence[int] | None = None,
    *,
    forward: Callable[[Tensor], Any] | None = None,
    create_graph: bool = False,
    need_gradients: bool = True,
) -> LayerCapture:
    """One forward pass: the output of `layer` and the gradient of the target-class logits
    (summed over the batch; samples are independent in eval mode) with respect to it.

    `forward(x) -> logits` runs the model (default `model(x)`). A forward hook records the layer's
    output (of its last call, for a module called several times in one pass) and hands a copy
    downstream, so in-place operations after the layer (ReLU(inplace=True)) cannot alter the
    recorded tensor. Gradients are taken with `torch.autograd.grad` with respect to
    the activations only: parameters' `.grad` are untouched. Works under `torch.no_grad` and
    `torch.inference_mode` (it leaves them and clones inference-mode inputs). The model's
    train/eval mode is left as it is."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be an image tensor (B, C, H, W), got {type(inputs).__name__}")
    path, module = resolve_cam_layer(model, layer)
    store: dict[str, Tensor] = {}

    def hook(_m, _i, output):
        t = _first_tensor(output)
        if not isinstance(t, Tensor):
            raise TypeError(f"layer {path!r} returns {type(output).__name__}, not a tensor")
        store["a"] = t
        return output.clone() if isinstance(output, Tensor) else None

    with torch.inference_mode(False), torch.enable_grad():
        x = inputs.clone() if inputs.is_inference() else inputs
        if need_gradients and x.is_floating_point() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # a graph even when every parameter is frozen
        handle = module.register_forward_hook(hook)
        try:
            logits = _run(model, forward, x)
        finally:
            handle.remove()
        if "a" not in store:
            raise RuntimeError(f"layer {path!r} did not run in the forward pass")
        acts = _check_maps(f"the output of layer {path!r}", store["a"])
        t = _targets(logits, targets)
        grads = None
        if need_gradients:
            if not acts.requires_grad:
                raise RuntimeError(
                    f"the output of layer {path!r} does not depend on anything that requires grad"
                )
            score = logits.gather(1, t[:, None]).sum()
            (grads,) = torch.autograd.grad(score, acts, create_graph=create_graph, retain_graph=create_graph)
    return LayerCapture(acts, grads, logits, t)


def saliency_maps(
    model: nn.Module,
    inputs: Tensor,
    method: str,
    layer: str | nn.Module | None = None,
    targets: int | Tensor | Sequence[int] | None = None,
    *,
    forward: Callable[[Tensor], Any] | None = None,
    size: Size = "input",
    normalize: bool = True,
    create_graph: bool = False,
    n_samples: int = 25,
    noise_level: float = 0.15,
    generator: torch.Generator | None = None,
    center: bool = True,
    selective: bool = False,
    patch_size: int = 1,
    eps: float = 0.0,
) -> SaliencyResult:
    """Saliency maps of `method` (one of METHODS) for `inputs` (B, C, H, W) at `layer` (module
    path, module, or None = `default_cam_layer`), explaining `targets` (None = the predicted
    class, an int, or one class per sample).

    size: "input" (default) upsamples to the input's H×W, None keeps the layer's h×w, or (H, W).
    create_graph: keep the graph of the gradients so the maps are differentiable w.r.t. the
    parameters (and inputs), for use in a loss. Smooth Grad-CAM++: `n_samples` noisy copies with
    σ = noise_level · (max − min of each input), drawn from `generator` (the global RNG if None).
    Eigen-CAM: `center`. NormGrad: `selective`, `patch_size`. Grad-CAM++: `eps` (see
    `grad_cam_pp_weights`). The model's train/eval mode is left as it is (call `model.eval()`
    first for the usual maps)."""
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown saliency method {method!r}; methods: {', '.join(METHODS)}.{hint}")
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError(
            f"inputs must be images (B, C, H, W), got {getattr(inputs, 'shape', type(inputs).__name__)}"
        )
    out_size = tuple(inputs.shape[-2:]) if size == "input" else _size(size)
    if layer is None:
        with torch.inference_mode(False):
            example = inputs[:1].clone()
        layer, _ = resolve_cam_layer(model, None, example, forward)
    kw = {"forward": forward, "create_graph": create_graph}
    grad_mode = torch.enable_grad() if create_graph else torch.no_grad()
    if method == "smooth_grad_cam_pp":
        if int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples}")
        if not noise_level >= 0:
            raise ValueError(
                f"noise_level must be >= 0 (a fraction of each input's value range), got {noise_level}"
            )
        clean = capture_layer(model, inputs, layer, targets, need_gradients=False, **kw)
        with torch.inference_mode(False):
            x = inputs.clone() if inputs.is_inference() else inputs
            span = _up(x.detach().amax(dim=(1, 2, 3)) - x.detach().amin(dim=(1, 2, 3)))
            sigma = (noise_level * span).view(-1, 1, 1, 1)
            d1 = d2 = d3 = 0.0
            for _ in range(int(n_samples)):
                noise = torch.randn(x.shape, generator=generator).to(x.device)
                noisy = x + (sigma * noise).to(x.dtype)
                g = _up(capture_layer(model, noisy, layer, clean.targets, **kw).gradients)
                d1, d2, d3 = d1 + g, d2 + g.pow(2), d3 + g.pow(3)
            n = float(n_samples)
            with grad_mode:
                maps = grad_cam_pp(clean.activations, d1 / n, out_size, normalize, d2 / n, d3 / n, eps)
        return SaliencyResult(maps, clean.targets, clean.logits)
    cap = capture_layer(model, inputs, layer, targets, need_gradients=method not in GRADIENT_FREE, **kw)
    with torch.inference_mode(False), grad_mode:
        if method == "grad_cam":
            maps = grad_cam(cap.activations, cap.gradients, out_size, normalize)
        elif method == "grad_cam_pp":
            maps = grad_cam_pp(cap.activations, cap.gradients, out_size, normalize, eps=eps)
        elif method == "eigen_cam":
            maps = eigen_cam(cap.activations, out_size, normalize, center)
        else:
            maps = normgrad(cap.activations, cap.gradients, out_size, normalize, selective, patch_size)
    return SaliencyResult(maps, cap.targets, cap.logits)
