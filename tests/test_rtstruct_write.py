"""RTSTRUCT writer: round trips mask -> RTSTRUCT -> mask, dataset content, dciodvfy."""

from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import pytest
from helpers import dciodvfy_report, make_volume, shared_path
from highdicom._standard_utils import check_required_attributes, get_iod_module_map, get_sop_class_iod_map

from inference.geometry import Geometry
from inference.metrics import dice
from inference.volume import Volume
from rtstruct import (
    RoiMask,
    RTStructError,
    mask_to_polygons,
    rasterize_roi,
    read_rtstruct,
    write_rtstruct,
)
from rtstruct.series import load_series
from rtstruct.writer import slice_polygons_to_patient

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
UID_GRAMMAR = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

ATTRIBUTES = {
    "PatientName": "Phantom^Round^Trip",
    "PatientID": "RT-0001",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "StudyDate": "20240102",
    "StudyTime": "101010",
    "StudyID": "S1",
    "AccessionNumber": "A1",
    "ReferringPhysicianName": "",
    "SpecificCharacterSet": "ISO_IR 100",
    "PositionReferenceIndicator": "",
    "Manufacturer": "Scanner Vendor",  # the images' equipment: must NOT be copied
}


# -- helpers ------------------------------------------------------------------------------
def axial_geometry() -> Geometry:
    return Geometry(shape=(40, 96, 96), spacing=(2.5, 0.9, 0.9), origin=[-43.0, -40.0, 12.5], direction=np.eye(3)[::-1])


def oblique_geometry() -> Geometry:
    """About the obliquity of sts-001-mr/MR_T1 (2 degrees), plus a rotation about the
    normal, with anisotropic pixels."""
    a, b = np.deg2rad(2.0), np.deg2rad(7.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    rot = rz @ rx
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    direction = np.stack([np.cross(row_dir, col_dir), col_dir, row_dir])
    return Geometry(shape=(30, 100, 90), spacing=(5.2, 0.8, 0.7), origin=[-31.7, -52.3, -80.1], direction=direction)


def physical_grid(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Millimetre offsets along the index axes (k, i, j) from the volume centre."""
    k, i, j = np.indices(geometry.shape, dtype=np.float64)
    centre = (np.asarray(geometry.shape) - 1) / 2.0
    dz, dy, dx = geometry.spacing
    return (k - centre[0]) * dz, (i - centre[1]) * dy, (j - centre[2]) * dx


def sphere(geometry: Geometry) -> np.ndarray:
    z, y, x = physical_grid(geometry)
    r = 0.3 * min(s * n for s, n in zip(geometry.spacing, geometry.shape))
    return z**2 + y**2 + x**2 <= r**2


def ellipsoid_with_hole(geometry: Geometry) -> np.ndarray:
    z, y, x = physical_grid(geometry)
    ext = [0.35 * s * n for s, n in zip(geometry.spacing, geometry.shape)]
    outer = (z / ext[0]) ** 2 + (y / ext[1]) ** 2 + (x / (0.8 * ext[2])) ** 2 <= 1
    inner = (z / (0.5 * ext[0])) ** 2 + ((y - 0.1 * ext[1]) / (0.4 * ext[1])) ** 2 + (x / (0.3 * ext[2])) ** 2 <= 1
    return outer & ~inner


def two_components(geometry: Geometry) -> np.ndarray:
    z, y, x = physical_grid(geometry)
    ext = [s * n for s, n in zip(geometry.spacing, geometry.shape)]
    r = 0.15 * min(ext)
    a = z**2 + (y - 0.2 * ext[1]) ** 2 + (x + 0.2 * ext[2]) ** 2 <= r**2
    b = (z - 0.05 * ext[0]) ** 2 + (y + 0.2 * ext[1]) ** 2 + (x - 0.2 * ext[2]) ** 2 <= (0.8 * r) ** 2
    return a | b


SHAPES = {"sphere": sphere, "ellipsoid_with_hole": ellipsoid_with_hole, "two_components": two_components}


def reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Encode as a Part 10 file and read it back, as a receiver would."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def round_trip(volume: Volume, mask: np.ndarray, name: str = "GTV_AI") -> tuple[np.ndarray, pydicom.Dataset]:
    ds = reread(
        write_rtstruct(volume, [RoiMask(name=name, mask=mask, algorithm_name="classic", algorithm_version="1.0")])
    )
    back = rasterize_roi(read_rtstruct(ds).roi(name), volume.geometry)
    return back, ds


@pytest.fixture(scope="module")
def mr_t1_volume() -> Volume:
    return load_series(shared_path("sts-001-mr", "MR_T1", "IMAGES"))


# -- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("geometry_name", ["axial", "oblique"])
def test_round_trip_synthetic_geometries(shape, geometry_name):
    geometry = axial_geometry() if geometry_name == "axial" else oblique_geometry()
    volume = make_volume(geometry, attributes=ATTRIBUTES)
    mask = SHAPES[shape](geometry)
    assert mask.sum() > 1000
    back, ds = round_trip(volume, mask)
    contours = ds.ROIContourSequence[0].ContourSequence
    slices = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in contours}
    if shape != "sphere":  # holes / components: several contours on some slices
        assert len(contours) > len(slices)
    score = dice(mask, back)
    print(f"round trip {shape} on {geometry_name}: Dice {score:.6f}, {int((mask != back).sum())} voxels differ")
    assert score >= 0.98
    # The even-odd encoding makes the round trip exact, not just close.
    assert np.array_equal(mask, back)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_round_trip_on_mr_t1_oblique_geometry(shape, mr_t1_volume):
    geometry = mr_t1_volume.geometry
    assert not np.allclose(geometry.direction, np.eye(3)[::-1], atol=1e-3)  # really oblique
    mask = SHAPES[shape](geometry)
    back, ds = round_trip(mr_t1_volume, mask)
    score = dice(mask, back)
    print(f"round trip {shape} on MR_T1: Dice {score:.6f}, {int((mask != back).sum())} voxels differ")
    assert score >= 0.98
    assert np.array_equal(mask, back)
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == mr_t1_volume.frame_of_reference_uid


def test_lung1_gtv_rasterised_written_rasterised_again(tmp_path):
    ct = load_series(shared_path("lung1-001-ct", "CT"))
    original = read_rtstruct(shared_path("lung1-001-ct", "RTSTRUCT", "1-1.dcm"))
    first = rasterize_roi(original.roi("GTV-1"), ct.geometry)
    assert first.sum() > 10000
    ds = write_rtstruct(
        ct, [RoiMask("GTV-1", first, color=(0, 255, 120), algorithm_name="round-trip", algorithm_version="1")]
    )
    path = tmp_path / "lung1_gtv.dcm"
    ds.save_as(path, enforce_file_format=True)
    second = rasterize_roi(read_rtstruct(path).roi("GTV-1"), ct.geometry)
    score = dice(first, second)
    print(f"LUNG1-001 GTV-1 rasterised -> written -> rasterised: Dice {score:.6f}")
    assert score >= 0.97
    assert np.array_equal(first, second)
    # Patient and study come from the images, equipment is ours.
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == ct.study_instance_uid
    assert back.PatientID == ct.attributes["PatientID"]
    assert back.Manufacturer == "STARDUST"
    errors, warnings = dciodvfy_report(path)
    print("dciodvfy LUNG1-001 warnings:\n" + "\n".join(warnings))
    assert errors == []


def test_mr_t1_clinical_gtv_round_trip(mr_t1_volume):
    """A clinician's oblique-MR contour, rasterised, written and rasterised again."""
    original = read_rtstruct(shared_path("sts-001-mr", "MR_T1", "RTSTRUCT", "1-1.dcm"))
    first = rasterize_roi(original.roi("GTV_Mass"), mr_t1_volume.geometry)
    back, _ = round_trip(mr_t1_volume, first, name="GTV_Mass")
    assert np.array_equal(first, back)


# -- geometry of the written contours ----------------------------------------------------
def test_contours_lie_on_their_slice_planes_and_reference_their_slice():
    geometry = oblique_geometry()
    volume = make_volume(geometry, attributes=ATTRIBUTES)
    ds = reread(write_rtstruct(volume, [RoiMask("GTV_AI", ellipsoid_with_hole(geometry))]))
    uid_to_k = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    normal = geometry.normal
    contours = ds.ROIContourSequence[0].ContourSequence
    assert len(contours) > 0
    for c in contours:
        assert c.ContourGeometricType == "CLOSED_PLANAR"
        assert len(c.ContourImageSequence) == 1
        ref = c.ContourImageSequence[0]
        assert ref.ReferencedSOPClassUID == volume.sop_class_uid
        k = uid_to_k[ref.ReferencedSOPInstanceUID]
        points = np.array(c.ContourData, dtype=float).reshape(-1, 3)
        assert int(c.NumberOfContourPoints) == len(points)
        distance = np.abs((points - geometry.slice_position(k)) @ normal)
        assert distance.max() < 1e-5, f"contour off its slice plane by {distance.max()} mm"


def test_holes_are_nested_contours_with_opposite_orientation():
    geometry = axial_geometry()
    mask = np.zeros(geometry.shape, dtype=bool)
    mask[5, 20:60, 20:60] = True  # a square ...
    mask[5, 30:50, 30:50] = False  # ... with a square hole ...
    mask[5, 38:42, 38:42] = True  # ... with an island in the hole
    mask[5, 70:80, 70:90] = True  # and a separate component
    volume = make_volume(geometry, attributes=ATTRIBUTES)
    ds = reread(write_rtstruct(volume, [RoiMask("GTV_AI", mask)]))
    contours = ds.ROIContourSequence[0].ContourSequence
    assert len(contours) == 4
    areas = []
    for c in contours:
        pts = np.array(c.ContourData, dtype=float).reshape(-1, 3)
        idx = geometry.patient_to_index(pts)
        r, col = idx[:, 1], idx[:, 2]
        areas.append(0.5 * float(np.dot(col, np.roll(r, -1)) - np.dot(r, np.roll(col, -1))))
        # straight edges collapse: a square boundary keeps only its (cut) corners
        assert len(pts) <= 8
    areas.sort(key=abs)
    # island (16 px), separate component (200), hole (400), outer (1600), up to corner cuts
    np.testing.assert_allclose(np.abs(areas), [16, 200, 400, 1600], atol=1.0)
    signs = [np.sign(a) for a in areas]
    assert signs[3] != signs[2]  # outer vs hole
    assert signs[2] != signs[0]  # hole vs island
    assert signs[3] == signs[1] == signs[0]  # filled regions wind the same way
    assert np.array_equal(rasterize_roi(read_rtstruct(ds).roi("GTV_AI"), geometry), mask)


def test_mask_to_polygons_simplifies_without_changing_the_rasterisation():
    rng = np.random.default_rng(7)
    blob = np.zeros((60, 60), dtype=bool)
    yy, xx = np.mgrid[:60, :60]
    blob[(yy - 30) ** 2 / 400 + (xx - 28) ** 2 / 250 <= 1] = True
    blob &= rng.random(blob.shape) > 0.05  # ragged edges and pinholes
    from skimage.measure import find_contours

    raw = sum(len(c) - 1 for c in find_contours(np.pad(blob, 1).astype(float), 0.5))
    full = mask_to_polygons(blob, tolerance=0)  # only exactly collinear vertices dropped
    simple = mask_to_polygons(blob, tolerance=0.25)
    print(f"vertices: marching squares {raw}, collinear dropped {sum(map(len, full))}, 0.25 px {sum(map(len, simple))}")
    assert sum(map(len, full)) < raw
    assert sum(map(len, simple)) < 0.7 * raw
    from rtstruct.rasterize import SliceContour, fill_contours_even_odd

    for polygons in (full, simple):
        filled = fill_contours_even_odd([SliceContour(0, p[:, 0], p[:, 1], 0.0) for p in polygons], (1, 60, 60))[0]
        assert np.array_equal(filled, blob)


def test_pixel_to_patient_uses_the_slice_plane_and_agrees_with_geometry():
    geometry = oblique_geometry()
    polygon = np.array([[0.0, 0.0], [10.25, 3.5], [99.0, 89.0], [-0.5, 40.0]])
    for k in (0, 7, 29):
        got = slice_polygons_to_patient(geometry, k, polygon)
        expected = geometry.index_to_patient(np.column_stack([np.full(len(polygon), k), polygon]))
        np.testing.assert_allclose(got, expected, atol=1e-9)


# -- dataset content -----------------------------------------------------------------------
def test_dataset_attributes_uids_and_references():
    geometry = axial_geometry()
    volume = make_volume(geometry, attributes=ATTRIBUTES)
    ds = reread(
        write_rtstruct(
            volume,
            [
                RoiMask(
                    "GTV_AI",
                    sphere(geometry),
                    color=(255, 0, 0),
                    algorithm_name="sam2.1_hiera_tiny",
                    algorithm_version="1.0",
                ),
                RoiMask(
                    "NODE_AI",
                    two_components(geometry),
                    color=(0, 128, 255),
                    interpreted_type="GTV",
                    algorithm_name="classic",
                    algorithm_version="0.3",
                    description="fallback engine",
                ),
            ],
            label="STARDUST_AI",
            series_number=77,
        )
    )
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert ds.Modality == "RTSTRUCT"
    for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID):
        assert UID_GRAMMAR.match(uid) and len(uid) <= 64
    assert ds.SeriesInstanceUID != volume.series_instance_uid
    assert ds.SOPInstanceUID not in (ds.SeriesInstanceUID, *volume.sop_instance_uids)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.StudyInstanceUID == volume.study_instance_uid
    assert ds.SeriesNumber == 77
    # patient/study copied, equipment is the node's
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyID",
        "AccessionNumber",
    ):
        assert str(ds[keyword].value) == ATTRIBUTES[keyword]
    assert ds.Manufacturer == "STARDUST"
    assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert ds.StructureSetLabel == "STARDUST_AI"

    fr = ds.ReferencedFrameOfReferenceSequence[0]
    assert fr.FrameOfReferenceUID == volume.frame_of_reference_uid
    study = fr.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == volume.study_instance_uid
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == volume.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == list(volume.sop_instance_uids)
    assert {i.ReferencedSOPClassUID for i in series.ContourImageSequence} == {CT_IMAGE_STORAGE}

    names = [r.ROIName for r in ds.StructureSetROISequence]
    assert names == ["GTV_AI", "NODE_AI"]
    for item in ds.StructureSetROISequence:
        assert item.ROIGenerationAlgorithm == "AUTOMATIC"
        assert item.ReferencedFrameOfReferenceUID == volume.frame_of_reference_uid
    first = ds.StructureSetROISequence[0]
    assert "sam2.1_hiera_tiny" in first.ROIGenerationDescription and "1.0" in first.ROIGenerationDescription
    algo = first.ROIDerivationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("sam2.1_hiera_tiny", "1.0")
    assert ds.StructureSetROISequence[1].ROIDescription == "fallback engine"
    assert [list(rc.ROIDisplayColor) for rc in ds.ROIContourSequence] == [[255, 0, 0], [0, 128, 255]]
    assert [rc.ReferencedROINumber for rc in ds.ROIContourSequence] == [1, 2]
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["GTV", "GTV"]
    assert [o.ReferencedROINumber for o in ds.RTROIObservationsSequence] == [1, 2]


def test_decimal_strings_are_at_most_16_characters():
    geometry = Geometry(
        shape=(6, 40, 40),
        spacing=(1.0 / 3, 0.123456789, 0.987654321),
        origin=[-12345.678912345, 23456.789123456, -0.000001234],
        direction=oblique_geometry().direction,
    )
    yy, xx = np.mgrid[:40, :40]
    mask = np.zeros(geometry.shape, dtype=bool)
    mask[1:5] = (yy - 20) ** 2 + (xx - 19) ** 2 <= 15**2
    ds = reread(write_rtstruct(make_volume(geometry, attributes=ATTRIBUTES), [RoiMask("GTV_AI", mask)]))
    count = 0
    for elem in ds.iterall():
        if elem.VR == "DS" and elem.value is not None:
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                assert len(v.original_string if hasattr(v, "original_string") else str(v)) <= 16
                count += 1
    assert count > 100


def test_type_1_and_2_attributes_present_even_without_image_attributes(tmp_path):
    geometry = axial_geometry()
    volume = make_volume(geometry, attributes={})
    ds = write_rtstruct(volume, [RoiMask("GTV_AI", sphere(geometry))])
    iod = get_sop_class_iod_map()[ds.SOPClassUID]
    for module in get_iod_module_map()[iod]:
        if module["usage"] == "M" or module["key"] == "frame-of-reference":
            check_required_attributes(ds, module["key"])  # raises AttributeError naming what is missing
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "OperatorsName",
        "Manufacturer",
        "StructureSetDate",
        "StructureSetTime",
        "PositionReferenceIndicator",
        "SeriesNumber",
    ):
        assert keyword in ds, keyword
    for obs in ds.RTROIObservationsSequence:
        assert "ROIInterpreter" in obs and "RTROIInterpretedType" in obs
    path = tmp_path / "no_attributes.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy_report(path)
    assert errors == []


def test_dciodvfy_reports_no_errors_for_a_synthetic_rtstruct(tmp_path):
    geometry = oblique_geometry()
    volume = make_volume(geometry, modality="MR", attributes=ATTRIBUTES)
    ds = write_rtstruct(
        volume,
        [
            RoiMask("GTV_AI", ellipsoid_with_hole(geometry)),
            RoiMask("GTV2_AI", two_components(geometry), color=(0, 0, 255)),
        ],
    )
    path = tmp_path / "synthetic.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_report(path)
    print("dciodvfy synthetic warnings:\n" + "\n".join(warnings))
    assert errors == []


# -- refusals ------------------------------------------------------------------------------
def test_refuses_bad_input_with_clear_messages():
    geometry = axial_geometry()
    volume = make_volume(geometry, attributes=ATTRIBUTES)
    good = sphere(geometry)
    with pytest.raises(RTStructError, match="GTV_AI.*empty"):
        write_rtstruct(volume, [RoiMask("GTV_AI", np.zeros(geometry.shape, dtype=bool))])
    with pytest.raises(RTStructError, match=r"'A_VERY_LONG_NAME_AI' has 19 characters.*at most 16"):
        write_rtstruct(volume, [RoiMask("A_VERY_LONG_NAME_AI", good)])
    with pytest.raises(RTStructError, match="StructureSetLabel.*at most 16"):
        write_rtstruct(volume, [RoiMask("GTV_AI", good)], label="A LABEL THAT IS TOO LONG")
    with pytest.raises(RTStructError, match="used twice"):
        write_rtstruct(volume, [RoiMask("GTV_AI", good), RoiMask("gtv_ai", good)])
    with pytest.raises(RTStructError, match="shape"):
        write_rtstruct(volume, [RoiMask("GTV_AI", good[:-1])])
    with pytest.raises(RTStructError, match="ROI name must not be empty"):
        write_rtstruct(volume, [RoiMask(" ", good)])
    with pytest.raises(RTStructError, match="no ROIs"):
        write_rtstruct(volume, [])
    with pytest.raises(RTStructError, match="colour"):
        write_rtstruct(volume, [RoiMask("GTV_AI", good, color=(300, 0, 0))])


def test_mask_touching_the_image_border_gives_closed_contours_inside_the_image():
    geometry = axial_geometry()
    mask = np.zeros(geometry.shape, dtype=bool)
    mask[3:6, :, :10] = True  # touches three borders
    volume = make_volume(geometry, attributes=ATTRIBUTES)
    back, ds = round_trip(volume, mask)
    assert np.array_equal(back, mask)
    for c in ds.ROIContourSequence[0].ContourSequence:
        idx = geometry.patient_to_index(np.array(c.ContourData, dtype=float).reshape(-1, 3))
        assert idx[:, 1].min() >= -0.5 - 1e-6 and idx[:, 2].min() >= -0.5 - 1e-6


def test_odd_image_attributes_never_break_the_writer(caplog):
    geometry = axial_geometry()
    mask = sphere(geometry)
    odd = {
        "StudyDate": "2008-09-18",  # not DICOM DA
        "StudyTime": "25:99",
        "PatientBirthDate": "19700230",  # no 30 February
        "PatientSex": "X",
        "PatientName": "Müller^Jörg",  # non-ASCII without SpecificCharacterSet
        "StudyID": "S" * 17,  # SH allows 16
    }
    ds = reread(write_rtstruct(make_volume(geometry, attributes=odd), [RoiMask("GTV_AI", mask)]))
    assert ds.StudyDate == "" and ds.StudyTime == "" and ds.PatientBirthDate == "" and ds.PatientSex == ""
    assert ds.StudyID == "S" * 16  # truncated to its VR (rtstruct.conform)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Müller^Jörg"
    assert "19700230" not in caplog.text  # no patient data in the log
    # A multi-valued character set the images use is kept as is.
    iso2022 = {"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "PatientName": "Yamada^Tarou=山田^太郎"}
    ds = reread(write_rtstruct(make_volume(geometry, attributes=iso2022), [RoiMask("GTV_AI", mask)]))
    assert list(ds.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert str(ds.PatientName) == "Yamada^Tarou=山田^太郎"
