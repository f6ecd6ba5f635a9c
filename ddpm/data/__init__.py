"""Datasets (one file each) and the loader that feeds the training loop.

Every dataset is a factory `name(split=..., image_size=..., channels=..., num_classes=..., ...)` that
returns a torch Dataset of (image in [-1, 1], label) pairs, or None when it has no such split.

Imports from ddpm.config only.
"""
