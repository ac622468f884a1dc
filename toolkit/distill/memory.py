"""`SampleMemory`: a per-sample table keyed by dataset index, for methods that remember each
sample across epochs (PS-KD's last predictions, ELR's targets, forgetting events, ...).

- Rows are written with the batch's indices; under DDP every rank's writes are gathered, so all
  replicas hold the same table (each sample is seen by one rank per epoch).
- The table lives in the module's extra state, so it is saved in checkpoints, restored exactly on
  resume, and may grow on demand (its size need not be known before the first batch).
- Rows never written are reported by `read` as missing, so a method can fall back (e.g. to the
  one-hot label in the first epoch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _gather(t: Tensor) -> Tensor:
    """Concatenate `t` (first dimension may differ) from every rank, in rank order."""
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes)])


def gather_rows(index: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """(indices, values) from every DDP rank; unchanged in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _gather(index), _gather(values)
    return index, values


class SampleMemory(nn.Module):
    """A (N, *row_shape) table of `dtype`, indexed by sample index, grown on demand."""

    def __init__(self, row_shape: tuple[int, ...] | int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.row_shape = (row_shape,) if isinstance(row_shape, int) else tuple(row_shape)
        self.dtype = dtype
        self.values = torch.zeros((0, *self.row_shape), dtype=dtype)
        self.written = torch.zeros(0, dtype=torch.bool)

    def __len__(self) -> int:
        return self.values.shape[0]

    def _grow(self, n: int, device: torch.device) -> None:
        if n <= len(self):
            return
        values = torch.zeros((n, *self.row_shape), dtype=self.dtype, device=device)
        written = torch.zeros(n, dtype=torch.bool, device=device)
        values[: len(self)] = self.values.to(device)
        written[: len(self)] = self.written.to(device)
        self.values, self.written = values, written

    def read(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, written) for these indices; rows never written are zeros with written=False."""
        self._grow(int(index.max()) + 1 if index.numel() else 0, index.device)
        self.values, self.written = self.values.to(index.device), self.written.to(index.device)
        return self.values[index], self.written[index]

    @torch.no_grad()
    def write(self, index: Tensor, rows: Tensor, gather: bool = True) -> None:
        """Store rows (detached) at these indices, gathering every rank's writes under DDP.

        With `gather=False` each process keeps only its own writes (no collective call, so ranks
        may write different numbers of times).
        """
        rows = rows.detach().to(self.dtype)
        if gather:
            index, rows = gather_rows(index, rows)
        self._grow(int(index.max()) + 1 if index.numel() else 0, index.device)
        self.values, self.written = self.values.to(index.device), self.written.to(index.device)
        self.values[index] = rows
        self.written[index] = True

    def get_extra_state(self) -> Any:
        return {"values": self.values.cpu(), "written": self.written.cpu()}

    def set_extra_state(self, state: Any) -> None:
        values, written = state["values"], state["written"]
        if tuple(values.shape[1:]) != self.row_shape:
            raise ValueError(
                f"checkpoint memory rows have shape {tuple(values.shape[1:])}, this run expects {self.row_shape}"
            )
        self.values, self.written = values.to(self.dtype), written.bool()

    def extra_repr(self) -> str:
        return f"rows={len(self)}, row_shape={self.row_shape}, dtype={self.dtype}"


MEMORY_DTYPES = ("float32", "float16", "bfloat16")


class ClassMemoryTerm:
    """Mixin for loss terms keeping one row of C class values per sample (PS-KD's past
    predictions, ELR's targets): a `SampleMemory` created at the first step (or the dry run) with
    the logits' class count, in `memory_dtype`, restored from checkpoints through the module's
    extra state. Call `init_memory(memory_dtype)` in `__init__`."""

    def init_memory(self, memory_dtype: str) -> None:
        if memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {', '.join(MEMORY_DTYPES)}, got {memory_dtype!r}")
        self.memory_dtype = memory_dtype
        self.memory: SampleMemory | None = None

    def class_memory(self, num_classes: int) -> SampleMemory:
        if self.memory is None:
            self.memory = SampleMemory(num_classes, getattr(torch, self.memory_dtype))
        elif self.memory.row_shape != (num_classes,):
            raise ValueError(
                f"{type(self).__name__} keeps rows of {self.memory.row_shape[0]} classes but the logits have "
                f"{num_classes}"
            )
        return self.memory

    def setup(self, example: Any) -> None:
        self.class_memory(example.student.logits.shape[-1])

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "has_memory": self.memory is not None,
            "num_classes": None if self.memory is None else self.memory.row_shape[0],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["has_memory"]:
            self.class_memory(state["num_classes"])
