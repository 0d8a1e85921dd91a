"""Prompt ROIs (BOX_/POS_/NEG_) -> voxel-space prompts, and every refusal with its reason."""

from __future__ import annotations

import io

import highdicom
import numpy as np
import pydicom
import pytest
from helpers import make_volume, shared_path

from inference.geometry import Geometry
from inference.prompts import BoxPrompt
from inference.volume import Volume
from rtstruct import (
    PromptConventions,
    PromptError,
    RoiMask,
    extract_prompts,
    find_prompt_rois,
    read_rtstruct,
    write_rtstruct,
)
from rtstruct.prompts import mm_range, slice_ranges, unique_name
from rtstruct.series import load_series

PATIENT = {"PatientID": "P1"}


@pytest.fixture
def volume() -> Volume:
    return make_volume(
        Geometry(shape=(20, 64, 64), spacing=(3.0, 0.8, 0.8), origin=[-25.0, -25.0, 100.0], direction=np.eye(3)[::-1]),
        attributes=PATIENT,
    )


def rect(volume: Volume, k: int, i0: int, j0: int, i1: int, j1: int) -> np.ndarray:
    """A mask that is True on slice k for rows i0..i1, columns j0..j1 (inclusive)."""
    m = np.zeros(volume.shape, dtype=bool)
    m[k, i0 : i1 + 1, j0 : j1 + 1] = True
    return m


def prompt_dataset(volume: Volume, rois: list[tuple[str, np.ndarray]], extra: list[str] = ()) -> pydicom.Dataset:
    """An RTSTRUCT written by our writer with the given prompt ROIs (plus clinician ROIs
    named in ``extra``, drawn as a small square), read back from bytes."""
    masks = [RoiMask(name, mask) for name, mask in rois]
    masks += [RoiMask(name, rect(volume, 0, 0, 0, 3, 3)) for name in extra]
    ds = write_rtstruct(volume, masks, label="PROMPTS")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def contour_items(ds: pydicom.Dataset, name: str):
    number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == name)
    return next(rc for rc in ds.ROIContourSequence if rc.ReferencedROINumber == number).ContourSequence


def boxes(target) -> list[tuple]:
    """Boxes as (slice, i0, j0, i1, j1) tuples, coordinates rounded to 1e-4 pixel (the
    decimal strings carry 1e-6 mm)."""
    return [(b.slice_index, *(round(v, 4) for v in (b.i0, b.j0, b.i1, b.j1))) for b in target.boxes]


def make_point(ds: pydicom.Dataset, name: str, point: np.ndarray) -> None:
    """Turn ROI ``name`` into one POINT contour at patient ``point``."""
    items = contour_items(ds, name)
    first = items[0]
    first.ContourGeometricType = "POINT"
    first.NumberOfContourPoints = 1
    first.ContourData = [f"{v:.6f}" for v in point]
    del items[1:]


# -- extraction ------------------------------------------------------------------------------
def test_box_prompt_is_the_in_plane_bounding_box_per_slice(volume):
    mask = rect(volume, 7, 10, 20, 30, 45) | rect(volume, 8, 12, 22, 28, 40)
    ss = read_rtstruct(prompt_dataset(volume, [("BOX_", mask)]))
    [target] = extract_prompts(ss, volume)
    assert target.target == "" and target.output_name == "GTV_AI"
    assert target.source_rois == ["BOX_"]
    # marching-squares contours run half a pixel outside the pixel centres
    assert boxes(target) == [(7, 9.5, 19.5, 30.5, 45.5), (8, 11.5, 21.5, 28.5, 40.5)]
    assert all(isinstance(b, BoxPrompt) for b in target.boxes)
    assert target.points == [] and target.anchor_slices == [7, 8]


def test_several_contours_of_a_target_on_one_slice_give_their_joint_box(volume):
    mask = rect(volume, 5, 10, 10, 14, 14) | rect(volume, 5, 30, 35, 33, 40)
    [target] = extract_prompts(read_rtstruct(prompt_dataset(volume, [("BOX_lesion", mask)])), volume)
    assert boxes(target) == [(5, 9.5, 9.5, 33.5, 40.5)]
    assert target.output_name == "lesion_AI"


def test_targets_clicks_and_output_names(volume):
    ds = prompt_dataset(
        volume,
        [
            ("box_Liver", rect(volume, 4, 10, 10, 20, 20)),
            ("POS_liver", rect(volume, 4, 15, 15, 16, 16)),  # a tiny contour: its centroid
            ("NEG_LIVER", rect(volume, 4, 11, 11, 11, 11)),
            ("BOX_node", rect(volume, 9, 40, 40, 50, 50)),
            ("POS_", rect(volume, 12, 30, 30, 31, 31)),
        ],
        extra=["GTV_AI", "node_AI"],  # clinician ROIs already called like our outputs
    )
    make_point(ds, "NEG_LIVER", volume.geometry.index_to_patient([4, 11.25, 11.75]))
    ss = read_rtstruct(ds)
    assert [r.name for r in find_prompt_rois(ss)] == ["box_Liver", "POS_liver", "NEG_LIVER", "BOX_node", "POS_"]
    targets = {t.target.casefold(): t for t in extract_prompts(ss, volume)}
    assert set(targets) == {"liver", "node", ""}
    liver = targets["liver"]
    assert liver.output_name == "Liver_AI"
    assert liver.source_rois == ["box_Liver", "POS_liver", "NEG_LIVER"]
    assert boxes(liver) == [(4, 9.5, 9.5, 20.5, 20.5)]
    [pos, neg] = liver.points
    assert pos.positive and pos.slice_index == 4 and (pos.i, pos.j) == pytest.approx((15.5, 15.5))
    assert not neg.positive and (neg.i, neg.j) == pytest.approx((11.25, 11.75))
    # names never replace a clinician's ROI (compared case-insensitively)
    assert targets["node"].output_name == "node_AI_2"
    assert targets[""].output_name == "GTV_AI_2"
    assert targets[""].boxes == [] and targets[""].points[0].positive


def test_long_target_names_are_cut_to_16_characters(volume):
    ss = read_rtstruct(prompt_dataset(volume, [("BOX_ABCDEFGHIJKL", rect(volume, 3, 5, 5, 9, 9))]))
    [target] = extract_prompts(ss, volume)
    assert target.target == "ABCDEFGHIJKL"
    assert target.output_name == "ABCDEFGHIJKL_AI" and len(target.output_name) <= 16
    assert unique_name("ABCDEFGHIJKLM_AI", {"abcdefghijklm_ai"}) == "ABCDEFGHIJKLM_2"


def test_conventions_are_configurable(volume):
    conventions = PromptConventions(
        box_pattern=r"KASTEN[-_ ]?(?P<target>.*)", output_suffix="_KI", default_output_name="GTV_KI"
    )
    ss = read_rtstruct(
        prompt_dataset(volume, [("Kasten Lunge", rect(volume, 3, 5, 5, 9, 9)), ("BOX_", rect(volume, 4, 5, 5, 9, 9))])
    )
    assert [r.name for r in find_prompt_rois(ss, conventions)] == ["Kasten Lunge"]
    [target] = extract_prompts(ss, volume, conventions, allow_frame_of_reference_only=True)
    assert (target.target, target.output_name) == ("Lunge", "Lunge_KI")
    strict = PromptConventions(ignore_case=False)
    assert strict.classify("box_x") is None and strict.classify("BOX_x") == ("BOX", "x")
    with pytest.raises(ValueError, match="named group"):
        PromptConventions(box_pattern=r"BOX_(.*)")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        PromptConventions(pos_pattern=r"POS_(?P<target>")


def test_prompts_on_the_oblique_mr():
    mr = load_series(shared_path("sts-001-mr", "MR_T1", "IMAGES"))
    mask = np.zeros(mr.shape, dtype=bool)
    mask[20, 200:260, 150:230] = True
    [target] = extract_prompts(read_rtstruct(prompt_dataset(mr, [("BOX_mass", mask)])), mr)
    [box] = target.boxes
    assert box.slice_index == 20
    assert (box.i0, box.j0, box.i1, box.j1) == pytest.approx((199.5, 149.5, 259.5, 229.5), abs=1e-5)


def test_box_from_the_lung1_gtv_on_the_real_ct():
    """The natural real-data prompt: a box around GTV-1 on one slice of LUNG1-001."""
    ct = load_series(shared_path("lung1-001-ct", "CT"))
    truth = read_rtstruct(shared_path("lung1-001-ct", "RTSTRUCT", "1-1.dcm")).roi("GTV-1")
    contour = truth.contours[10]
    idx = ct.geometry.patient_to_index(contour.points)
    k = int(round(idx[:, 0].mean()))
    mask = np.zeros(ct.shape, dtype=bool)
    i0, i1 = int(np.floor(idx[:, 1].min())), int(np.ceil(idx[:, 1].max()))
    j0, j1 = int(np.floor(idx[:, 2].min())), int(np.ceil(idx[:, 2].max()))
    mask[k, i0 : i1 + 1, j0 : j1 + 1] = True
    [target] = extract_prompts(read_rtstruct(prompt_dataset(ct, [("BOX_GTV", mask)])), ct)
    assert boxes(target) == [(k, i0 - 0.5, j0 - 0.5, i1 + 0.5, j1 + 0.5)]
    assert ct.sop_instance_uids[k] in contour.referenced_sop_instance_uids
    assert target.output_name == "GTV_AI"


# -- refusals --------------------------------------------------------------------------------
def test_no_prompt_rois_is_a_clear_error(volume):
    ss = read_rtstruct(prompt_dataset(volume, [("GTV", rect(volume, 3, 5, 5, 9, 9))]))
    assert find_prompt_rois(ss) == []
    with pytest.raises(PromptError, match=r"RTSTRUCT 'PROMPTS' has no prompt ROIs .*its ROIs: 'GTV'") as info:
        extract_prompts(ss, volume)
    assert len(info.value.reasons) == 1


def test_other_frame_of_reference_is_refused(volume):
    ds = prompt_dataset(volume, [("BOX_a", rect(volume, 3, 5, 5, 9, 9))])
    other = highdicom.UID()
    ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = other
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = other
    with pytest.raises(PromptError, match=rf"ROI 'BOX_a' is on another frame of reference \({other}\)") as info:
        extract_prompts(read_rtstruct(ds), volume)
    assert len(info.value.reasons) == 1


def test_off_plane_prompts_are_refused(volume):
    ds = prompt_dataset(volume, [("BOX_a", rect(volume, 3, 5, 5, 9, 9)), ("POS_a", rect(volume, 3, 6, 6, 6, 6))])
    dz = volume.spacing[0]
    for item in contour_items(ds, "BOX_a"):  # between slices 3 and 4: 0.4 and 0.6 slice above 3
        pts = np.array(item.ContourData, dtype=float).reshape(-1, 3)
        pts[:, 2] += np.where(np.arange(len(pts)) < len(pts) // 2, 0.4 * dz, 0.6 * dz)
        item.ContourData = [f"{v:.6f}" for v in pts.ravel()]
    for item in contour_items(ds, "POS_a"):
        pts = np.array(item.ContourData, dtype=float).reshape(-1, 3)
        pts[:, 2] += 0.3 * volume.spacing[0]
        pts[0, 2] += 0.3 * volume.spacing[0]
        item.ContourData = [f"{v:.6f}" for v in pts.ravel()]
    with pytest.raises(PromptError) as info:
        extract_prompts(read_rtstruct(ds), volume)
    reasons = info.value.reasons
    assert len(reasons) == 2
    assert reasons[0].startswith("ROI 'BOX_a' is not on an image plane: it lies between slices, up to 1.80 mm")
    assert reasons[1].startswith("ROI 'POS_a' is not on an image plane")


def test_prompts_outside_the_image_are_refused(volume):
    ds = prompt_dataset(
        volume,
        [
            ("BOX_a", rect(volume, 3, 5, 5, 9, 9)),
            ("POS_b", rect(volume, 3, 6, 6, 6, 6)),
            ("BOX_c", rect(volume, 19, 5, 5, 9, 9)),
        ],
    )
    # BOX_a moved 100 mm sideways: off the 51 mm wide image.
    for item in contour_items(ds, "BOX_a"):
        pts = np.array(item.ContourData, dtype=float).reshape(-1, 3)
        pts[:, 0] += 100.0
        item.ContourData = [f"{v:.6f}" for v in pts.ravel()]
    make_point(ds, "POS_b", volume.geometry.index_to_patient([3, -4.0, 10.0]))
    # BOX_c moved two slices beyond the last one.
    for item in contour_items(ds, "BOX_c"):
        pts = np.array(item.ContourData, dtype=float).reshape(-1, 3)
        pts[:, 2] += 2 * volume.spacing[0]
        item.ContourData = [f"{v:.6f}" for v in pts.ravel()]
    with pytest.raises(PromptError) as info:
        extract_prompts(read_rtstruct(ds), volume)
    reasons = info.value.reasons
    assert any(
        r.startswith("ROI 'BOX_a' is outside the image: its box lies entirely outside the 64x64 slice 3")
        for r in reasons
    ), reasons
    assert any(r.startswith("ROI 'POS_b' is outside the image: the click at row -4.0, column 10.0") for r in reasons)
    assert any(
        r.startswith("ROI 'BOX_c' is outside the image: it lies about 6.0 mm beyond the last slice") for r in reasons
    )


def test_box_partly_outside_the_image_is_clipped(volume):
    ds = prompt_dataset(volume, [("BOX_", rect(volume, 3, 0, 0, 9, 9))])
    for item in contour_items(ds, "BOX_"):
        pts = np.array(item.ContourData, dtype=float).reshape(-1, 3)
        pts[:, 0] -= 4.0  # 5 pixels to the left: partly off the image
        item.ContourData = [f"{v:.6f}" for v in pts.ravel()]
    [target] = extract_prompts(read_rtstruct(ds), volume)
    assert boxes(target) == [(3, 0.0, 0.0, 9.5, 4.5)]


def test_empty_roi_is_refused(volume):
    ds = prompt_dataset(volume, [("BOX_a", rect(volume, 3, 5, 5, 9, 9)), ("POS_a", rect(volume, 3, 6, 6, 6, 6))])
    number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == "BOX_a")
    del next(rc for rc in ds.ROIContourSequence if rc.ReferencedROINumber == number).ContourSequence
    with pytest.raises(PromptError, match=r"ROI 'BOX_a' is empty \(no contours\)") as info:
        extract_prompts(read_rtstruct(ds), volume)
    assert info.value.reasons == ["ROI 'BOX_a' is empty (no contours)"]


def test_large_click_contour_and_negative_only_target_are_refused(volume):
    ds = prompt_dataset(volume, [("POS_a", rect(volume, 3, 5, 5, 40, 40)), ("NEG_b", rect(volume, 3, 6, 6, 6, 6))])
    with pytest.raises(PromptError) as info:
        extract_prompts(read_rtstruct(ds), volume)
    reasons = info.value.reasons
    assert reasons[0].startswith("ROI 'POS_a' is 40.7 mm across, too large for a click (at most 15 mm)")
    assert reasons[1] == "target 'b' (ROI 'NEG_b') has only negative clicks: it needs a BOX_ or POS_ ROI"


def test_stale_image_references_are_refused_unless_frame_of_reference_fallback(volume):
    ds = prompt_dataset(volume, [("BOX_", rect(volume, 3, 5, 5, 9, 9))])
    ss = read_rtstruct(ds)
    # Same frame of reference and grid, but the images were re-sent with new UIDs.
    resent = make_volume(volume.geometry, attributes=PATIENT)
    resent.frame_of_reference_uid = volume.frame_of_reference_uid
    with pytest.raises(PromptError, match="references series .* not the images' series"):
        extract_prompts(ss, resent)
    [target] = extract_prompts(ss, resent, allow_frame_of_reference_only=True)
    assert target.boxes[0].slice_index == 3


def slab(volume: Volume, ks, i0: int, j0: int, i1: int, j1: int) -> np.ndarray:
    """:func:`rect` on every slice of ``ks``."""
    m = np.zeros(volume.shape, dtype=bool)
    for k in ks:
        m |= rect(volume, k, i0, j0, i1, j1)
    return m


def shift(ds: pydicom.Dataset, name: str, axis: int, mm: float) -> None:
    for item in contour_items(ds, name):
        pts = np.array(item.ContourData, dtype=float).reshape(-1, 3)
        pts[:, axis] += mm
        item.ContourData = [f"{v:.6f}" for v in pts.ravel()]


def first_slices(volume: Volume, n: int) -> Volume:
    """The first ``n`` slices of ``volume`` (same series and UIDs): as if the others never arrived."""
    g = volume.geometry
    return Volume(
        array=volume.array[:n],
        geometry=Geometry(shape=(n, *g.shape[1:]), spacing=g.spacing, origin=g.origin, direction=g.direction),
        sop_instance_uids=volume.sop_instance_uids[:n],
        modality=volume.modality,
        series_instance_uid=volume.series_instance_uid,
        study_instance_uid=volume.study_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        sop_class_uid=volume.sop_class_uid,
        attributes=dict(volume.attributes),
    )


def test_ranges_in_the_planners_terms():
    assert slice_ranges([4]) == "slice 4"
    assert slice_ranges([17, 3, 4, 5, 20, 22, 23] + list(range(6, 17))) == "slices 3-17, 20, 22-23"
    assert mm_range([75.0, 2.5, 30.0]) == "2.5-75.0 mm" and mm_range([3.0, 3.0]) == "3.0 mm"


def test_contours_outside_are_one_sentence_per_roi_and_cause(volume):
    ds = prompt_dataset(
        volume,
        [
            ("BOX_a", slab(volume, range(10, 15), 5, 5, 9, 9)),  # moved 10 slices up: 1-5 slices beyond
            ("BOX_b", slab(volume, [3, 4, 5, 8], 5, 5, 9, 9)),  # moved 100 mm sideways: off the image
            ("BOX_c", slab(volume, range(0, 4), 5, 5, 9, 9)),  # moved 2 slices down: 2 before, 2 on the image
        ],
    )
    dz = volume.spacing[0]
    shift(ds, "BOX_a", 2, 10 * dz)
    shift(ds, "BOX_b", 0, 100.0)
    shift(ds, "BOX_c", 2, -2 * dz)
    with pytest.raises(PromptError) as info:
        extract_prompts(read_rtstruct(ds), volume)
    assert info.value.reasons == [
        "ROI 'BOX_a': 5 of 5 contours lie outside the image, 3.0-15.0 mm beyond the last slice "
        "(the volume has 20 slices of 3 mm)",
        "ROI 'BOX_b': 4 of 4 boxes lie outside the 64x64 image (slices 3-5, 8)",
        "ROI 'BOX_c': 2 of 4 contours lie outside the image, 3.0-6.0 mm before the first slice "
        "(the volume has 20 slices of 3 mm)",
    ]
    assert str(info.value).count(". ") == 2 and str(info.value).endswith(".")


def test_missing_images_come_first_and_their_contours_are_not_listed(volume):
    ds = prompt_dataset(
        volume,
        [("BOX_a", slab(volume, range(2, 13), 5, 5, 9, 9)), ("POS_a", rect(volume, 3, 6, 6, 6, 6))],
    )
    make_point(ds, "POS_a", volume.geometry.index_to_patient([3, -4.0, 10.0]))  # a click off the image
    five = first_slices(volume, 5)  # slices 5-19 did not arrive: BOX_a's contours 4-11 lie on them
    with pytest.raises(PromptError) as info:
        extract_prompts(read_rtstruct(ds), five)
    reasons = info.value.reasons
    assert len(reasons) == 2, reasons
    assert reasons[0].startswith("RTSTRUCT 'PROMPTS': 15 of 20 referenced images are missing from the series")
    assert reasons[1].startswith("ROI 'POS_a' is outside the image: the click at row -4.0, column 10.0")
    # Without the references (the fallback), the same contours are outside the 5-slice volume.
    with pytest.raises(PromptError) as info:
        extract_prompts(read_rtstruct(ds), five, allow_frame_of_reference_only=True)
    assert info.value.reasons[0] == (
        "ROI 'BOX_a': 8 of 11 contours lie outside the image, 3.0-24.0 mm beyond the last slice "
        "(the volume has 5 slices of 3 mm)"
    )


# -- the broken real cases -------------------------------------------------------------------
def test_one_slice_of_lung1_with_a_box_on_30_slices():
    """The report: a 1-slice series with a structure set drawn on many slices is refused
    with the missing images, not with one clause per contour."""
    ct = shared_path("lung1-001-ct", "CT")
    volume = load_series(ct)
    box = np.zeros(volume.shape, dtype=bool)
    box[40:70, 200:300, 180:280] = True
    ss = read_rtstruct(prompt_dataset(volume, [("BOX_Heart", box)]))
    uid = volume.sop_instance_uids[55]
    (one,) = [f for f in sorted(ct.glob("*.dcm")) if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == uid]
    with pytest.raises(PromptError) as info:
        extract_prompts(ss, load_series([one]))
    assert info.value.reasons == [
        f"RTSTRUCT 'PROMPTS': 133 of 134 referenced images are missing from the series "
        f"(first missing: {volume.sop_instance_uids[0]})"
    ]


def test_eclipse_breast_refusals():
    path = shared_path("eclipse-breast", "rtss.dcm")
    ct = load_series(shared_path("eclipse-breast"))
    with pytest.raises(PromptError, match="has no prompt ROIs"):
        extract_prompts(read_rtstruct(path), ct)
    # As if the planner had drawn 'Tumor Bed' as a box prompt: the contours are on slices
    # that did not arrive, and 97 of the 98 referenced images are missing.
    ds = pydicom.dcmread(path)
    for item in ds.StructureSetROISequence:
        if item.ROIName == "Tumor Bed":
            item.ROIName = "BOX_bed"
        if item.ROIName == "Areola":
            item.ROIName = "POS_bed"
    with pytest.raises(PromptError) as info:
        extract_prompts(read_rtstruct(ds), ct)
    # The missing images are the cause: the 19 contours on them are not listed one by one.
    reasons = info.value.reasons
    assert reasons[0].startswith("RTSTRUCT 'CT_1': 97 of 98 referenced images are missing from the series"), reasons
    assert reasons[1:] == ["ROI 'POS_bed' is empty (no contours)"]


def test_ge_negative_case_refusal():
    ct = load_series(shared_path("ge-phantom-ct", "CT"))
    ds = pydicom.dcmread(shared_path("ge-phantom-ct", "negative_cases", "non_existent_reference_rt.dcm"))
    ds.StructureSetROISequence[0].ROIName = "BOX_"
    ss = read_rtstruct(ds)
    with pytest.raises(PromptError, match=r"references no image series \(only frame of reference"):
        extract_prompts(ss, ct)
    [target] = extract_prompts(ss, ct, allow_frame_of_reference_only=True)
    assert target.output_name == "GTV_AI" and len(target.boxes) == 3
