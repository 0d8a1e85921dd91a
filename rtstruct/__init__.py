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

from __future__ import annotations

import importlib

# Names are imported on first use (PEP 562), so that ``from rtstruct.reader import ...``
# stays light: the writer pulls in highdicom and scikit-image (about 2 s).
_EXPORTS = {
    "PromptConventions": "rtstruct.prompts",
    "PromptError": "rtstruct.prompts",
    "extract_prompts": "rtstruct.prompts",
    "find_prompt_rois": "rtstruct.prompts",
    "map_contour": "rtstruct.rasterize",
    "rasterize_roi": "rtstruct.rasterize",
    "ROI": "rtstruct.reader",
    "Contour": "rtstruct.reader",
    "RTStructError": "rtstruct.reader",
    "StructureSet": "rtstruct.reader",
    "check_references": "rtstruct.reader",
    "read_rtstruct": "rtstruct.reader",
    "RoiMask": "rtstruct.writer",
    "RTStructureSet": "rtstruct.writer",
    "mask_to_polygons": "rtstruct.writer",
    "write_rtstruct": "rtstruct.writer",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - the lazily imported names, kept in one place


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rtstruct' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
