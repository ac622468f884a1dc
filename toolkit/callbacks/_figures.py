"""Matplotlib figures from callbacks: to a PNG file and to TensorBoard (rank zero only).

Figures are built with `matplotlib.figure.Figure` on an Agg canvas (no pyplot global state, no
display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def new_figure(width: float = 6.4, height: float = 4.8) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def figure_to_chw(fig: Any) -> np.ndarray:
    """The rendered figure as a (3, H, W) uint8 RGB array (TensorBoard's `add_image` layout)."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))


def output_dir(trainer: Any, name: str, save_dir: str | Path | None = None) -> Path:
    """`save_dir`, else `trainer.log_dir/name` (the TensorBoard run directory when one is attached)."""
    if save_dir is not None:
        return Path(save_dir)
    base = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", ".")
    return Path(base) / name


def log_figure(trainer: Any, tag: str, fig: Any, png: Path | None = None, step: int | None = None) -> None:
    """Save `fig` as `png` (when given) and add it to every TensorBoard logger of `trainer` as the
    image `tag` at `step` (default: the global step); only on global rank zero."""
    if not getattr(trainer, "is_global_zero", True):
        return
    image = figure_to_chw(fig)
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png)
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(
                tag, image, trainer.global_step if step is None else step, dataformats="CHW"
            )
