"""Single-model losses as loss terms, registered under kind "loss"."""

from toolkit.losses.cross_entropy import CrossEntropyLoss

__all__ = ["CrossEntropyLoss"]
