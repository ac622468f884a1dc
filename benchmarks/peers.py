"""Our KD training step against a peer library's, side by side in one process: torchdistill.

    python -m benchmarks.peers                    # 5 rounds x (3 warm-up + 10 timed steps) per side
    python -m benchmarks.peers --quick            # one round of 3 timed steps per side: a minute or two
    python -m benchmarks.peers --threads 2 --rounds 7

The configuration is the one of `benchmarks.overhead`'s `kd` case (its `resnet` preset, models,
batches and optimiser are imported from there, so the two benchmarks measure the same work):
timm `resnet18` teacher and `resnet10t` student built from config (`pretrained=False`, 10
classes) twice from the same seeds, so both sides start from the same weights; `--batches`
distinct random batches of 128 x 3x32x32 held in memory and cycled; SGD (lr 0.01, momentum 0.9);
the loss α·CE + (1 − α)·τ²·KL(p_t^τ ‖ p_s^τ) with τ = 4 and α = 0.5 in torchdistill's convention
(α weighs the cross-entropy, `KDLoss(alpha=0.5)`; ours: terms `ce` 0.5 + `kd` 0.5).

- `ours`: `DistillationModule` (frozen `Teacher`) trained through a real `L.Trainer` (CPU, no
  logger, no checkpointing, no progress bar, no model summary, no validation), a fresh Trainer
  per round, as `benchmarks.overhead` runs it;
- `torchdistill`: its `DistillationBox` built by `get_distillation_box` from a training config
  (teacher `requires_grad: False`, `WeightedSumLoss` with one `KDLoss` sub-term, `SGD` from its
  optimiser registry) and stepped as its example script `examples/torchvision/image_classification.py`
  does: `pre_epoch_process()` once per run, then per batch `loss = box.forward_process(x, y, supp)`
  and `box.post_forward_process(loss=loss)` (backward, optimiser step, zero_grad). The box does
  not put the teacher in eval mode (its pre-epoch step only calls `student_model.train()`; the
  example's models stay in the mode they were built in), so the benchmark calls `teacher.eval()`
  before building the box, as a careful user does: otherwise the teacher's BatchNorm layers
  would use batch statistics and update their running means at every step (different work).

Before timing: (1) the KD loss conventions are compared on the same logits (`kd_conventions`):
torchdistill's `KDLoss` with `alpha=0` (or no targets) returns the bare KL (batchmean), without τ², while our
`kd` term is τ²·KL per sample (mean over the batch = batchmean): ours = τ²·theirs; with α set,
their total α·CE + (1 − α)·τ²·KL equals our bus total with weights (α, 1 − α); (2) both sides'
first training-mode step gives the same loss from the same weights on the same batch (the same
work). Time per step is the interval between the starts of two consecutive steps, wall clock and
process CPU time (`benchmarks._steps`); rounds alternate the order of the sides; figures are
medians over all timed steps. Last line: `peers_torchdistill: RATIO (goal <= 1.0)`, our median
wall time per step over torchdistill's. When torchdistill is not installed (`pip install
torchdistill`, a dev extra) the benchmark says so and prints `peers_torchdistill: skipped (...)`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._steps import apply_quick, compare, cycle, set_threads, timing_parser, trainer_side  # noqa: E402
from benchmarks.overhead import OPTIMIZER, PRESETS, build_nets, make_batches  # noqa: E402

GOAL = 1.0
TEMPERATURE = 4.0
ALPHA = 0.5  # torchdistill's convention: the weight of the cross-entropy


def torchdistill_kd_loss(temperature: float = TEMPERATURE, alpha: float | None = ALPHA):
    """torchdistill's `KDLoss` on the models' outputs (module path ".", io "output"), as its
    sample configs declare it."""
    from torchdistill.losses.mid_level import KDLoss

    return KDLoss(
        student_module_path=".",
        student_module_io="output",
        teacher_module_path=".",
        teacher_module_io="output",
        temperature=temperature,
        alpha=alpha,
        reduction="batchmean",
    )


def our_terms(temperature: float = TEMPERATURE, alpha: float = ALPHA) -> dict[str, Any]:
    """Our terms for torchdistill's α·CE + (1 − α)·τ²·KL."""
    return {
        "ce": {"loss": "cross_entropy", "weight": alpha},
        "kd": {"distiller": "kd", "weight": 1.0 - alpha, "temperature": temperature},
    }


def kd_conventions(
    module: Any, student_logits: Any, teacher_logits: Any, target: Any, temperature: float = TEMPERATURE
) -> dict[str, float]:
    """Both libraries' KD values on the same logits.

    Returns `ours_kd` (our `kd` term, mean over the batch), `theirs_kl` (torchdistill `KDLoss`
    with `alpha=0`: the bare batchmean KL; its default `alpha=None` fails in its constructor,
    `1 - None`, unless `beta` is given), `ours_total` (our bus total with `module`'s
    weights) and `theirs_total` (`KDLoss(alpha=module's ce weight)`). Expected: ours_kd =
    τ²·theirs_kl and ours_total = theirs_total.
    """
    import torch

    from toolkit.terms import Step
    from toolkit.types import Batch, ModelOutput, Progress

    alpha = module.term_weight("ce")
    s = {".": {"output": student_logits}}
    t = {".": {"output": teacher_logits}}
    with torch.no_grad():
        step = Step(Batch(None, target), ModelOutput(student_logits), ModelOutput(teacher_logits), Progress())
        ours = module.compute_loss(step)
        theirs_kl = torchdistill_kd_loss(temperature, alpha=0.0)(s, t, target)
        theirs_total = torchdistill_kd_loss(temperature, alpha=alpha)(s, t, target)
    return {
        "ours_kd": float(ours["terms"]["kd"].mean()),
        "theirs_kl": float(theirs_kl),
        "ours_total": float(ours["loss"]),
        "theirs_total": float(theirs_total),
    }


def make_ours(batches: list, seed: int = 0):
    from toolkit.distill import Teacher
    from toolkit.modules import DistillationModule

    teacher, student = build_nets(PRESETS["resnet"], seed)
    module = DistillationModule(
        student, Teacher(teacher), num_classes=10, terms=our_terms(), optimizer=OPTIMIZER
    )
    module.prepare(batches[0].input[:2])
    return module


def make_box(batches: list, seed: int = 0):
    """torchdistill's `DistillationBox` for the same models (same seeds), loss and optimiser."""
    import torch
    from torch.utils.data import RandomSampler, TensorDataset
    from torchdistill.core.distillation import get_distillation_box

    teacher, student = build_nets(PRESETS["resnet"], seed)
    teacher.eval()  # see the module docstring: the box leaves the teacher's mode alone
    dataset = TensorDataset(torch.cat([b.input for b in batches]), torch.cat([b.target for b in batches]))
    train_config = {
        "num_epochs": 1,
        # the box builds its loader (unused here: both sides read the same in-memory batches)
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
            "kwargs": {"batch_size": batches[0].input.shape[0], "num_workers": 0},
        },
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
        "student": {
            "forward_proc": "forward_batch_only",
            "adaptations": None,
            "sequential": [],
            "requires_grad": True,
        },
        "optimizer": {"key": "SGD", "kwargs": {"lr": OPTIMIZER["lr"], "momentum": OPTIMIZER["momentum"]}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": torchdistill_kd_loss(), "weight": 1.0}}},
        },
    }
    return get_distillation_box(
        teacher, student, {"train": dataset}, train_config, torch.device("cpu"), None, False, 1
    )


def box_side(box: Any, batches: list):
    """torchdistill's training step, as its example's `train_one_epoch` runs it."""

    def run(n: int, tick) -> None:
        box.pre_epoch_process(epoch=0)
        for batch in cycle(batches, n):
            tick()
            loss = box.forward_process(batch.input, batch.target, {})
            box.post_forward_process(loss=loss)

    return run


def check(module: Any, box: Any, batch: Any) -> dict[str, float]:
    """Conventions on the same logits, then the same first training-mode loss on both sides."""
    import torch

    with torch.no_grad():
        s = module.model.eval()(batch.input)
        t = module.teacher(batch.input).logits
    module.model.train()
    v = kd_conventions(module, s, t, batch.target)
    t2 = TEMPERATURE**2
    print(
        f"  KD on the same logits: ours kd term {v['ours_kd']:.6f} = τ²·({v['theirs_kl']:.6f}) "
        f"= {t2 * v['theirs_kl']:.6f} (torchdistill's KDLoss with alpha=0 returns the bare KL, no τ²); "
        f"totals with α = {ALPHA}: ours {v['ours_total']:.6f}, torchdistill {v['theirs_total']:.6f}",
        flush=True,
    )
    tol = 1e-5
    if abs(v["ours_kd"] - t2 * v["theirs_kl"]) > tol * max(1.0, v["ours_kd"]) or abs(
        v["ours_total"] - v["theirs_total"]
    ) > tol * max(1.0, v["theirs_total"]):
        raise SystemExit(f"the KD losses differ beyond the conventions above: {v}")
    with torch.no_grad():
        ours = float(module.training_step(batch, 0)["loss"])
        theirs = float(box.forward_process(batch.input, batch.target, {}))
    if abs(ours - theirs) > 1e-4 * max(1.0, abs(theirs)):
        raise SystemExit(
            f"the two sides' first steps give different losses ({ours} vs {theirs}): not the same work"
        )
    print(f"  same first-step loss (ours {ours:.6f}, torchdistill {theirs:.6f})", flush=True)
    return {**v, "ours_step": ours, "theirs_step": theirs}


def main(argv: list[str] | None = None) -> float | None:
    parser = timing_parser(__doc__.splitlines()[0], rounds=5)
    args = apply_quick(parser.parse_args(argv))
    try:
        import torchdistill
    except ImportError as e:
        print(f"torchdistill is not installed ({e}): pip install torchdistill (in the dev extras)")
        print("peers_torchdistill: skipped (torchdistill not installed)")
        return None
    import lightning.pytorch  # noqa: F401 - imported before timing
    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("torchdistill").setLevel(logging.WARNING)  # the box logs its set-up at INFO
    threads = set_threads(args.threads)
    p = PRESETS["resnet"]
    batches = make_batches(p, args.batch, args.batches)
    print(
        f"KD {p.teacher} -> {p.student}, batch {args.batch}x{p.in_chans}x{p.size}x{p.size}, τ = {TEMPERATURE}, "
        f"α = {ALPHA}; torchdistill {torchdistill.__version__}, torch {torch.__version__}, {threads} thread(s); "
        f"{args.rounds} round(s) x ({args.warmup} warm-up + {args.steps} timed steps); "
        f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    module = make_ours(batches)
    box = make_box(batches)
    check(module, box, batches[0])
    t = compare(
        {"ours": trainer_side(module, batches), "torchdistill": box_side(box, batches)},
        args.rounds,
        args.warmup,
        args.steps,
    )
    ours, theirs = t["ours"], t["torchdistill"]
    ratio = ours.wall_median / theirs.wall_median
    print("\nmedian per step: ours (Trainer) | torchdistill (DistillationBox) | wall ratio | CPU ratio")
    print(
        f"  kd  {ours.wall_median * 1e3:9.2f} ms | {theirs.wall_median * 1e3:9.2f} ms | {ratio:6.3f} | "
        f"{ours.cpu_median / max(theirs.cpu_median, 1e-12):6.3f}"
    )
    print()
    print(f"peers_torchdistill: {ratio:.3f} (goal <= {GOAL})")
    return ratio


if __name__ == "__main__":
    main()
