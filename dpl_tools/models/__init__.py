"""Models: the Faster R-CNN detector builder, detector checkpoints, polishers, student."""
