"""What the rules can see of a case: :class:`RuleContext` (AE titles, modality, ROI names,
the headers of one image and of the RTSTRUCT), built by the node per case or from files
(``dicom-node rules test``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.rules.conditions import RulesError
from inference.files import files_under
from rtstruct.headers import DicomFileError, FileKind, kind_of, read_header


@dataclass
class RuleContext:
    """What the rules can see of a case (headers only; no pixel data, no inference)."""

    calling_aet: str | None = None
    called_aet: str | None = None
    modality: str | None = None
    prompt_roi_names: list[str] = field(default_factory=list)
    roi_names: list[str] = field(default_factory=list)
    image_header: pydicom.Dataset | None = None
    rtstruct_header: pydicom.Dataset | None = None

    @classmethod
    def from_files(
        cls,
        images: list[Path] | Path,
        rtstruct: Path,
        calling_aet: str | None = None,
        called_aet: str | None = None,
        prompt_roi_names: list[str] | None = None,
        conventions: Any = None,
    ) -> RuleContext:
        """Read the headers of the first readable image and of the RTSTRUCT.

        ``images`` is a list of files or a folder (searched recursively; the first DICOM
        file that is not an RTSTRUCT serves). ``prompt_roi_names`` overrides the prompt
        ROIs found by :func:`rtstruct.prompts.find_prompt_rois` with ``conventions``
        (a :class:`rtstruct.prompts.PromptConventions`; pass the node's when its prompt
        patterns are configured differently). Raises :class:`RulesError` when the
        RTSTRUCT cannot be read.
        """
        image_header = _first_image_header(images)
        rt_path = Path(rtstruct)
        try:
            rt = read_header(rt_path)
        except DicomFileError as exc:
            raise RulesError(f"{rt_path}: cannot read the RTSTRUCT ({exc.reason})") from exc
        roi_names = [str(item.get("ROIName", "") or "") for item in rt.get("StructureSetROISequence") or []]
        if prompt_roi_names is None:
            try:
                prompt_roi_names = prompt_rois_of(rt, conventions)
            except ValueError as exc:  # RTStructError: content that cannot be used
                raise RulesError(f"{rt_path}: {exc}") from exc
        modality = None
        if image_header is not None:
            modality = str(image_header.get("Modality", "") or "").strip() or None
        return cls(
            calling_aet=calling_aet,
            called_aet=called_aet,
            modality=modality,
            prompt_roi_names=list(prompt_roi_names),
            roi_names=roi_names,
            image_header=image_header,
            rtstruct_header=rt,
        )


def prompt_rois_of(rtstruct: pydicom.Dataset | Path, conventions: Any = None) -> list[str]:
    """Names of the prompt ROIs (``BOX_*``, ``POS_*``, ``NEG_*``) of an RTSTRUCT.

    ``conventions`` is a :class:`rtstruct.prompts.PromptConventions` (default: the
    standard names). Raises :class:`rtstruct.reader.RTStructError` for an unusable file.
    """
    from rtstruct.prompts import DEFAULT_CONVENTIONS, find_prompt_rois
    from rtstruct.reader import read_rtstruct

    structure_set = read_rtstruct(rtstruct)
    return [roi.name for roi in find_prompt_rois(structure_set, conventions or DEFAULT_CONVENTIONS)]


def _first_image_header(images: list[Path] | Path) -> pydicom.Dataset | None:
    """The header of the first CT/MR image among ``images`` (a folder or files), or None."""
    if isinstance(images, (str, Path)):
        root = Path(images)
        candidates = files_under(root) if root.is_dir() else [root]
    else:
        candidates = [Path(p) for p in images]
    for path in candidates:
        try:
            ds = read_header(path)
        except DicomFileError:
            continue
        if kind_of(ds.get("SOPClassUID"), ds.get("Modality")) is FileKind.IMAGE:
            return ds
    return None
