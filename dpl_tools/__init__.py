"""dpl: pseudo-label polishing for semi-supervised object detection (library part)."""

__version__ = "0.1.0"
