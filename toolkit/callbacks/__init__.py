"""Callbacks (registered under kind "callback"): evaluation probes and, later, data selectors."""

from toolkit.callbacks.calibration import Calibration, TemperatureScaling, load_temperature
from toolkit.callbacks.gradient_spectrum import GradientSpectrum
from toolkit.callbacks.hessian_alignment import HessianAlignment, HessianAlignmentTerm
from toolkit.callbacks.hessian_monitor import HessianMonitor
from toolkit.callbacks.lr_annealing_law import LRAnnealingLaw
from toolkit.callbacks.naive_bayes_probe import NaiveBayesProbe
from toolkit.callbacks.probes import KNNProbe, knn_predict, linear_probe
from toolkit.callbacks.saf import SAF, SAFTerm
from toolkit.callbacks.saliency import (
    EigenCAMCallback,
    GradCAMCallback,
    GradCAMPlusPlusCallback,
    NormGradCallback,
    SaliencyCallback,
    SmoothGradCAMPlusPlusCallback,
)
from toolkit.callbacks.sigma_reparam import (
    SigmaReparam,
    SigmaReparamCallback,
    apply_sigma_reparam,
    remove_sigma_reparam,
)
from toolkit.callbacks.speed import SpeedSwitches
from toolkit.callbacks.weight_compander import (
    WeightCompander,
    WeightCompanderCallback,
    apply_weight_compander,
    remove_weight_compander,
)

__all__ = [
    "Calibration",
    "EigenCAMCallback",
    "GradCAMCallback",
    "GradCAMPlusPlusCallback",
    "GradientSpectrum",
    "HessianAlignment",
    "HessianAlignmentTerm",
    "HessianMonitor",
    "KNNProbe",
    "LRAnnealingLaw",
    "NaiveBayesProbe",
    "NormGradCallback",
    "SAF",
    "SAFTerm",
    "SaliencyCallback",
    "SigmaReparam",
    "SigmaReparamCallback",
    "SpeedSwitches",
    "SmoothGradCAMPlusPlusCallback",
    "TemperatureScaling",
    "WeightCompander",
    "WeightCompanderCallback",
    "apply_sigma_reparam",
    "apply_weight_compander",
    "knn_predict",
    "linear_probe",
    "load_temperature",
    "remove_sigma_reparam",
    "remove_weight_compander",
]
