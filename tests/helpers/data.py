"""Test data: phantoms written once per session, synthetic volumes, and the checks of a result RTSTRUCT."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import CTImageStorage, MRImageStorage, RTStructureSetStorage, generate_uid

from inference.geometry import Geometry
from inference.volume import Volume

from .dicom import dciodvfy_errors


def make_volume(
    grid: np.ndarray | Geometry,
    *,
    modality: str = "CT",
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0),
    attributes: dict[str, Any] | None = None,
) -> Volume:
    """A volume without files, with fresh UIDs (one per slice), for engines and the RTSTRUCT code.

    ``grid`` is either the voxel values (an array on an axial grid at the origin with
    ``spacing``, slices stacked along -z) or a :class:`Geometry` (an int16 volume of zeros on
    it). ``attributes`` are the DICOM attributes an RTSTRUCT written on the volume copies.
    """
    if isinstance(grid, Geometry):
        geometry, array = grid, np.zeros(grid.shape, dtype=np.int16)
    else:
        array = np.asarray(grid)
        geometry = Geometry(shape=array.shape, spacing=spacing, origin=np.zeros(3), direction=np.eye(3)[::-1])
    return Volume(
        array=array,
        geometry=geometry,
        sop_instance_uids=tuple(generate_uid() for _ in range(geometry.shape[0])),
        modality=modality,
        series_instance_uid=generate_uid(),
        study_instance_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        sop_class_uid=MRImageStorage if modality == "MR" else CTImageStorage,
        attributes=dict(attributes or {}),
    )


def copy_files(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        dst = folder / f.name
        shutil.copyfile(f, dst)
        out.append(dst)
    return out


# -- phantoms (made once per test session, in a temporary folder) -------------------------
_PHANTOMS: dict[tuple, dict[str, Path]] = {}
_PHANTOM_ROOT: Path | None = None


def phantom(
    seed: int = 1,
    modality: str = "CT",
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> dict[str, Path]:
    """``write_phantom`` output (images/, prompt.dcm, truth.dcm), cached for the session.

    Treat the files as read-only (copy them before changing anything).
    """
    global _PHANTOM_ROOT
    import atexit
    import tempfile

    from dicom_node.phantom import write_phantom

    key = (seed, modality, shape, spacing)
    if key not in _PHANTOMS:
        if _PHANTOM_ROOT is None:
            _PHANTOM_ROOT = Path(tempfile.mkdtemp(prefix="stardust-phantoms-"))
            atexit.register(shutil.rmtree, _PHANTOM_ROOT, True)
        kw = {}
        if shape is not None:
            kw["shape"] = shape
        if spacing is not None:
            kw["spacing"] = spacing
        out = _PHANTOM_ROOT / f"{modality}-{seed}-{len(_PHANTOMS)}"
        _PHANTOMS[key] = write_phantom(out, modality, seed, **kw)
    return _PHANTOMS[key]


def image_files(p: dict[str, Path]) -> list[Path]:
    return sorted(Path(p["images"]).glob("*.dcm"))


def check_result(result: Path, p: dict[str, Path], min_dice: float = 0.90) -> dict:
    """Assert what the issue asks of a result RTSTRUCT; returns facts for more checks."""
    import pydicom

    from inference.metrics import dice
    from rtstruct.rasterize import rasterize_roi
    from rtstruct.reader import read_rtstruct
    from rtstruct.series import load_series

    errors = dciodvfy_errors(result)
    assert errors == [], "dciodvfy errors:\n" + "\n".join(errors)
    ds = pydicom.dcmread(result)
    volume = load_series(p["images"])
    assert ds.SOPClassUID == RTStructureSetStorage
    ss = read_rtstruct(ds)
    assert ss.referenced_series_uids == [volume.series_instance_uid]  # references the sent series
    assert ss.frame_of_reference_uids == [volume.frame_of_reference_uid]
    assert set(ss.referenced_image_uids) <= set(volume.sop_instance_uids)
    assert ds.SeriesInstanceUID != volume.series_instance_uid
    (roi,) = ss.rois
    assert roi.interpreted_type == "GTV"
    assert ds.StructureSetROISequence[0].ROIGenerationAlgorithm == "AUTOMATIC"
    truth = rasterize_roi(read_rtstruct(p["truth"]).roi("GTV"), volume.geometry)
    score = dice(rasterize_roi(roi, volume.geometry), truth)
    assert score >= min_dice, f"Dice {score:.3f} < {min_dice}"
    return {"dice": score, "roi": roi.name, "sop": str(ds.SOPInstanceUID), "dataset": ds}
