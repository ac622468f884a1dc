"""Scoring cost per sample of the pruning selectors against one training step per sample.

    python benchmarks/selection_cost.py                 # 5 rounds x 3 timed calls per case: about a minute
    python benchmarks/selection_cost.py --quick         # 1 round x 1 call: a few seconds
    python benchmarks/selection_cost.py --threads 2 --out docs/selection_cost.json

The network is the recipes' model, `ClassificationModule("convnet", num_classes=10, in_chans=1,
model_kwargs={"width": 16})`, on random 28 x 28 one-channel inputs (Fashion-MNIST's size):
training batches of 128 and scoring batches of `--score-batch` (default 256: a DataModule's
scoring pass uses its evaluation batch size, 2 x the training batch). Every case runs in this one
process, so the ratios compare like with like:

- `train_step` (the reference): train mode, forward, cross-entropy, backward and an SGD step
  with momentum, as a training step does;
- `el2n`, `grand_last_layer`, `grand_vmap`, `grand_loop`: the scorer's `pass_batch` under the
  scoring pass's conditions (`scoring_mode`, as `DataPruning.scoring_pass`: eval mode,
  `torch.no_grad()`, channels-last conv weights; gradient scorers enable gradients themselves), `grand` with each strategy (`strategy="vmap"`, chunks of
  `--chunk-size`, and `strategy="loop"`, one backward per sample).

Each case is warmed up once, then timed `--repeats` times per round; the rounds run the cases in
alternating order (the load of a shared machine drifts) and the fastest call over all rounds is
kept, wall clock and the process's CPU time (all threads) alike. Ratios are per sample, i.e. the
case's time over the training step's on the same batch size.

Threads: `--threads 1` by default. The per-sample loop is made of many tiny operations; on a
machine whose cores are busy with other jobs, intra-op threads that wait for each other at every
operation made it a hundred times slower in our runs (2 threads, load 6 on 2 cores), which
measures the machine, not the method. Pass `--threads N` to measure with more.

The goal (issue 5): `el2n` and `grand_last_layer` scoring at most 0.3x a training step per
sample. Full `grand` is reported without a goal (it needs one backward per sample). The
headline is printed last, one line per case: `NAME: RATIO (goal <= GOAL)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = ("train_step", "el2n", "grand_last_layer", "grand_vmap", "grand_loop")
GOALS = {"el2n": 0.3, "grand_last_layer": 0.3}


def make_cases(args: argparse.Namespace):
    import torch
    import torch.nn.functional as F

    from toolkit.modules import ClassificationModule
    from toolkit.selection import EL2NScorer, GraNdLastLayerScorer, GraNdScorer
    from toolkit.selection.scorer import scoring_mode
    from toolkit.types import Batch

    torch.manual_seed(0)
    module = ClassificationModule(
        "convnet", num_classes=10, in_chans=1, loss="cross_entropy", model_kwargs={"width": args.width}
    )
    model = module.model
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    n = args.score_batch
    batch = Batch(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)), torch.arange(n))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        model.train()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def scoring(scorer):
        def run() -> None:
            scorer.begin_pass()
            with scoring_mode(model):  # what DataPruning.scoring_pass does
                scorer.pass_batch(model, batch)

        return run

    return {
        "train_step": train_step,
        "el2n": scoring(EL2NScorer()),
        "grand_last_layer": scoring(GraNdLastLayerScorer()),
        "grand_vmap": scoring(GraNdScorer(strategy="vmap", chunk_size=args.chunk_size)),
        "grand_loop": scoring(GraNdScorer(strategy="loop")),
    }


def measure(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    cases = make_cases(args)
    names = [c for c in CASES if c in args.cases]
    if "train_step" not in names:
        raise SystemExit("--cases must include train_step (the reference)")
    for name in names:  # warm-up: kernels, allocator, torch.func's first call
        cases[name]()
    best: dict[str, dict[str, float]] = {}
    for round_ in range(args.rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            for _ in range(args.repeats):
                c0, t0 = time.process_time(), time.perf_counter()
                cases[name]()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                b = best.setdefault(name, {"wall_s": wall, "cpu_s": cpu})
                b["wall_s"], b["cpu_s"] = min(b["wall_s"], wall), min(b["cpu_s"], cpu)
            print(
                f"  round {round_ + 1} {name:<17} fastest so far {best[name]['wall_s'] * 1e3:8.1f} ms per batch "
                f"(load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    per_sample = {
        name: {k: v / (args.batch if name == "train_step" else args.score_batch) for k, v in b.items()}
        for name, b in best.items()
    }
    ref = per_sample["train_step"]
    rows = []
    for name in names:
        b = per_sample[name]
        rows.append(
            {
                "case": name,
                "wall_ms_per_sample": b["wall_s"] * 1e3,
                "cpu_ms_per_sample": b["cpu_s"] * 1e3,
                "wall_ratio": b["wall_s"] / ref["wall_s"],
                "cpu_ratio": b["cpu_s"] / ref["cpu_s"] if ref["cpu_s"] > 0 else float("nan"),
                "goal": GOALS.get(name),
            }
        )
    return {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--score-batch", type=int, help="scoring batch (default: 2 x --batch, as a DataModule)")
    p.add_argument("--width", type=int, default=16, help="convnet width (the recipes use 16)")
    p.add_argument("--chunk-size", type=int, default=32, help="grand's vmap chunk")
    p.add_argument("--rounds", type=int, default=5, help="rounds, alternating the case order")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case per round (fastest kept)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the docstring)")
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="one round of one call per case: a few seconds")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats = 1, 1
    args.score_batch = args.score_batch or 2 * args.batch
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    print(
        f"convnet width {args.width}, 1x28x28 inputs, training batch {args.batch}, scoring batch "
        f"{args.score_batch}, {args.threads} thread(s), "
        f"{args.rounds} round(s) x {args.repeats} call(s); load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs",
        flush=True,
    )
    result = measure(args)
    print("\nper sample (fastest call), and against one training step per sample:")
    for r in result["rows"]:
        print(
            f"  {r['case']:<17} wall {r['wall_ms_per_sample']:7.3f} ms  CPU {r['cpu_ms_per_sample']:7.3f} ms  "
            f"wall ratio {r['wall_ratio']:6.2f}x  CPU ratio {r['cpu_ratio']:6.2f}x"
        )
    loop = next((r for r in result["rows"] if r["case"] == "grand_loop"), None)
    vmap = next((r for r in result["rows"] if r["case"] == "grand_vmap"), None)
    if loop and vmap:
        print(
            f"  grand strategy='auto' would keep: {'loop' if loop['wall_ratio'] < vmap['wall_ratio'] else 'vmap'}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **result}, indent=2))
    for r in result["rows"]:
        if r["goal"] is not None:
            verdict = "met" if r["wall_ratio"] <= r["goal"] else "missed"
            print(f"  {r['case']}: goal of <= {r['goal']}x a training step per sample {verdict}")
    print()
    for r in result["rows"]:
        if r["case"] != "train_step":
            goal = f"goal <= {r['goal']}" if r["goal"] is not None else "no goal"
            print(f"{r['case']}: {r['wall_ratio']:.3f} ({goal})")
    return result


if __name__ == "__main__":
    main()
