"""The phantom generator: realistic, seeded, valid DICOM, and its RTSTRUCTs mean what they say."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from helpers import dciodvfy_report, shared_path
from scipy import ndimage

from dicom_node import cli
from dicom_node.phantom import (
    CT_NOISE_HU,
    CT_VALUES,
    MR_VALUES,
    PATIENT_NAME,
    make_phantom,
    save_phantom,
    write_image_series,
    write_phantom,
)
from inference.metrics import dice
from inference.volume import Volume
from rtstruct.series import load_series


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """The default CT phantom, written with its RTSTRUCTs."""
    phantom = make_phantom("CT", seed=1)
    paths = save_phantom(phantom, tmp_path_factory.mktemp("ct"))
    return phantom, paths


@pytest.fixture(scope="module")
def mr_oblique(tmp_path_factory):
    """An oblique MR phantom (smaller grid), written with its RTSTRUCTs."""
    phantom = make_phantom("MR", seed=2, shape=(48, 192, 192), oblique=True)
    paths = save_phantom(phantom, tmp_path_factory.mktemp("mr"))
    return phantom, paths


def assert_same_volume(loaded: Volume, original: Volume) -> None:
    assert loaded.geometry.same_grid(original.geometry, atol=1e-6), (loaded.geometry, original.geometry)
    np.testing.assert_array_equal(loaded.array, original.array)
    assert loaded.sop_instance_uids == original.sop_instance_uids
    assert loaded.series_instance_uid == original.series_instance_uid
    assert loaded.study_instance_uid == original.study_instance_uid
    assert loaded.frame_of_reference_uid == original.frame_of_reference_uid
    assert loaded.sop_class_uid == original.sop_class_uid and loaded.modality == original.modality
    for keyword, value in original.attributes.items():
        assert loaded.attributes.get(keyword, "") == value, keyword


# -- the written series ---------------------------------------------------------------------
def test_ct_series_loads_back_to_the_same_volume(ct):
    phantom, paths = ct
    files = sorted(paths["images"].iterdir())
    assert len(files) == 56
    assert_same_volume(load_series(paths["images"]), phantom.volume)
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert str(ds.PatientName) == PATIENT_NAME
    assert float(ds.RescaleIntercept) == -1024 and ds.PixelRepresentation == 0


def test_oblique_mr_series_loads_back_to_the_same_volume(mr_oblique):
    phantom, paths = mr_oblique
    volume = load_series(paths["images"])
    assert_same_volume(volume, phantom.volume)
    assert volume.sop_class_uid == pydicom.uid.MRImageStorage
    normal = volume.geometry.normal
    assert abs(normal[2]) < 0.99 and abs(normal[0]) > 0.05 and abs(normal[1]) > 0.05  # really oblique


def test_write_image_series_round_trips_real_oblique_mr(tmp_path):
    original = load_series(shared_path("sts-001-mr", "MR_T1", "IMAGES"))
    write_image_series(original, tmp_path / "copy", prefix="T1_")
    assert_same_volume(load_series(tmp_path / "copy"), original)


def test_write_image_series_quantises_real_values(tmp_path):
    base = make_phantom("CT", 0, shape=(24, 48, 48)).volume
    values = base.array.astype(np.float32) * 0.37 + 0.1
    volume = Volume(
        values,
        base.geometry,
        base.sop_instance_uids,
        "CT",
        base.series_instance_uid,
        base.study_instance_uid,
        base.frame_of_reference_uid,
        base.sop_class_uid,
        base.attributes,
    )
    write_image_series(volume, tmp_path / "s")
    loaded = load_series(tmp_path / "s")
    step = (values.max() - values.min()) / 65535
    assert loaded.array.dtype == np.float32
    assert np.abs(loaded.array - values).max() <= step  # 16-bit quantisation, nothing worse


@pytest.mark.parametrize("which", ["ct", "mr_oblique"])
def test_dciodvfy_reports_no_errors(which, request):
    phantom, paths = request.getfixturevalue(which)
    files = sorted(paths["images"].iterdir())
    for path in (files[0], files[len(files) // 2], paths["prompt"], paths["truth"]):
        errors, warnings = dciodvfy_report(path)
        assert errors == [], (path.name, errors)
        assert warnings == [], (path.name, warnings)


# -- truth and prompt -----------------------------------------------------------------------
@pytest.mark.parametrize("which", ["ct", "mr_oblique"])
def test_truth_rtstruct_rasterises_to_the_truth(which, request):
    from rtstruct.rasterize import rasterize_roi
    from rtstruct.reader import read_rtstruct

    phantom, paths = request.getfixturevalue(which)
    structure_set = read_rtstruct(paths["truth"])
    assert structure_set.roi_names == ["GTV"]
    roi = structure_set.roi("GTV")
    assert roi.interpreted_type == "GTV"
    volume = load_series(paths["images"])
    assert dice(rasterize_roi(roi, volume.geometry), phantom.truth) >= 0.95


@pytest.mark.parametrize("which", ["ct", "mr_oblique"])
def test_prompt_box_comes_back_where_it_was_put_and_contains_the_tumour(which, request):
    from rtstruct.prompts import extract_prompts
    from rtstruct.reader import read_rtstruct

    phantom, paths = request.getfixturevalue(which)
    volume = load_series(paths["images"])
    targets = extract_prompts(read_rtstruct(paths["prompt"]), volume)
    assert len(targets) == 1 and targets[0].target == "" and targets[0].source_rois == ["BOX_"]
    (box,) = targets[0].boxes
    expected = phantom.box
    assert box.slice_index == expected.slice_index
    np.testing.assert_allclose(
        [box.i0, box.j0, box.i1, box.j1], [expected.i0, expected.j0, expected.i1, expected.j1], atol=1e-3
    )
    # the box is on the largest tumour slice and holds all of it, with a margin of >= 4 mm
    k = box.slice_index
    areas = phantom.truth.sum(axis=(1, 2))
    assert areas[k] == areas.max()
    rows, cols = np.nonzero(phantom.truth[k])
    dy, dx = volume.spacing[1:]
    eps = 1e-3
    assert box.i0 + 0.5 <= rows.min() - 4.0 / dy + eps and rows.max() + 4.0 / dy - eps <= box.i1 - 0.5
    assert box.j0 + 0.5 <= cols.min() - 4.0 / dx + eps and cols.max() + 4.0 / dx - eps <= box.j1 - 0.5
    # ... and is not much larger than the tumour (a tight prompt, as a planner draws it)
    assert (box.i1 - box.i0) * dy <= (rows.max() - rows.min() + 1) * dy + 2 * 4.0 + 2 * dy


# -- realism --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_tumour_is_one_lobulated_object_of_known_extent(seed):
    phantom = make_phantom("CT", seed)
    truth = phantom.truth
    _, n = ndimage.label(truth)
    assert n == 1
    extent = phantom.info["tumour_extent_mm"]
    assert 20.0 <= extent <= 40.0
    first, last = phantom.info["tumour_slices"]
    assert 8 <= last - first + 1 <= 16
    assert phantom.info["tumour_volume_ml"] == pytest.approx(
        truth.sum() * phantom.volume.geometry.voxel_volume_mm3 / 1000
    )
    # irregular: it differs from the ellipsoid with its own second moments (a voxelised
    # ellipsoid on this grid matches that ellipsoid with Dice > 0.99)
    assert dice(truth, moment_ellipsoid(truth, phantom.volume.spacing)) < 0.975
    assert not truth[:, 0].any() and not truth[:, :, 0].any()  # well inside the image


def moment_ellipsoid(mask: np.ndarray, spacing) -> np.ndarray:
    """The solid ellipsoid with the same centroid and second moments as ``mask``."""
    sp = np.asarray(spacing)
    points = np.argwhere(mask) * sp
    mean = points.mean(axis=0)
    inv = np.linalg.inv(np.cov((points - mean).T))
    grid = np.argwhere(np.ones(mask.shape, dtype=bool)) * sp - mean
    # a uniform solid ellipsoid has covariance diag(a^2)/5: its surface is at distance^2 = 5
    return (np.einsum("ij,jk,ik->i", grid, inv, grid) <= 5.0).reshape(mask.shape)


def test_moment_ellipsoid_of_an_ellipsoid_is_itself():
    shape, sp = (20, 40, 40), np.array([2.5, 1.5, 1.5])
    grid = np.argwhere(np.ones(shape, dtype=bool)) * sp - (np.array(shape) - 1) / 2 * sp
    ellipsoid = ((grid / np.array([15.0, 14.0, 12.0])) ** 2).sum(axis=1).reshape(shape) <= 1
    assert dice(ellipsoid, moment_ellipsoid(ellipsoid, sp)) > 0.99


def test_ct_intensities_are_realistic():
    phantom = make_phantom("CT", 0)
    v = phantom.volume.array.astype(np.float64)
    truth = phantom.truth
    k = phantom.box.slice_index
    assert phantom.volume.array.dtype == np.int16
    corner = v[:, :20, :20]
    assert abs(corner.mean() - CT_VALUES["air"]) < 10
    # tumour core (eroded, away from partial volume) is near its nominal HU
    core = ndimage.binary_erosion(truth, iterations=2)
    assert abs(v[core].mean() - CT_VALUES["tumour"]) < 15
    # the tumour sits in lung: much of its 3 mm shell is lung, some may touch soft tissue
    shell = ndimage.binary_dilation(truth[k], iterations=3) & ~ndimage.binary_dilation(truth[k], iterations=1)
    around = v[k][shell]
    assert np.mean(around < -500) > 0.4
    # tissue noise: the sd in flat air (same noise as everywhere, after the point spread)
    assert 3 < corner.std() < 2 * CT_NOISE_HU
    # the lungs lie inside the body, enclosed by the chest wall
    body = ndimage.binary_fill_holes(v[k] > -500)
    lung = v[k][body & (v[k] < -700)]
    assert lung.size > 0.3 * body.sum() and abs(lung.mean() - CT_VALUES["lung"]) < 20
    # the tumour is distinguishable from soft tissue (the mediastinum/heart at the centre):
    # the means differ by more than 2.5 noise sd
    c = v.shape[1] // 2
    soft = v[:, c - 4 : c + 4, c - 4 : c + 4]
    assert 25 < soft.mean() < 55 and 0.5 * CT_NOISE_HU < soft.std() < 1.5 * CT_NOISE_HU
    assert v[core].mean() - soft.mean() > 2.5 * soft.std()
    assert v.max() > 500  # bone


def test_mr_intensities_are_realistic():
    phantom = make_phantom("MR", 0)
    v = phantom.volume.array.astype(np.float64)
    assert v.min() >= 0 and v.max() <= 4095
    core = ndimage.binary_erosion(phantom.truth, iterations=2)
    tumour = v[core].mean()
    assert MR_VALUES["muscle"] * 1.3 < tumour < MR_VALUES["fat"]
    assert v[:, :15, :15].mean() < 40  # air: Rician noise floor only


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_a_low_contrast_phantom_is_the_same_body_with_a_tumour_close_to_soft_tissue(modality):
    high = make_phantom(modality, 3, shape=(40, 128, 128))
    low = make_phantom(modality, 3, shape=(40, 128, 128), contrast="low")
    np.testing.assert_array_equal(low.truth, high.truth)
    assert low.box == high.box and low.info["contrast"] == "low"
    # outside the tumour and its blurred rim (the in-plane point spread reaches 3 pixels),
    # every voxel is the same
    rim = ndimage.binary_dilation(high.truth, structure=np.ones((1, 3, 3), bool), iterations=3)
    np.testing.assert_array_equal(low.volume.array[~rim], high.volume.array[~rim])
    # the tumour's core stands above muscle by less than a third of the default's contrast
    core = ndimage.binary_erosion(high.truth, iterations=2)
    muscle = (CT_VALUES if modality == "CT" else MR_VALUES)["muscle"]
    low_core = low.volume.array[core].astype(float).mean()
    high_core = high.volume.array[core].astype(float).mean()
    assert 0 < low_core - muscle < (high_core - muscle) / 3, (low_core, high_core, muscle)
    with pytest.raises(ValueError, match="contrast must be one of high, low"):
        make_phantom(modality, 3, contrast="medium")


def test_seeds_are_reproducible_and_differ():
    a, b, c = make_phantom("CT", 7), make_phantom("CT", 7), make_phantom("CT", 8)
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    np.testing.assert_array_equal(a.truth, b.truth)
    assert a.box == b.box
    assert a.volume.series_instance_uid != b.volume.series_instance_uid  # UIDs are always new
    assert not np.array_equal(a.truth, c.truth)
    assert np.mean(a.volume.array != c.volume.array) > 0.5


def test_shape_and_spacing_are_configurable():
    phantom = make_phantom("CT", 0, shape=(30, 96, 128), spacing=(3.0, 4.0, 3.0))
    assert phantom.volume.shape == (30, 96, 128)
    assert phantom.volume.spacing == (3.0, 4.0, 3.0)
    assert phantom.truth.shape == (30, 96, 128) and phantom.truth.any()
    with pytest.raises(ValueError, match="modality must be CT or MR"):
        make_phantom("PET")


# -- command line ---------------------------------------------------------------------------
def test_phantom_command_writes_images_prompt_and_truth(tmp_path, capsys):
    out = tmp_path / "ph"
    rc = cli.main(
        ["phantom", str(out), "--modality", "MR", "--seed", "4", "--slices", "40", "--size", "128", "--oblique"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "MR phantom, seed 4: 40 slices of 128x128" in text and "(oblique)" in text
    assert "low-contrast" not in text
    assert "prompt:" in text and "truth:" in text
    assert (out / "prompt.dcm").is_file() and (out / "truth.dcm").is_file()
    volume = load_series(out / "images")
    assert volume.shape == (40, 128, 128) and volume.modality == "MR"
    np.testing.assert_array_equal(volume.array, make_phantom("MR", 4, shape=(40, 128, 128), oblique=True).volume.array)


def test_phantom_command_writes_a_low_contrast_phantom(tmp_path, capsys):
    out = tmp_path / "low"
    assert cli.main(["phantom", str(out), "--seed", "2", "--slices", "40", "--size", "128", "--contrast", "low"]) == 0
    assert "CT phantom, seed 2: 40 slices of 128x128" in capsys.readouterr().out
    expected = make_phantom("CT", 2, shape=(40, 128, 128), contrast="low").volume.array
    np.testing.assert_array_equal(load_series(out / "images").array, expected)
    with pytest.raises(SystemExit) as refused:
        cli.main(["phantom", str(tmp_path / "x"), "--contrast", "none"])
    assert refused.value.code == 2 and "invalid choice: 'none'" in capsys.readouterr().err


def test_phantom_command_images_only_and_bad_arguments(tmp_path, capsys):
    assert cli.main(["phantom", str(tmp_path / "a"), "--images-only", "--slices", "40", "--size", "64"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["images"]
    capsys.readouterr()
    assert cli.main(["phantom", str(tmp_path / "b"), "--size", "4"]) == 2
    assert "--size at least 16" in capsys.readouterr().err
    # a grid too small to hold the tumour is refused with a message, not a traceback
    assert cli.main(["phantom", str(tmp_path / "c"), "--slices", "12"]) == 2
    assert "tumour does not fit in a 12x256x256 volume" in capsys.readouterr().err
    assert cli.main(["phantom", str(tmp_path / "d"), "--size", "64", "--fov", "100"]) == 2
    assert "tumour does not fit" in capsys.readouterr().err


def test_write_phantom_returns_the_paths_and_replaces_an_earlier_phantom(tmp_path):
    paths = write_phantom(tmp_path, "CT", 5, shape=(40, 96, 96))
    assert set(paths) == {"images", "prompt", "truth"}
    assert len(list(paths["images"].iterdir())) == 40
    (paths["images"] / "notes.txt").write_text("mine")
    again = write_phantom(tmp_path, "MR", 6, shape=(36, 96, 96))  # fewer slices, other modality
    assert load_series(again["images"]).shape == (36, 96, 96)  # no stale CT slices left
    assert (paths["images"] / "notes.txt").read_text() == "mine"
