"""Run by tests/test_select_weighting.py in a subprocess: 2-process gloo (CPU) check that
`loss_reweighting` composed with the bus's local mean and DDP's gradient averaging gives the
gradient of Σ_global w_i·ℓ_i. Rank 0 holds 5 samples, rank 1 holds 3 (unequal local batches).
Each rank writes its local weights, the averaged gradient and the gathered losses."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from toolkit.selection.loss_reweighting import LossReweighting

SIZES = (5, 3)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), 4, generator=g)
    y = torch.randint(0, 3, (sum(SIZES),), generator=g)
    w = torch.randn(3, 4, generator=g)
    return x, y, w


def worker(rank: int, out: str, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    x, y, w0 = data()
    lo = sum(SIZES[:rank])
    xs, ys = x[lo : lo + SIZES[rank]], y[lo : lo + SIZES[rank]]
    weight = w0.clone().requires_grad_(True)
    losses = F.cross_entropy(xs @ weight.T, ys, reduction="none")
    s = LossReweighting(strategy="linupper", r=0.5, warmup=0).local_weights(losses.detach())
    loss = (s * losses).mean()  # what the bus does with one per-sample term
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    grad /= 2  # DDP averages the gradients
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"weights": s.tolist(), "grad": grad.flatten().tolist(), "losses": losses.tolist()})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    mp.spawn(worker, args=(out, f"file://{Path(out).resolve()}/init"), nprocs=2, join=True)
