"""Segmentation engines: ``classic`` (no weights) and ``sam2``."""
