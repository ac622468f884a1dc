"""Optimisers (torch's and the papers') and LR schedules, buildable by name."""

from toolkit.optim.factory import build_optimizer, build_scheduler

__all__ = ["build_optimizer", "build_scheduler"]
