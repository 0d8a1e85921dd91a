"""Segmentation core of the STARDUST node.

Knows image volumes with their geometry and prompts in voxel space; knows nothing of
networking, and of DICOM only what it takes to load an image series into a volume.
"""
