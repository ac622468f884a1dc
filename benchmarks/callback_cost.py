"""Each callback's overhead per epoch, as a ratio to the same epoch without it.

    python benchmarks/callback_cost.py                 # Fashion-MNIST 10k (the demonstration), every callback
    python benchmarks/callback_cost.py --quick         # digits: a minute
    python benchmarks/callback_cost.py --callbacks grad_cam,calibration

One process. For the plain run and for each callback (with the options of its config,
`recipes/configs/train/<name>.yaml`, computing every epoch), a fresh model with the same seed is
trained for `--epochs` epochs on the same data; an epoch's time runs from `on_train_epoch_start`
to `on_train_epoch_end` (training and validation, and the callback's own hooks in between, which
Lightning runs before `on_train_epoch_end` for saliency, calibration and probes) plus the
callback's `on_train_epoch_end` itself (it runs before the timer's, the timer being last). The
first epoch is a warm-up; the fastest later epoch counts, over `--rounds` alternating rounds.
Optimisers are not callbacks and are not measured here. The headline is printed last, one line
per callback: `NAME: RATIO`.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def callback_options(name: str) -> dict:
    from recipes.common import CONFIG_DIR, load_yaml

    path = CONFIG_DIR / "train" / f"{name}.yaml"
    opts = dict((load_yaml(path).get("callbacks") or {}).get(name) or {}) if path.exists() else {}
    for key in ("every_n_epochs",):
        if key in opts:
            opts[key] = 1
    return opts


def epoch_seconds(name: str | None, args: argparse.Namespace) -> float:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from toolkit import build
    from toolkit.modules import ClassificationModule

    class EpochTimer(Callback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds.append(time.perf_counter() - self.start)

    L.seed_everything(0, verbose=False)
    data_args = {
        "batch_size": 128,
        "seed": 0,
        **({"train_subset": 10000, "val_split": 2000} if not args.quick else {}),
    }
    if name == "hessian_alignment":
        data_args["domains"] = 3
    dm = build("data", args.data, **data_args)
    module = ClassificationModule(
        "convnet",
        num_classes=dm.num_classes,
        in_chans=dm.in_chans,
        loss="cross_entropy",
        model_kwargs={"width": 16},
        optimizer={"name": "adam", "lr": 0.002},
    )
    timer = EpochTimer()
    callbacks = [] if name is None else [build("callback", name, **callback_options(name))]
    trainer = L.Trainer(
        default_root_dir=args.root,  # the callbacks' PNG files go there, not into the working directory
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(module, datamodule=dm)
    return min(timer.seconds[1:])


def main(argv: list[str] | None = None) -> dict:
    import toolkit  # noqa: F401 - fills the registry
    from toolkit import registry

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="digits instead of 10k Fashion-MNIST images")
    p.add_argument("--callbacks", help="comma-separated callbacks (default: every registered one)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is a warm-up)")
    p.add_argument("--rounds", type=int, default=1, help="rounds, alternating the order")
    args = p.parse_args(argv)
    args.data = "digits" if args.quick else "fashion_mnist"
    names = [n for n in (args.callbacks or "").split(",") if n] or registry.names("callback")
    args.root = tempfile.mkdtemp(prefix="callback_cost_")
    best: dict[str, float] = {}
    for r in range(args.rounds):
        order = [None, *names] if r % 2 == 0 else [*reversed(names), None]
        for name in order:
            seconds = epoch_seconds(name, copy.copy(args))
            key = name or "plain"
            best[key] = min(best.get(key, float("inf")), seconds)
            print(f"  round {r + 1} {key:<20} epoch {seconds:7.2f} s", flush=True)
    print(f"\n{args.data}, convnet width 16, batch 128: plain epoch {best['plain']:.2f} s")
    ratios = {n: best[n] / best["plain"] for n in names}
    for n in names:
        print(f"{n}: {ratios[n]:.2f}")
    return ratios


if __name__ == "__main__":
    main()
