"""furnace: the shared library of the DUEB semi-supervised segmentation framework."""

__version__ = "0.1.0"
