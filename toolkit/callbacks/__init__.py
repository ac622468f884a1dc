"""Callbacks (registered under kind "callback"): evaluation probes and, later, data selectors."""

from toolkit.callbacks.probes import KNNProbe, knn_predict, linear_probe

__all__ = ["KNNProbe", "knn_predict", "linear_probe"]
