"""RT Structure Set: read ROIs and prompts, write results (built on highdicom and pydicom).

Converts between DICOM RTSTRUCT files and the voxel-space representation of
:mod:`inference` (volumes, masks, prompts).
"""
