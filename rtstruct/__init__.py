"""RT Structure Set: read ROIs and prompts, write results (built on highdicom and pydicom).

Converts between DICOM RTSTRUCT files and the voxel-space representation of
:mod:`inference` (volumes, masks, prompts):

* :func:`read_rtstruct` -> :class:`StructureSet` of :class:`ROI` with :class:`Contour`;
  :func:`check_references` says whether a volume holds the images it was drawn on.
* :func:`find_prompt_rois` / :func:`extract_prompts` turn ``BOX_``/``POS_``/``NEG_`` ROIs
  into :class:`inference.prompts.TargetPrompts` (refusals: :class:`PromptError`).
* :func:`rasterize_roi` fills an ROI into a bool (z, y, x) mask (even-odd rule).
* :func:`write_rtstruct` writes :class:`RoiMask` masks as a new RTSTRUCT
  (:class:`RTStructureSet`, a highdicom SOP class).
"""

from rtstruct.prompts import PromptConventions, PromptError, extract_prompts, find_prompt_rois
from rtstruct.rasterize import map_contour, rasterize_roi
from rtstruct.reader import (
    ROI,
    Contour,
    RTStructError,
    StructureSet,
    check_references,
    read_rtstruct,
)
from rtstruct.writer import RoiMask, RTStructureSet, mask_to_polygons, write_rtstruct

__all__ = [
    "ROI",
    "Contour",
    "PromptConventions",
    "PromptError",
    "RTStructError",
    "RTStructureSet",
    "RoiMask",
    "StructureSet",
    "check_references",
    "extract_prompts",
    "find_prompt_rois",
    "map_contour",
    "mask_to_polygons",
    "rasterize_roi",
    "read_rtstruct",
    "write_rtstruct",
]
