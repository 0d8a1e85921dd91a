"""Enhanced (multi-frame) CT and MR: loaded like single-frame series, prompts mapped onto
their frames, results referencing the instance and its frames (issue 11, item 3).

The enhanced instances are made from the phantom's single-frame series: true Enhanced
CT/MR built by hand with pydicom (tests/helpers/enhanced.py), Legacy Converted Enhanced
CT/MR by highdicom's converter. ../shared/data holds no multi-frame images (checked: every
file there is single-frame), so nothing here reads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import (
    NodeProcess,
    StoreSCP,
    dciodvfy_errors,
    delivered,
    image_files,
    phantom,
    storescu,
    write_config,
)
from helpers.enhanced import write_enhanced, write_legacy_converted
from pydicom.uid import (
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
)

from dicom_node.phantom import make_phantom, save_phantom
from inference.engine import EngineSpec
from rtstruct.prompts import extract_prompts
from rtstruct.rasterize import rasterize_roi
from rtstruct.reader import read_rtstruct
from rtstruct.series import VolumeError, load_series
from rtstruct.writer import RoiMask, write_rtstruct


@pytest.fixture(scope="module")
def ct():
    p = phantom(1)
    return p, load_series(p["images"])


@pytest.fixture(scope="module")
def oblique_mr(tmp_path_factory):
    """An oblique MR phantom (about 12 and 8 degrees off axial), images only, plus its box."""
    ph = make_phantom("MR", 2, shape=(40, 160, 160), oblique=True)
    paths = save_phantom(ph, tmp_path_factory.mktemp("mr"), rtstructs=False)
    return paths["images"], load_series(paths["images"]), ph


def _enhanced_prompt(volume, box_mask: np.ndarray, path: Path, *, frames: bool = True) -> Path:
    """A BOX_ prompt RTSTRUCT on ``volume``; without ``frames`` its references name the
    instance only (no ReferencedFrameNumber), as some systems write them."""
    ds = write_rtstruct(volume, [RoiMask("BOX_", box_mask, color=(255, 255, 0), interpreted_type="CONTROL")],
                        label="PROMPT", series_number=801)  # fmt: skip
    if not frames:
        for item in _contour_image_items(ds):
            del item.ReferencedFrameNumber
    ds.save_as(path, enforce_file_format=True)
    return path


def _contour_image_items(ds) -> list:
    items = []
    for fr in ds.ReferencedFrameOfReferenceSequence:
        for study in fr.RTReferencedStudySequence:
            for series in study.RTReferencedSeriesSequence:
                items.extend(series.ContourImageSequence)
    for rc in ds.ROIContourSequence:
        for contour in rc.ContourSequence:
            items.extend(contour.ContourImageSequence)
    return items


def _box_mask(p, volume) -> np.ndarray:
    return rasterize_roi(read_rtstruct(p["prompt"]).roi("BOX_"), volume.geometry)


# -- loading ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, options",
    [
        ("enhanced", {"frame_order": "reversed"}),
        ("enhanced", {"frame_order": "shuffled", "per_frame_geometry": True}),
        ("legacy", {}),
    ],
    ids=["enhanced-shared-groups", "enhanced-per-frame-groups-shuffled", "legacy-converted"],
)
def test_enhanced_ct_loads_like_the_single_frame_series(ct, tmp_path, kind, options):
    p, single = ct
    files = image_files(p)
    if kind == "enhanced":
        path = write_enhanced(files, tmp_path / "enhanced.dcm", **options)
    else:
        path = write_legacy_converted(files, tmp_path / "legacy.dcm")
    volume = load_series(path)
    assert np.array_equal(volume.array, single.array)  # HU, rescaled from the functional groups
    assert volume.array.dtype == single.array.dtype == np.int16
    assert volume.geometry.same_grid(single.geometry)
    assert volume.sop_class_uid == (
        EnhancedCTImageStorage if kind == "enhanced" else LegacyConvertedEnhancedCTImageStorage
    )
    assert volume.modality == "CT"
    instance = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert set(volume.sop_instance_uids) == {instance}
    assert sorted(volume.frame_numbers) == list(range(1, single.shape[0] + 1))
    # the frames are sorted along the normal, whatever order they are stored in
    if options.get("frame_order") == "reversed":
        assert volume.frame_numbers == tuple(range(single.shape[0], 0, -1))
    assert volume.attributes["PatientID"] == single.attributes["PatientID"]
    assert volume.attributes["FrameOfReferenceUID"] == single.frame_of_reference_uid


@pytest.mark.parametrize("kind", ["enhanced", "legacy"])
def test_oblique_enhanced_mr_loads_like_the_single_frame_series(oblique_mr, tmp_path, kind):
    images, single, _ = oblique_mr
    files = sorted(Path(images).glob("*.dcm"))
    if kind == "enhanced":
        path = write_enhanced(files, tmp_path / "mr.dcm", frame_order="shuffled")
    else:
        path = write_legacy_converted(files, tmp_path / "mr.dcm")
    volume = load_series(tmp_path)  # a folder, as the node and `dicom-node segment` give it
    assert np.array_equal(volume.array, single.array)
    assert volume.geometry.same_grid(single.geometry)
    assert not np.allclose(volume.geometry.direction, np.eye(3)[::-1])  # really oblique
    assert volume.modality == "MR"
    assert volume.sop_class_uid == (
        EnhancedMRImageStorage if kind == "enhanced" else LegacyConvertedEnhancedMRImageStorage
    )
    assert path.exists()


def test_several_enhanced_instances_of_one_series_make_one_volume(ct, tmp_path):
    p, single = ct
    files = image_files(p)
    series_uid = pydicom.uid.generate_uid()
    # phantom files are named by slice, and the phantom's slices are stacked along -z
    halves = [files[: len(files) // 2], files[len(files) // 2 :]]
    paths = [write_enhanced(h, tmp_path / f"part{n}.dcm", series_instance_uid=series_uid) for n, h in enumerate(halves)]
    volume = load_series(paths)
    assert np.array_equal(volume.array, single.array)
    assert volume.geometry.same_grid(single.geometry)
    uids = [str(pydicom.dcmread(x, stop_before_pixels=True).SOPInstanceUID) for x in paths]
    assert set(volume.sop_instance_uids) == set(uids)
    assert len(set(volume.image_references())) == single.shape[0]


def test_refusals_say_why(ct, tmp_path):
    p, _ = ct
    files = image_files(p)
    n = len(files)
    # two stacks in one instance
    two = write_enhanced(files, tmp_path / "stacks" / "two.dcm", stack_ids=["1"] * (n // 2) + ["2"] * (n - n // 2))
    with pytest.raises(VolumeError, match=r"holds 2 stacks of frames \(StackID 1: 28 frames, StackID 2: 28 frames\)"):
        load_series(two)
    # single-frame and multi-frame images in one series
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    mixed = write_enhanced(files[:10], tmp_path / "mixed" / "enh.dcm", series_instance_uid=series)
    with pytest.raises(VolumeError, match=r"mixes 56 single-frame images and 1 multi-frame instance"):
        load_series([*files, mixed])
    # a frame without its position
    ds = pydicom.dcmread(write_enhanced(files, tmp_path / "nopos" / "x.dcm", frame_order="sorted"))
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    ds.save_as(tmp_path / "nopos" / "x.dcm")
    with pytest.raises(VolumeError, match=r"ImagePositionPatient missing in 1 frame\(s\) \(x.dcm frame 4\)"):
        load_series(tmp_path / "nopos" / "x.dcm")
    # NumberOfFrames that does not match the per-frame items
    ds = pydicom.dcmread(tmp_path / "mixed" / "enh.dcm")
    ds.NumberOfFrames = 12
    ds.save_as(tmp_path / "mixed" / "enh.dcm")
    with pytest.raises(VolumeError, match=r"NumberOfFrames 12 but 10 items in PerFrameFunctionalGroupsSequence"):
        load_series(tmp_path / "mixed" / "enh.dcm")
    # two frames at one position (an echo or time point repeated): the single-frame check
    dup = write_enhanced([*files[:5], files[2]], tmp_path / "dup" / "d.dcm")
    with pytest.raises(VolumeError, match=r"duplicate slice positions .*\(d.dcm frame \d and d.dcm frame \d\)"):
        load_series(dup)


# -- prompts and results --------------------------------------------------------------------
@pytest.mark.parametrize("frames", [True, False], ids=["frame-references", "instance-references"])
def test_prompts_on_frames_give_the_same_targets(ct, tmp_path, frames):
    p, single = ct
    enhanced = load_series(write_enhanced(image_files(p), tmp_path / "img" / "enh.dcm"))
    prompt = _enhanced_prompt(enhanced, _box_mask(p, single), tmp_path / "prompt.dcm", frames=frames)
    ds = pydicom.dcmread(prompt)
    refs = _contour_image_items(ds)
    assert all(("ReferencedFrameNumber" in r) == frames for r in refs)
    expected = extract_prompts(read_rtstruct(p["prompt"]), single)
    got = extract_prompts(read_rtstruct(prompt), enhanced)
    assert [t.boxes for t in got] == [t.boxes for t in expected]
    assert [t.output_name for t in got] == [t.output_name for t in expected]


def test_segment_case_writes_frame_references_that_dciodvfy_accepts(ct, tmp_path):
    from dicom_node.pipeline import segment_case

    p, single = ct
    enhanced_path = write_enhanced(image_files(p), tmp_path / "img" / "enh.dcm", frame_order="shuffled")
    enhanced = load_series(enhanced_path)
    prompt = _enhanced_prompt(enhanced, _box_mask(p, single), tmp_path / "prompt.dcm")
    case = segment_case(tmp_path / "img", prompt, engine=EngineSpec("classic"))
    result = tmp_path / "result.dcm"
    case.dataset.save_as(result, enforce_file_format=True)
    assert dciodvfy_errors(result) == []
    _check_frame_references(pydicom.dcmread(result), enhanced, enhanced_path)
    # the contours lie on the frames' planes: rasterised on the single-frame grid they
    # give the GTV the classic engine finds on the single-frame series itself
    single_case = segment_case(p["images"], p["prompt"], engine=EngineSpec("classic"))
    (roi,) = read_rtstruct(result).rois
    assert np.array_equal(rasterize_roi(roi, single.geometry), single_case.targets[0].result.mask)


def _check_frame_references(ds, volume, enhanced_path: Path) -> None:
    """Every Contour Image Sequence item names the enhanced instance and one of its frames;
    the series lists every frame once; each contour names the frame whose plane it lies on."""
    header = pydicom.dcmread(enhanced_path, stop_before_pixels=True)
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == header.SeriesInstanceUID
    listed = [(r.ReferencedSOPInstanceUID, int(r.ReferencedFrameNumber)) for r in series.ContourImageSequence]
    assert sorted(listed) == [(header.SOPInstanceUID, f) for f in range(1, int(header.NumberOfFrames) + 1)]
    assert {r.ReferencedSOPClassUID for r in series.ContourImageSequence} == {header.SOPClassUID}
    contours = [c for rc in ds.ROIContourSequence for c in rc.ContourSequence]
    assert contours
    normal = volume.geometry.normal
    for c in contours:
        (ref,) = c.ContourImageSequence
        assert ref.ReferencedSOPInstanceUID == header.SOPInstanceUID
        frame = int(ref.ReferencedFrameNumber)
        position = header.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
        points = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
        assert np.allclose(points @ normal, np.array([float(v) for v in position]) @ normal, atol=1e-3)


# -- through a running node -----------------------------------------------------------------
@pytest.mark.network
def test_node_receives_an_enhanced_ct_and_delivers_frame_references(ct, tmp_path):
    p, single = ct
    enhanced_path = write_enhanced(image_files(p), tmp_path / "send" / "enh.dcm", frame_order="shuffled")
    enhanced = load_series(enhanced_path)
    prompt = _enhanced_prompt(enhanced, _box_mask(p, single), tmp_path / "send" / "prompt.dcm")
    tps = StoreSCP(tmp_path / "tps").start()
    node = None
    try:
        node = NodeProcess(write_config(tmp_path / "node", destinations={"tps": tps.destination()})).start()
        out = storescu([enhanced_path, prompt], node.port)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.count("(Success)") + out.stderr.count("(Success)") == 2
        (result,) = delivered(node, tps)
        assert dciodvfy_errors(result) == []
        _check_frame_references(pydicom.dcmread(result), enhanced, enhanced_path)
        (roi,) = read_rtstruct(result).rois
        truth = rasterize_roi(read_rtstruct(p["truth"]).roi("GTV"), single.geometry)
        from inference.metrics import dice

        assert dice(rasterize_roi(roi, single.geometry), truth) >= 0.9
        assert node.jobs()[0]["state"] == "done"
    finally:
        if node is not None:
            node.stop()
        tps.stop()


def test_the_node_negotiates_the_enhanced_classes_by_default():
    from dicom_node.config import Network

    assert set(Network().sop_classes) >= {
        EnhancedCTImageStorage,
        EnhancedMRImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
    }
    assert Network(sop_classes=["EnhancedCT", "enhanced-mr", "Legacy_CT", "LEGACY MR"]).sop_classes == [
        EnhancedCTImageStorage,
        EnhancedMRImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
    ]


def test_seg_on_an_enhanced_instance_references_its_frames(ct, tmp_path):
    from rtstruct.seg import write_seg

    p, single = ct
    path = write_enhanced(image_files(p), tmp_path / "enh.dcm", frame_order="shuffled")
    volume = load_series(path)
    mask = rasterize_roi(read_rtstruct(p["truth"]).roi("GTV"), volume.geometry)
    out = tmp_path / "seg.dcm"
    write_seg(volume, [path], [RoiMask("GTV_AI", mask)]).save_as(out, enforce_file_format=True)
    assert dciodvfy_errors(out) == []
    seg = pydicom.dcmread(out)
    frames = seg.pixel_array.reshape(-1, *volume.shape[1:]).astype(bool)
    assert len(frames) == int(mask.any(axis=(1, 2)).sum())
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        k = int(round(volume.geometry.patient_to_index(position[None])[0, 0]))
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert int(source.ReferencedFrameNumber) == volume.frame_numbers[k]  # the frame of that slice
        assert np.array_equal(frame, mask[k])


def test_qa_pictures_reference_the_frame_they_show(ct, tmp_path):
    from rtstruct.secondary_capture import Picture, write_secondary_captures

    p, _ = ct
    volume = load_series(write_enhanced(image_files(p), tmp_path / "enh.dcm"))
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    (sc,) = write_secondary_captures(volume, [Picture(rgb, 30, "GTV_AI: slice 31")])
    (source,) = sc.SourceImageSequence
    assert (source.ReferencedSOPInstanceUID, int(source.ReferencedFrameNumber)) == volume.image_reference(30)
    assert volume.frame_numbers[30] == volume.shape[0] - 30  # stored reversed: not the slice index
    out = tmp_path / "sc.dcm"
    sc.save_as(out, enforce_file_format=True)
    assert dciodvfy_errors(out) == []


def test_compressed_enhanced_ct_is_decoded_frame_by_frame(ct, tmp_path):
    from pydicom.uid import RLELossless

    p, single = ct
    path = write_enhanced(image_files(p), tmp_path / "enh.dcm", frame_order="shuffled")
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)  # pydicom's own RLE encoder: one fragment per frame
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    volume = load_series(path)
    assert np.array_equal(volume.array, single.array)


def test_the_multiframe_benchmark_runs():
    import subprocess
    import sys

    from helpers import REPO

    proc = subprocess.run(
        [sys.executable, "benchmarks/multiframe_load.py", "--slices", "24", "--size", "384", "--reps", "1"],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "series: 24 slices of 384x384" in proc.stdout
    assert "ratio multi-frame/single-frame: time " in proc.stdout
