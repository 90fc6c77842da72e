"""Evaluation: COCO detection metrics and pseudo-label quality."""
