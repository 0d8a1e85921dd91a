"""RTSTRUCT reading, reference checks and rasterisation (real files and synthetic contours)."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from helpers import SHARED_DATA, shared_path

from inference.geometry import Geometry
from inference.volume import Volume
from rtstruct import (
    ROI,
    Contour,
    RTStructError,
    check_references,
    map_contour,
    rasterize_roi,
    read_rtstruct,
)
from rtstruct.series import load_series


def _all_rtstructs() -> list[Path]:
    if not SHARED_DATA.exists():
        return []
    found = []
    for path in sorted(SHARED_DATA.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        if ds.get("Modality") == "RTSTRUCT":
            found.append(path)
    return found


def axial(shape=(5, 20, 20), spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Geometry:
    return Geometry(shape=shape, spacing=spacing, origin=np.asarray(origin, float), direction=np.eye(3)[::-1])


def square(geometry: Geometry, k: float, i0: float, j0: float, i1: float, j1: float) -> np.ndarray:
    """Patient points of an in-plane rectangle with continuous index corners on slice k."""
    idx = np.array([[k, i0, j0], [k, i0, j1], [k, i1, j1], [k, i1, j0]], dtype=float)
    return geometry.index_to_patient(idx)


def roi_of(*contours: np.ndarray, name="R", gtype="CLOSED_PLANAR") -> ROI:
    return ROI(number=1, name=name, contours=[Contour(points=c, geometric_type=gtype) for c in contours])


# -- every real RTSTRUCT -------------------------------------------------------------------
def test_every_rtstruct_in_shared_data_is_read():
    paths = _all_rtstructs()
    if not paths:
        shared_path("lung1-001-ct")  # skips with the standard reason
    assert len(paths) >= 6
    for path in paths:
        ss = read_rtstruct(path)
        assert ss.sop_instance_uid and ss.rois, path
        assert ss.frame_of_reference_uids, path
        for roi in ss.rois:
            assert isinstance(roi.number, int) and roi.name
            for contour in roi.contours:
                assert contour.points.ndim == 2 and contour.points.shape[1] == 3
                assert np.isfinite(contour.points).all()


def test_lung1_content_and_references():
    ss = read_rtstruct(shared_path("lung1-001-ct", "RTSTRUCT", "1-1.dcm"))
    assert ss.roi_names == ["GTV-1", "Spinal-Cord", "Lung-Left", "Lung-Right"]
    gtv = ss.roi("GTV-1")
    assert gtv.number == 2 and len(gtv.contours) == 21
    assert gtv.color == (0, 255, 120)
    assert gtv.interpreted_type == "ORGAN" and gtv.generation_algorithm == "MANUAL"
    assert gtv.geometric_types == {"CLOSED_PLANAR"}
    assert ss.roi("gtv-1") is gtv  # case-insensitive fallback
    with pytest.raises(KeyError, match="no ROI named 'Heart'.*GTV-1"):
        ss.roi("Heart")
    ct = load_series(shared_path("lung1-001-ct", "CT"))
    assert ss.frame_of_reference_uids == [ct.frame_of_reference_uid]
    assert ss.referenced_series_uids == [ct.series_instance_uid]
    assert set(ss.referenced_image_uids) == set(ct.sop_instance_uids)
    # per-contour references are included
    per_contour = {u for r in ss.rois for c in r.contours for u in c.referenced_sop_instance_uids}
    assert per_contour and per_contour <= set(ss.referenced_image_uids)
    check_references(ss, ct)  # consistent: no exception
    # each contour maps exactly onto the slice it references
    for contour in gtv.contours:
        mapped = map_contour(contour, ct.geometry, "GTV-1")
        assert ct.sop_instance_uids[mapped.slice_index] == contour.referenced_sop_instance_uids[0]
        assert mapped.max_offset_mm < 1e-3
    mask = rasterize_roi(gtv, ct.geometry)
    assert mask.any(axis=(1, 2)).sum() == 21


def test_mr_t1_oblique_contours_lie_on_the_oblique_planes():
    mr = load_series(shared_path("sts-001-mr", "MR_T1", "IMAGES"))
    ss = read_rtstruct(shared_path("sts-001-mr", "MR_T1", "RTSTRUCT", "1-1.dcm"))
    check_references(ss, mr)
    for roi in ss.rois:
        for contour in roi.contours:
            mapped = map_contour(contour, mr.geometry, roi.name)
            assert mapped.max_offset_mm < 0.01
            assert mr.sop_instance_uids[mapped.slice_index] in contour.referenced_sop_instance_uids
        assert rasterize_roi(roi, mr.geometry).sum() > 1000
    # The T2 RTSTRUCT is on the same frame of reference but another series: refused.
    t2 = read_rtstruct(shared_path("sts-001-mr", "MR_T2", "RTSTRUCT", "1-1.dcm"))
    with pytest.raises(RTStructError, match="references series .* not the images' series"):
        check_references(t2, mr)
    check_references(t2, mr, allow_frame_of_reference_only=True)


def test_eclipse_breast_images_missing_is_refused_clearly():
    ss = read_rtstruct(shared_path("eclipse-breast", "rtss.dcm"))
    assert len(ss.rois) == 10
    assert ss.roi("Areola").contours == []  # the empty ROI is read, not dropped
    assert ss.roi("BODY").interpreted_type == "EXTERNAL"
    ct = load_series(shared_path("eclipse-breast"))  # the one CT slice present
    assert ct.shape[0] == 1
    with pytest.raises(RTStructError, match=r"97 of 98 referenced images are missing"):
        check_references(ss, ct)
    # Mapping ROIs onto the one slice: refused with the ROI's name and the reason.
    with pytest.raises(RTStructError, match=r"ROI 'BODY' contour \d+ is outside the image: .* slice"):
        rasterize_roi(ss.roi("BODY"), ct.geometry)
    with pytest.raises(RTStructError, match=r"ROI 'Areola' is empty \(no contours\)"):
        rasterize_roi(ss.roi("Areola"), ct.geometry)


def test_ge_negative_case_without_referenced_series_is_refused_clearly():
    ss = read_rtstruct(shared_path("ge-phantom-ct", "negative_cases", "non_existent_reference_rt.dcm"))
    assert ss.referenced_series_uids == []
    assert len(ss.frame_of_reference_uids) == 1
    ct = load_series(shared_path("ge-phantom-ct", "CT"))
    with pytest.raises(RTStructError, match="references no image series \\(only frame of reference .*\\)"):
        check_references(ss, ct)
    # With the frame-of-reference fallback the geometry still agrees.
    check_references(ss, ct, allow_frame_of_reference_only=True)
    assert rasterize_roi(ss.roi("ROI-1"), ct.geometry).sum() > 100
    # The consistent RTSTRUCT of the same phantom passes.
    check_references(read_rtstruct(shared_path("ge-phantom-ct", "RTSTRUCT", "rt.dcm")), ct)


def test_other_frame_of_reference_is_refused():
    ss = read_rtstruct(shared_path("lung1-001-ct", "RTSTRUCT", "1-1.dcm"))
    mr = load_series(shared_path("ge-phantom-ct", "CT"))
    with pytest.raises(RTStructError, match="is on frame of reference .* the images are on"):
        check_references(ss, mr)


# -- unusable input ------------------------------------------------------------------------
def test_not_dicom_not_rtstruct_and_missing_file(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("not DICOM at all")
    with pytest.raises(RTStructError, match="not a DICOM file"):
        read_rtstruct(text)
    with pytest.raises(RTStructError, match="no such file"):
        read_rtstruct(tmp_path / "absent.dcm")
    ct = pydicom.Dataset()
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.Modality = "CT"
    with pytest.raises(RTStructError, match="not an RT Structure Set: SOP class CT Image Storage, modality CT"):
        read_rtstruct(ct)


def _minimal_rtstruct(contour_data, gtype="CLOSED_PLANAR") -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = highdicom.UID()
    ds.Modality = "RTSTRUCT"
    ds.StructureSetLabel = "T"
    item = pydicom.Dataset()
    item.ROINumber = 4
    item.ROIName = "PTV"
    item.ReferencedFrameOfReferenceUID = "1.2.3"
    ds.StructureSetROISequence = [item]
    contour = pydicom.Dataset()
    contour.ContourGeometricType = gtype
    contour.NumberOfContourPoints = len(contour_data) // 3
    contour.ContourData = contour_data
    rc = pydicom.Dataset()
    rc.ReferencedROINumber = 4
    rc.ROIDisplayColor = [1, 2, 3]
    rc.ContourSequence = [contour]
    ds.ROIContourSequence = [rc]
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_malformed_contour_data_names_the_roi(tmp_path):
    ss = read_rtstruct(_minimal_rtstruct([0, 0, 0, 1, 1, 0, 1, 0, 0]))
    assert ss.roi("PTV").color == (1, 2, 3) and ss.frame_of_reference_uids == ["1.2.3"]
    with pytest.raises(RTStructError, match=r"ROI 'PTV' \(number 4\), contour 1: ContourData has 8 values"):
        read_rtstruct(_minimal_rtstruct([0, 0, 0, 1, 1, 0, 1, 0]))
    # A file whose ContourData holds text that is not a number.
    good = _minimal_rtstruct([0, 0, 0, 1, 1, 0, 4321, 0, 0])
    path = tmp_path / "bad_ds.dcm"
    good.save_as(path, implicit_vr=True, little_endian=True)
    data = path.read_bytes()
    assert data.count(b"4321") == 1
    path.write_bytes(data.replace(b"4321", b"43x1"))
    with pytest.raises(RTStructError, match="ROI 'PTV'.*not a number"):
        read_rtstruct(path)
    with pytest.raises(RTStructError, match="non-finite"):
        read_rtstruct(_minimal_rtstruct([0, 0, 0, float("nan"), 1, 0, 1, 0, 0]))
    empty = _minimal_rtstruct([0, 0, 0, 1, 1, 0, 1, 0, 0])
    del empty.StructureSetROISequence
    del empty.ROIContourSequence
    with pytest.raises(RTStructError, match="no ROIs"):
        read_rtstruct(empty)


def test_truncated_file_is_a_clear_error(tmp_path):
    source = shared_path("ge-phantom-ct", "RTSTRUCT", "rt.dcm")
    data = source.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(RTStructError):
        read_rtstruct(cut)


# -- rasterisation rules ---------------------------------------------------------------------
def test_pixel_centre_sampling():
    g = axial()
    # Corners at half-pixels: exactly the pixels 2..5 x 3..8.
    mask = rasterize_roi(roi_of(square(g, 2, 1.5, 2.5, 5.5, 8.5)), g)
    expected = np.zeros(g.shape, bool)
    expected[2, 2:6, 3:9] = True
    assert np.array_equal(mask, expected)
    # Corners a little inside pixel centres: those pixels are out.
    mask = rasterize_roi(roi_of(square(g, 2, 2.1, 3.1, 5.9, 8.9)), g)
    expected = np.zeros(g.shape, bool)
    expected[2, 3:6, 4:9] = True
    assert np.array_equal(mask, expected)


def test_even_odd_rule_holes_islands_and_overlaps():
    g = axial()
    outer = square(g, 1, 0.5, 0.5, 15.5, 15.5)
    hole = square(g, 1, 3.5, 3.5, 12.5, 12.5)
    island = square(g, 1, 6.5, 6.5, 9.5, 9.5)
    separate = square(g, 1, 16.5, 16.5, 18.5, 18.5)
    mask = rasterize_roi(roi_of(outer, hole, island, separate), g)[1]
    expected = np.zeros((20, 20), bool)
    expected[1:16, 1:16] = True
    expected[4:13, 4:13] = False
    expected[7:10, 7:10] = True
    expected[17:19, 17:19] = True
    assert np.array_equal(mask, expected)
    # Contour orientation does not matter with even-odd: reversed hole, same result.
    mask2 = rasterize_roi(roi_of(outer, hole[::-1], island, separate), g)[1]
    assert np.array_equal(mask2, expected)
    # Two overlapping contours: the overlap is outside (XOR), as a TPS reading even-odd shows it.
    a, b = square(g, 3, 1.5, 1.5, 5.5, 5.5), square(g, 3, 3.5, 3.5, 7.5, 7.5)
    m = rasterize_roi(roi_of(a, b), g)[3]
    assert not m[4:6, 4:6].any() and m[2, 2] and m[7, 7]


def test_contours_off_the_slice_planes_are_refused():
    g = axial(spacing=(3.0, 1.0, 1.0))
    on = square(g, 2, 1.5, 1.5, 5.5, 5.5)
    # 0.4 slice off: fine (within half a spacing), goes to slice 2.
    near = on + 0.4 * 3.0 * g.normal
    assert rasterize_roi(roi_of(near), g)[2].sum() == 16
    # 0.6 slice off: on slice 3, 0.4 slice away -> fine.
    assert rasterize_roi(roi_of(on + 0.6 * 3.0 * g.normal), g)[3].sum() == 16
    # Exactly half a slice off: still accepted (the limit is "farther than half").
    assert rasterize_roi(roi_of(on + 0.5 * 3.0 * g.normal), g).sum() == 16
    # Tilted contour: spans more than half a slice -> not parallel.
    tilted = on.copy()
    tilted[:2] += 1.0 * 3.0 * g.normal
    with pytest.raises(RTStructError, match=r"ROI 'R' contour 1 is not on an image plane: it is not parallel"):
        rasterize_roi(roi_of(tilted), g)
    # Slightly tilted (spread 0.55 slice) so that one corner is 0.55 slice off the rounded plane.
    skew = on.copy()
    skew[0] += 0.55 * 3.0 * g.normal
    with pytest.raises(RTStructError, match=r"not on an image plane: it is not parallel"):
        rasterize_roi(roi_of(skew), g)
    # Between two slices: points 0.4 and 0.6 slice above slice 2.
    between = on.copy()
    between[:2] += 0.4 * 3.0 * g.normal
    between[2:] += 0.6 * 3.0 * g.normal
    with pytest.raises(
        RTStructError,
        match=r"'R' contour 1 is not on an image plane: it lies between slices, "
        r"up to 1\.80 mm from slice 2, more than half the slice spacing of 3 mm",
    ):
        rasterize_roi(roi_of(between), g)
    # Beyond the last slice.
    with pytest.raises(RTStructError, match="outside the image: it lies about 9.0 mm beyond the last slice"):
        rasterize_roi(roi_of(square(g, 7, 1.5, 1.5, 5.5, 5.5)), g)


def test_oblique_mapping_uses_the_direction_matrix():
    a = np.deg2rad(20)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([0.0, 0.0, -1.0])  # a coronal-ish oblique plane
    g = Geometry.from_dicom([10.0, -5.0, 30.0], [*row, *col], (0.8, 0.6), 2.5, (6, 30, 40))
    contour = square(g, 4, 9.5, 10.5, 19.5, 30.5)
    mask = rasterize_roi(roi_of(contour), g)
    expected = np.zeros(g.shape, bool)
    expected[4, 10:20, 11:31] = True
    assert np.array_equal(mask, expected)


def test_point_only_and_empty_rois_are_refused():
    g = axial()
    with pytest.raises(RTStructError, match=r"ROI 'MARK' has no CLOSED_PLANAR contours \(only POINT\)"):
        rasterize_roi(roi_of(np.array([[1.0, 2.0, 2.0]]), name="MARK", gtype="POINT"), g)
    with pytest.raises(RTStructError, match=r"ROI 'E' is empty"):
        rasterize_roi(ROI(number=3, name="E"), g)


def test_check_references_missing_images_counts_them():
    ss = read_rtstruct(shared_path("lung1-001-ct", "RTSTRUCT", "1-1.dcm"))
    ct = load_series(shared_path("lung1-001-ct", "CT"))
    partial = Volume(
        array=ct.array[:100],
        geometry=Geometry(
            shape=(100, 512, 512), spacing=ct.spacing, origin=ct.geometry.origin, direction=ct.geometry.direction
        ),
        sop_instance_uids=ct.sop_instance_uids[:100],
        modality="CT",
        series_instance_uid=ct.series_instance_uid,
        study_instance_uid=ct.study_instance_uid,
        frame_of_reference_uid=ct.frame_of_reference_uid,
        sop_class_uid=ct.sop_class_uid,
    )
    with pytest.raises(RTStructError, match="34 of 134 referenced images are missing"):
        check_references(ss, partial)
    with_copy = copy.copy(ss)
    with_copy.referenced_series_uids = []
    with pytest.raises(RTStructError, match="references no image series"):
        check_references(with_copy, ct)
