"""Static HTML report and single-image rendering of pseudo labels (``dpl report``, ``dpl show``)."""
