"""DUEB losses (REFERENCE.md section 3): aleatoric Monte Carlo loss, energy term, OHEM /
plain cross-entropy, pseudo-label machinery and the confidence-weighted unsupervised CE.

All losses run on CPU and CUDA, take float32/bf16/fp16 (computed in float32) or float64
(kept in float64) scores, and reproduce the reference values and gradients by default.
"""
from .aleatoric import AleatoricLoss
from .ce import SupervisedCrossEntropy
from .energy import energy_term
from .ohem import CITYSCAPES_CLASS_WEIGHTS, OhemCrossEntropy, cross_entropy
from .pseudo import PseudoLabels, label_and_confidence, pseudo_labels, unsup_ce

__all__ = [
    "AleatoricLoss",
    "energy_term",
    "OhemCrossEntropy",
    "CITYSCAPES_CLASS_WEIGHTS",
    "cross_entropy",
    "SupervisedCrossEntropy",
    "PseudoLabels",
    "pseudo_labels",
    "unsup_ce",
    "label_and_confidence",
]
