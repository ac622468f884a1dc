"""Saliency maps of a fixed probe batch during training, as Lightning callbacks.

    trainer = L.Trainer(callbacks=[GradCAMCallback(num_samples=16, every_n_epochs=5)])
    python -m recipes.train --callbacks grad_cam --callbacks.grad_cam.layer layer3

One registered callback per method of `toolkit.functional.cam` (formulas, sources and what was
confirmed are in that module's docstring): `grad_cam`, `grad_cam_pp`, `smooth_grad_cam_pp`,
`eigen_cam`, `normgrad`. They share `SaliencyCallback`, which fixes the probe batch at setup,
picks the target layer, computes the maps every k epochs at the end of validation and writes
them as image grids (heat maps over the inputs) to TensorBoard and as PNG files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from toolkit.functional.cam import METHODS, resolve_cam_layer, saliency_maps
from toolkit.models.output import as_model_output, unwrap
from toolkit.registry import register
from toolkit.types import as_batch

TARGETS = ("predicted", "label")


def _default_forward(pl_module: Any, x: Tensor) -> Tensor:
    return as_model_output(pl_module(x)).logits


def display_images(images: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] for display: each image min-max scaled; one channel (or two,
    averaged) shown as grey, more than three: the first three."""
    img = images.detach().float().cpu()
    if img.shape[1] == 2:
        img = img.mean(1, keepdim=True)
    img = img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img[:, :3]
    lo = img.amin(dim=(1, 2, 3), keepdim=True)
    hi = img.amax(dim=(1, 2, 3), keepdim=True)
    return (img - lo) / (hi - lo).clamp_min(1e-12)


def heatmap_overlay(images: Tensor, maps: Tensor, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """(N, 3, H, W) in [0, 1]: `display_images(images)` blended with the (N, H, W) maps in [0, 1]
    coloured by the matplotlib colormap `cmap` (opacity `alpha`)."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](maps.detach().float().cpu().clamp(0, 1).numpy())[..., :3]
    heat = torch.from_numpy(colours).float().permute(0, 3, 1, 2)
    return (1 - alpha) * display_images(images) + alpha * heat


def saliency_grid(images: Tensor, overlays: Tensor, nrow: int = 8, upscale: int = 1) -> Tensor:
    """A (3, H', W') grid: rows of up to `nrow` inputs, each followed by the row of their
    overlays (a short last row is padded with white); pixels repeated `upscale` times (nearest)."""
    from torchvision.utils import make_grid

    img = display_images(images)
    cols = min(nrow, img.shape[0])
    tiles = []
    for start in range(0, img.shape[0], cols):
        for part in (img[start : start + cols], overlays[start : start + cols].float().cpu()):
            pad = cols - part.shape[0]
            tiles.append(torch.cat([part, torch.ones(pad, *part.shape[1:])]) if pad else part)
    batch = torch.cat(tiles)
    if upscale > 1:
        batch = batch.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    return make_grid(batch, nrow=cols, padding=2, pad_value=1.0)


class SaliencyCallback(Callback):
    """Saliency maps of a fixed probe batch, every `every_n_epochs` epochs, as images.

    Setup ("fit" only; other stages do nothing, with a warning unless the callback ran in a fit
    before): the probe batch is `probe` if given (a
    tensor (N, C, H, W), or an (inputs, targets) pair), else the first `num_samples` samples of the
    DataModule's validation loader (an error if it has fewer). Without a DataModule the probe is
    the first `num_samples` validation samples seen during the first validation run. At fit start
    the target layer is resolved by module path, relative to `pl_module.model` when the module has
    one (the toolkit modules: "layer3", "features", "blocks.11" ...), else to the LightningModule;
    a wrong path is an error listing the modules with a (B, C, H, W) output. `layer=None` picks the
    last convolutional stage (`toolkit.functional.cam.default_cam_layer`).

    At the end of validation (never in the sanity check), every `every_n_epochs` epochs and after
    the last epoch, on global rank 0: the maps are computed with gradients enabled (Lightning
    validates under `torch.inference_mode`; the computation leaves it), in eval mode, through
    `forward_fn(pl_module, x) -> logits` (default: `pl_module(x)`). Every module's train/eval flag
    is restored afterwards and the callback's forward hook removed; parameters' `.grad` are never
    touched (gradients are taken w.r.t. the layer's activations only). The explained class is the
    predicted one (`target="predicted"`), the probe's label (`target="label"`) or a fixed class
    (an int).

    Output: a grid (rows of inputs, each followed by the row of heat-map overlays) logged with
    `add_image(f"{prefix}/{name}", ...)` to every attached TensorBoard logger, at the global step,
    and saved as `{dirpath}/{name}/epoch={epoch:03d}.png` (default dirpath: `trainer.log_dir /
    "saliency"`). The last maps stay in `last_maps` (N, H, W), `last_targets`, `last_predictions`;
    `saved` lists the PNG files.

    Args:
        num_samples: probe size N when taken from the validation data.
        probe: explicit probe inputs (N, C, H, W), or (inputs, targets).
        layer: module path of the target layer (None: the last conv stage).
        target: "predicted", "label" or a class index.
        every_n_epochs: compute every this many epochs (and after the last one).
        dirpath: directory of the PNG files (None: `trainer.log_dir/saliency`); `save_png=False`
            disables them, `log_tensorboard=False` the TensorBoard images.
        alpha, cmap: overlay opacity and matplotlib colormap.
        display_size: images are upscaled (nearest) to at least this many pixels per side.
        nrow: images per grid row.
        forward_fn: `fn(pl_module, x) -> logits` (or anything `as_model_output` reads).
        prefix: TensorBoard tag prefix.
        name: the method's name in tags and file names (default: the registered name).
    """

    method: str = ""

    def __init__(
        self,
        num_samples: int = 16,
        probe: Any = None,
        layer: str | None = None,
        target: str | int = "predicted",
        every_n_epochs: int = 1,
        dirpath: str | Path | None = None,
        save_png: bool = True,
        log_tensorboard: bool = True,
        alpha: float = 0.5,
        cmap: str = "jet",
        display_size: int = 64,
        nrow: int = 8,
        forward_fn: Callable[[Any, Tensor], Any] | None = None,
        prefix: str = "saliency",
        name: str | None = None,
    ) -> None:
        super().__init__()
        if self.method not in METHODS:
            raise TypeError(f"{type(self).__name__}: set the class attribute `method` to one of {METHODS}")
        for key, value in (("num_samples", num_samples), ("every_n_epochs", every_n_epochs), ("nrow", nrow)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if int(display_size) != display_size or display_size < 0:
            raise ValueError(f"display_size must be an integer >= 0 (0: no upscaling), got {display_size!r}")
        if isinstance(target, bool) or not (target in TARGETS or (isinstance(target, int) and target >= 0)):
            raise ValueError(f"target must be one of {TARGETS} or a class index >= 0, got {target!r}")
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ValueError(
                f"layer must be a module path such as 'layer3' (or None for the last conv stage), got {layer!r}"
            )
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (overlay opacity), got {alpha}")
        import matplotlib

        if cmap not in matplotlib.colormaps:
            raise ValueError(
                f"cmap must be a matplotlib colormap name such as 'jet' or 'viridis', got {cmap!r}"
            )
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError("forward_fn must be callable as fn(pl_module, x) -> logits")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/', got {prefix!r}")
        self.num_samples = int(num_samples)
        self.layer = layer
        self.target = target
        self.every_n_epochs = int(every_n_epochs)
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.save_png = bool(save_png)
        self.log_tensorboard = bool(log_tensorboard)
        self.alpha = float(alpha)
        self.cmap = cmap
        self.display_size = int(display_size)
        self.nrow = int(nrow)
        self.forward_fn = forward_fn or _default_forward
        self.prefix = prefix
        self.name = name or self.method
        self.method_kwargs: dict[str, Any] = {}  # the method's own options (set by the subclasses)
        self.probe_inputs: Tensor | None = None
        self.probe_targets: Tensor | None = None
        self._given = self._split_probe(probe) if probe is not None else None
        self._active = False
        self._fitted = False
        self._collecting = False
        self._layer_path: str | None = None
        self.last_maps: Tensor | None = None
        self.last_targets: Tensor | None = None
        self.last_predictions: Tensor | None = None
        self.saved: list[Path] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.method, name=self.name, layer=self.layer, prefix=self.prefix
        )

    @property
    def layer_path(self) -> str | None:
        """The resolved target layer (after fit start)."""
        return self._layer_path

    # -- probe ----------------------------------------------------------------------------
    @staticmethod
    def _split_probe(probe: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(probe, Tensor):
            x, y = probe, None
        elif isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[0], Tensor):
            x, y = probe[0], None if probe[1] is None else torch.as_tensor(probe[1])
        else:
            raise TypeError("probe must be an image tensor (N, C, H, W) or an (inputs, targets) pair")
        if x.dim() != 4 or x.shape[0] < 1:
            raise ValueError(f"probe inputs must be images (N, C, H, W) with N >= 1, got {tuple(x.shape)}")
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"probe targets must be ({x.shape[0]},) class indices, got {tuple(y.shape)}")
        return x.detach().clone().cpu(), None if y is None else y.detach().clone().cpu().long()

    def _add(self, raw: Any, xs: list[Tensor], ys: list[Tensor | None]) -> int:
        batch = as_batch(raw)
        if not isinstance(batch.input, Tensor) or batch.input.dim() != 4:
            shape = (
                tuple(batch.input.shape) if isinstance(batch.input, Tensor) else type(batch.input).__name__
            )
            raise ValueError(
                f"{type(self).__name__}: saliency maps need image batches (B, C, H, W); the validation data gives {shape}"
            )
        with torch.inference_mode(False):  # normal tensors even when copied inside the validation loop
            xs.append(batch.input.detach().cpu().clone())
            ys.append(
                None if batch.target is None else torch.as_tensor(batch.target).detach().cpu().clone().long()
            )
        return sum(x.shape[0] for x in xs)

    def _set_probe(self, xs: list[Tensor], ys: list[Tensor | None], source: str) -> None:
        n = sum(x.shape[0] for x in xs)
        if n < self.num_samples:
            raise ValueError(
                f"{type(self).__name__}: {source} has only {n} samples, fewer than num_samples={self.num_samples}; "
                "lower num_samples or give probe=..."
            )
        self.probe_inputs = torch.cat(xs)[: self.num_samples]
        self.probe_targets = None if any(y is None for y in ys) else torch.cat(ys)[: self.num_samples]

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._active = stage == "fit"
        if not self._active:
            if self._fitted:  # e.g. trainer.test after trainer.fit: nothing to say
                return
            warnings.warn(
                f"{type(self).__name__} computes saliency maps at the end of validation during fit only; "
                f"nothing is logged in stage {stage!r}",
                stacklevel=2,
            )
            return
        self._fitted = True
        if self._given is not None:
            self.probe_inputs, self.probe_targets = self._given
        else:
            loader = None
            if trainer.datamodule is not None:
                try:
                    loader = trainer.datamodule.val_dataloader()
                except Exception:  # a DataModule without validation data: see the first validation run
                    loader = None
            if loader is not None:
                xs: list[Tensor] = []
                ys: list[Tensor | None] = []
                for raw in loader:
                    if self._add(raw, xs, ys) >= self.num_samples:
                        break
                self._set_probe(xs, ys, "the validation data")
            else:
                self._collecting = True  # the first validation batches, see on_validation_batch_start
                self._xs, self._ys = [], []
        if self.target == "label" and self.probe_inputs is not None and self.probe_targets is None:
            raise ValueError(
                f"{type(self).__name__}: target='label' needs labelled probe data; use target='predicted'"
            )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._collecting:  # the sanity check saw the same first batches: start again
            self._xs, self._ys = [], []

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._collecting and dataloader_idx == 0:
            if self._add(batch, self._xs, self._ys) >= self.num_samples:
                self._finish_collecting(trainer, pl_module)

    def _finish_collecting(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._collecting = False
        self._set_probe(self._xs, self._ys, "the first validation run")
        del self._xs, self._ys
        if self.target == "label" and self.probe_targets is None:
            raise ValueError(
                f"{type(self).__name__}: target='label' needs labelled probe data; use target='predicted'"
            )
        self._resolve_layer(pl_module)

    # -- model ----------------------------------------------------------------------------
    @staticmethod
    def _root(pl_module: Any) -> nn.Module:
        model = getattr(pl_module, "model", None)
        return unwrap(model) if isinstance(model, nn.Module) else pl_module

    def _inputs(self, pl_module: Any, x: Tensor) -> Tensor:
        param = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
        dtype = param.dtype if param is not None and x.is_floating_point() else x.dtype
        return x.to(device=pl_module.device, dtype=dtype)

    def _resolve_layer(self, pl_module: Any) -> None:
        with torch.inference_mode(False):
            example = self._inputs(pl_module, self.probe_inputs[:1])
            self._layer_path, _ = resolve_cam_layer(
                self._root(pl_module), self.layer, example, lambda x: self.forward_fn(pl_module, x)
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._active and self.probe_inputs is not None:
            self._resolve_layer(pl_module)

    def _targets(self, device: torch.device) -> Tensor | int | None:
        if self.target == "predicted":
            return None
        if self.target == "label":
            return self.probe_targets.to(device)
        return int(self.target)

    def compute(self, pl_module: Any) -> tuple[Tensor, Tensor, Tensor]:
        """(maps (N, H, W), explained classes (N,), predictions (N,)) for the probe batch, on CPU."""
        if self.probe_inputs is None:
            raise RuntimeError(f"{type(self).__name__}: no probe batch yet (set at setup of a fit)")
        if self._layer_path is None:
            self._resolve_layer(pl_module)
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = self._inputs(pl_module, self.probe_inputs)
                kwargs = dict(self.method_kwargs)
                if self.method == "smooth_grad_cam_pp":
                    kwargs["generator"] = torch.Generator().manual_seed(int(kwargs.pop("seed", 0)))
                res = saliency_maps(
                    self._root(pl_module),
                    x,
                    self.method,
                    self._layer_path,
                    self._targets(x.device),
                    forward=lambda inp: self.forward_fn(pl_module, inp),
                    **kwargs,
                )
        finally:
            for m, flag in modes.items():
                m.training = flag
        return res.maps.detach().float().cpu(), res.targets.cpu(), res.logits.detach().argmax(1).cpu()

    # -- the hook -------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._collecting and not trainer.sanity_checking:
            self._finish_collecting(trainer, pl_module)  # raises: the validation data was too small
        if not self._active or trainer.sanity_checking or self.probe_inputs is None:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs - 1
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        if not trainer.is_global_zero:
            return
        maps, targets, preds = self.compute(pl_module)
        self.last_maps, self.last_targets, self.last_predictions = maps, targets, preds
        self.write(trainer, maps, epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._active and self.last_maps is None and trainer.is_global_zero:
            warnings.warn(
                f"{type(self).__name__} computed no saliency maps: they are computed at the end of a validation "
                "epoch, and this run validated never (limit_val_batches=0, no validation data, or "
                "check_val_every_n_epoch larger than the run) or not on an epoch it maps (every_n_epochs)",
                stacklevel=2,
            )

    def grid(self, maps: Tensor) -> Tensor:
        """The (3, H', W') image grid of the probe inputs and their heat-map overlays."""
        h, w = maps.shape[-2:]
        upscale = max(1, math.ceil(self.display_size / min(h, w))) if self.display_size else 1
        overlays = heatmap_overlay(self.probe_inputs, maps, self.alpha, self.cmap)
        return saliency_grid(self.probe_inputs, overlays, self.nrow, upscale)

    def write(self, trainer: L.Trainer, maps: Tensor, epoch: int) -> None:
        grid = self.grid(maps)
        if self.log_tensorboard:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(
                        f"{self.prefix}/{self.name}", grid, global_step=trainer.global_step
                    )
        if self.save_png:
            import matplotlib.image

            root = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "saliency"
            path = root / self.name / f"epoch={epoch:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            matplotlib.image.imsave(path, grid.permute(1, 2, 0).clamp(0, 1).numpy())
            self.saved.append(path)


@register("callback", "grad_cam")
class GradCAMCallback(SaliencyCallback):
    """Grad-CAM maps (Selvaraju et al., ICCV 2017): ReLU(Σ_k mean_ij(∂y^c/∂A_k) · A_k). Options:
    those of `SaliencyCallback`."""

    method = "grad_cam"


@register("callback", "grad_cam_pp")
class GradCAMPlusPlusCallback(SaliencyCallback):
    """Grad-CAM++ maps (Chattopadhay et al., WACV 2018): channel weights Σ_ij α_ij ReLU(∂y^c/∂A_ij)
    with the closed-form α = g² / (2g² + Σ A · g³). Extra option: `eps` (0; 1e-6 as pytorch-grad-cam)."""

    method = "grad_cam_pp"

    def __init__(self, *args: Any, eps: float = 0.0, **kwargs: Any) -> None:
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(*args, **kwargs)
        self.method_kwargs = {"eps": float(eps)}


@register("callback", "smooth_grad_cam_pp")
class SmoothGradCAMPlusPlusCallback(SaliencyCallback):
    """Smooth Grad-CAM++ maps (Omeiza et al. 2019): Grad-CAM++ with the gradient powers averaged
    over `n_samples` (25) noisy copies of the input, σ = `noise_level` (0.15) × the input's value
    range, drawn from a generator seeded with `seed` (0) each time, so maps of different epochs
    see the same noise and the training random stream is untouched."""

    method = "smooth_grad_cam_pp"

    def __init__(
        self, *args: Any, n_samples: int = 25, noise_level: float = 0.15, seed: int = 0, **kwargs: Any
    ) -> None:
        if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if not noise_level >= 0:
            raise ValueError(
                f"noise_level must be >= 0 (a fraction of each input's value range), got {noise_level}"
            )
        super().__init__(*args, **kwargs)
        self.method_kwargs = {
            "n_samples": int(n_samples),
            "noise_level": float(noise_level),
            "seed": int(seed),
        }


@register("callback", "eigen_cam")
class EigenCAMCallback(SaliencyCallback):
    """Eigen-CAM maps (Muhammad & Yeasin, IJCNN 2020): the activations projected on their first
    principal component; gradient-free and class-agnostic (the target only labels the grid).
    Extra option: `center` (True, as pytorch-grad-cam; False: the paper's uncentred projection)."""

    method = "eigen_cam"

    def __init__(self, *args: Any, center: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method_kwargs = {"center": bool(center)}


@register("callback", "normgrad")
class NormGradCallback(SaliencyCallback):
    """NormGrad maps (Rebuffi et al., CVPR 2020): ‖∂y^c/∂A_u‖·‖A_u‖ per position (virtual identity
    after the layer). Extra options: `selective` (False: ‖max(0, A_u ⊙ G_u)‖), `patch_size` (1;
    3 = virtual 3×3 convolution)."""

    method = "normgrad"

    def __init__(self, *args: Any, selective: bool = False, patch_size: int = 1, **kwargs: Any) -> None:
        if (
            isinstance(patch_size, bool)
            or int(patch_size) != patch_size
            or patch_size < 1
            or patch_size % 2 == 0
        ):
            raise ValueError(f"patch_size must be an odd integer >= 1, got {patch_size!r}")
        if selective and patch_size != 1:
            raise ValueError("selective NormGrad uses the virtual scaling layer: patch_size must be 1")
        super().__init__(*args, **kwargs)
        self.method_kwargs = {"selective": bool(selective), "patch_size": int(patch_size)}
