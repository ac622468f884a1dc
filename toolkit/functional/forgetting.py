"""Forgetting events (Toneva, Sordoni, Tachet des Combes, Trischler, Bengio, Gordon, "An Empirical
Study of Example Forgetting during Deep Neural Network Learning", ICLR 2019, arXiv 1812.05159).

Each time a training sample is presented (is in a training batch), record whether the network
classifies it correctly, acc ∈ {0, 1}. A *forgetting event* is a transition acc = 1 → acc = 0
between two consecutive presentations of the same sample; a sample is *learned* once some
presentation is correct. The score of a sample is its number of forgetting events; a sample never
learned counts as forgotten more often than any learned one:

    score(i) = #{k : acc_i(k−1) = 1, acc_i(k) = 0}     if sample i was ever correct
    score(i) = n_presentations                          otherwise

CONFIRMED from the official code (github.com/mtoneva/example_forgetting):
- `run_cifar.py` / `run_mnist.py`: acc is `argmax(outputs) == target` for the outputs of the
  training forward pass of each mini-batch (model in train mode, before that batch's optimiser
  step), appended once per presentation;
- `order_examples_by_forgetting.py`, `compute_forgetting_statistics`: forgetting events are the
  places where `acc[1:] − acc[:-1] == −1` (consecutive presentations only; the first presentation
  never counts); `sort_examples_by_forgetting`: "If an example was never learned, it is assigned
  the maximum number of forgetting counts", i.e. `npresentations` (the number of training
  epochs), which exceeds any learned sample's count (at most half its presentations); over
  several runs the counts are summed (the toolkit averages runs, the same order);
- the paper removes the *least* forgotten ("unforgettable") samples first: keep the highest scores.

DECIDED where the code is silent: presentations are applied in the order given by `order`
(ties keep the given order), so a sample presented twice in one batch or step is handled
deterministically; the never-learned score is passed in by the caller (`ForgettingScorer` uses
the number of observed epochs, as `npresentations`, raised if needed above every learned count).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: value of `last` for a sample never presented
UNSEEN = -1


def _grown(t: Tensor, n: int, fill: int) -> Tensor:
    if n <= len(t):
        return t.clone()
    return torch.cat([t, t.new_full((n - len(t),), fill)])


def forgetting_update(
    index: Tensor,
    correct: Tensor,
    last: Tensor,
    forgets: Tensor,
    learned: Tensor,
    order: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply a sequence of presentations to the forgetting state; returns new (last, forgets, learned).

    Args:
        index: (M,) sample index of each presentation.
        correct: (M,) whether that presentation was classified correctly (bool or 0/1).
        last: (N,) int8 correctness at each sample's latest presentation (`UNSEEN` = -1: none yet).
        forgets: (N,) int64 forgetting events so far.
        learned: (N,) bool: correct at some presentation so far.
        order: (M,) presentation time of each row (e.g. a batch counter); rows are applied in
            increasing order, ties in the given order. None: the given order.

    The state grows to cover the largest index; the inputs are not modified.
    """
    index = torch.as_tensor(index).long().flatten().cpu()
    correct = torch.as_tensor(correct).flatten().cpu()
    if correct.dtype != torch.bool:
        if correct.is_floating_point() or not bool(((correct == 0) | (correct == 1)).all()):
            raise ValueError("correct must be booleans or 0/1 integers")
        correct = correct.bool()
    if index.shape != correct.shape:
        raise ValueError(f"{len(index)} indices but {len(correct)} correctness values")
    if not (len(last) == len(forgets) == len(learned)):
        raise ValueError(
            f"state sizes differ: last {len(last)}, forgets {len(forgets)}, learned {len(learned)}"
        )
    if index.numel() and int(index.min()) < 0:
        raise ValueError("sample indices must be >= 0")
    n = max(len(last), int(index.max()) + 1 if index.numel() else 0)
    last, forgets, learned = _grown(last, n, UNSEEN), _grown(forgets, n, 0), _grown(learned, n, False)
    if not index.numel():
        return last, forgets, learned
    if order is not None:
        order = torch.as_tensor(order).flatten().cpu()
        if order.shape != index.shape:
            raise ValueError(f"{len(index)} indices but {len(order)} order keys")
        p = torch.argsort(order, stable=True)
        index, correct = index[p], correct[p]
    q = torch.argsort(index, stable=True)  # grouped by sample, each group in presentation order
    idx, acc = index[q], correct[q].to(torch.int8)
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    prev = torch.empty_like(acc)
    prev[first] = last[idx[first]]
    prev[1:][~first[1:]] = acc[:-1][~first[1:]]
    events = (prev == 1) & (acc == 0)
    forgets += torch.bincount(idx[events], minlength=n)
    learned[idx[acc == 1]] = True
    final = torch.ones_like(first)
    final[:-1] = first[1:]
    last[idx[final]] = acc[final]
    return last, forgets, learned


def forgetting_scores(forgets: Tensor, learned: Tensor, never_learned: float) -> Tensor:
    """(N,) float32 scores: the forgetting count of learned samples, `never_learned` otherwise."""
    if forgets.shape != learned.shape:
        raise ValueError(f"forgets {tuple(forgets.shape)} and learned {tuple(learned.shape)} differ")
    if learned.any() and never_learned <= float(forgets[learned].max()):
        raise ValueError(
            f"never_learned={never_learned} must exceed every learned sample's count "
            f"({int(forgets[learned].max())}): never-learned samples rank as the most forgotten"
        )
    return torch.where(learned, forgets.float(), torch.full_like(forgets, never_learned, dtype=torch.float32))
