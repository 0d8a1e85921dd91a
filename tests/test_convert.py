"""dicom-node convert: DICOM cases -> NPZ, checked against the DICOM geometry and the ROIs.

``build_cohort`` (also used by tests/test_study.py) writes a small cohort: phantoms plus
every kind of bad input the tools must survive.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import shared_path
from pydicom.uid import generate_uid

from dicom_node.cli import main
from dicom_node.phantom import make_phantom, write_phantom
from inference.geometry import Geometry
from inference.metrics import dice
from rtstruct import rasterize_roi, read_rtstruct

SMALL = (24, 96, 96)  # slices, rows, columns: small and fast, the tumour still fits


def build_cohort(root: Path, good: list[tuple[str, int]], bad: bool = True) -> dict[str, Path]:
    """``root/phantoms/<modality><seed>/`` for each good phantom and, with ``bad``,
    ``root/bad/{no_images, other_for, corrupt}`` and ``root/empty/`` (no DICOM at all)."""
    paths: dict[str, Path] = {}
    for modality, seed in good:
        name = f"{modality.lower()}{seed}"
        write_phantom(root / "phantoms" / name, modality, seed, shape=SMALL)
        paths[name] = root / "phantoms" / name
    if not bad:
        return paths
    # an RTSTRUCT whose images are not there
    d = root / "bad" / "no_images"
    write_phantom(d, "CT", 11, shape=SMALL)
    shutil.rmtree(d / "images")
    (d / "prompt.dcm").unlink()
    paths["no_images"] = d
    # a ground truth on another frame of reference (it still names the series)
    d = root / "bad" / "other_for"
    write_phantom(d, "CT", 12, shape=SMALL)
    (d / "prompt.dcm").unlink()
    ds = pydicom.dcmread(d / "truth.dcm")
    other = generate_uid()
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = other
    for item in ds.ReferencedFrameOfReferenceSequence:
        item.FrameOfReferenceUID = other
    for item in ds.StructureSetROISequence:
        item.ReferencedFrameOfReferenceUID = other
    ds.save_as(d / "truth.dcm")
    paths["other_for"] = d
    # a truncated image (its header is fine, its pixel data cut short) and a junk file
    d = root / "bad" / "corrupt"
    write_phantom(d, "CT", 13, shape=SMALL)
    victim = sorted((d / "images").iterdir())[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 3000])
    (d / "images" / "junk.dcm").write_bytes(b"this is not DICOM at all\n" * 20)
    paths["corrupt"] = d
    paths["truncated_file"] = victim
    # a dataset folder with no DICOM in it
    (root / "empty").mkdir(parents=True)
    (root / "empty" / "notes.txt").write_text("nothing here\n")
    return paths


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("cohort")
    return root, build_cohort(root, [("CT", 1), ("MR", 2)])


def _headers_geometry(image_dir: Path) -> tuple[Geometry, list[pydicom.Dataset]]:
    """The geometry computed here, independently of inference.volume, from the headers."""
    headers = [pydicom.dcmread(p) for p in sorted(image_dir.iterdir()) if p.suffix == ".dcm"]
    headers = [h for h in headers if h.Modality in ("CT", "MR")]
    iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    headers.sort(key=lambda h: float(np.dot(normal, np.array(h.ImagePositionPatient, dtype=float))))
    pos = np.array([h.ImagePositionPatient for h in headers], dtype=float)
    dz = float(np.median(np.diff(pos @ normal)))
    ps = [float(v) for v in headers[0].PixelSpacing]
    geometry = Geometry(
        shape=(len(headers), int(headers[0].Rows), int(headers[0].Columns)),
        spacing=(dz, ps[0], ps[1]),
        origin=pos[0],
        direction=np.stack([normal, iop[3:], iop[:3]]),
    )
    return geometry, headers


def _check_npz_against_dicom(npz: dict, image_dir: Path, rtstruct_path: Path, label_names: list[str]):
    geometry, headers = _headers_geometry(image_dir)
    assert npz["imgs"].shape == geometry.shape
    assert npz["gts"].shape == geometry.shape
    np.testing.assert_allclose(npz["spacing"], geometry.spacing, atol=1e-4)
    np.testing.assert_allclose(npz["origin"], np.array(headers[0].ImagePositionPatient, float), atol=1e-4)
    np.testing.assert_allclose(npz["direction"], geometry.direction, atol=1e-6)
    # intensities: stored value * slope + intercept, first and last slice
    for k in (0, geometry.shape[0] - 1):
        h = pydicom.dcmread(headers[k].filename)
        expected = h.pixel_array * float(h.get("RescaleSlope", 1)) + float(h.get("RescaleIntercept", 0))
        np.testing.assert_array_equal(npz["imgs"][k].astype(float), expected)
    assert list(npz["label_names"]) == label_names
    # each label: the voxel count of the ROI rasterised on the headers' geometry
    ss = read_rtstruct(rtstruct_path)
    whole = None
    if "roi_masks" in npz:
        whole = np.unpackbits(npz["roi_masks"], axis=-1, count=geometry.shape[2]).astype(bool)
    for n, name in enumerate(label_names, start=1):
        mask = rasterize_roi(ss.roi(name), geometry)
        assert mask.sum() > 0
        if whole is not None:
            assert int(whole[n - 1].sum()) == int(mask.sum())
            np.testing.assert_array_equal(whole[n - 1], mask)
        else:
            assert int((npz["gts"] == n).sum()) == int(mask.sum())
            np.testing.assert_array_equal(npz["gts"] == n, mask)


def test_convert_phantoms_and_bad_input(cohort, tmp_path, capsys):
    root, paths = cohort
    out = tmp_path / "npz"
    rc = main(["convert", str(root), str(out), "--jobs", "2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = read_csv(out / "convert_report.csv")
    converted = [r for r in rows if r["status"] == "converted"]
    assert sorted(r["case"] for r in converted) == sorted(
        [f for f in (p.stem for p in (out / "phantoms").glob("*.npz"))]
    )
    assert len(converted) == 2 and {r["modality"] for r in converted} == {"CT", "MR"}
    assert all(r["dataset"] == "phantoms" and r["labels"] == "GTV" for r in converted)

    reasons = {r["source"]: r["reason"] for r in rows if r["status"] == "skipped"}
    by_kind = {
        "no_images": [v for k, v in reasons.items() if k.startswith("bad/no_images")],
        "other_for": [v for k, v in reasons.items() if k.startswith("bad/other_for")],
        "corrupt": [v for k, v in reasons.items() if k.startswith("bad/corrupt")],
        "empty": [v for k, v in reasons.items() if k == "empty"],
    }
    assert any("no image series for this RTSTRUCT" in r for r in by_kind["no_images"]), reasons
    assert any("frame of reference" in r and "referenced series" in r for r in by_kind["other_for"]), reasons
    assert any("has no RTSTRUCT on it" in r for r in by_kind["other_for"]), reasons
    assert any("junk.dcm" in k and "not a readable DICOM" in v for k, v in reasons.items()), reasons
    assert any(paths["truncated_file"].name in r for r in by_kind["corrupt"]), reasons  # the truncated slice
    assert by_kind["empty"] == ["no DICOM files found in this folder"]
    assert "skipped" in printed and "frame of reference" in printed

    # NPZ content: the phantom's voxels and geometry, the GTV as rasterised from truth.dcm
    for name, modality, seed in (("ct1", "CT", 1), ("mr2", "MR", 2)):
        (npz_path,) = [Path(r["file"]) for r in converted if r["source"] == f"phantoms/{name}/images"]
        npz = load_npz(npz_path)
        phantom = make_phantom(modality, seed, shape=SMALL)
        np.testing.assert_array_equal(npz["imgs"], phantom.volume.array)
        assert npz["gts"].dtype == np.uint8 and set(np.unique(npz["gts"])) == {0, 1}
        assert str(npz["modality"]) == modality
        assert "roi_masks" not in npz
        _check_npz_against_dicom(npz, paths[name] / "images", paths[name] / "truth.dcm", ["GTV"])
        assert dice(npz["gts"] == 1, phantom.truth) > 0.95
        # identifiers kept without --pseudonymize
        first = pydicom.dcmread(sorted((paths[name] / "images").iterdir())[0])
        assert str(npz["series_instance_uid"]) == first.SeriesInstanceUID
        assert str(npz["frame_of_reference_uid"]) == first.FrameOfReferenceUID
        assert npz_path.name.startswith(f"STARDUST-{modality}-{seed}_{modality}_")


def test_convert_pseudonymized_is_deterministic_and_carries_no_identifier(cohort, tmp_path):
    root, paths = cohort
    src = root / "phantoms"
    runs = []
    for jobs in (1, 2):
        out = tmp_path / f"run{jobs}"
        assert main(["convert", str(src), str(out), "--pseudonymize", "--jobs", str(jobs), "--no-progress"]) == 0
        runs.append(out)
    a, b = runs
    assert sorted(p.name for p in a.glob("*.npz")) == ["case_0001.npz", "case_0002.npz"]
    assert not [p for p in a.rglob("*.npz") if p.parent != a]  # flat: no dataset folder names
    mapping = read_csv(a / "pseudonym_map.csv")
    assert read_csv(b / "pseudonym_map.csv") == mapping
    assert [m["case"] for m in mapping] == ["case_0001", "case_0002"]
    # one pseudonym per patient
    assert len({m["patient"] for m in mapping}) == len({m["PatientID"] for m in mapping})
    identifiers = set()
    for m in mapping:
        header = pydicom.dcmread(sorted((src / m["source"]).iterdir())[0])
        assert m["PatientID"] == header.PatientID
        assert m["SeriesInstanceUID"] == header.SeriesInstanceUID
        assert m["StudyInstanceUID"] == header.StudyInstanceUID
        identifiers |= {
            header.PatientID,
            header.SeriesInstanceUID,
            header.StudyInstanceUID,
            header.FrameOfReferenceUID,
            header.SOPInstanceUID,
        }
    for name in ("case_0001.npz", "case_0002.npz"):
        za, zb = load_npz(a / name), load_npz(b / name)
        assert set(za) == {"imgs", "gts", "label_names", "spacing", "origin", "direction", "modality", "patient"}
        assert set(za) == set(zb)
        # the patient is a pseudonym, the same one the map gives (finetune splits by it)
        (m,) = [m for m in mapping if f"{m['case']}.npz" == name]
        assert str(za["patient"]) == m["patient"] and m["patient"].startswith("patient_")
        for key in za:
            np.testing.assert_array_equal(za[key], zb[key])
            if za[key].dtype.kind == "U":
                assert not any(ident in str(v) for v in za[key].ravel() for ident in identifiers)
        assert not any(ident.encode() in (a / name).read_bytes() for ident in identifiers if len(ident) > 6)


def test_convert_bad_arguments(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--roi", "(["]) == 2
    assert "regular expression" in capsys.readouterr().err
    # nothing convertible: exit 1 and a report that says so
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "no case could be converted" in capsys.readouterr().err


def test_convert_lung1_geometry_and_gtv(tmp_path):
    src = shared_path("lung1-001-ct")
    out = tmp_path / "npz"
    assert main(["convert", str(src), str(out), "--roi", "^GTV", "--no-progress"]) == 0
    (row,) = [r for r in read_csv(out / "convert_report.csv") if r["status"] == "converted"]
    assert row["dataset"] == "lung1-001-ct" and row["labels"] == "GTV-1"
    npz = load_npz(Path(row["file"]))
    assert npz["imgs"].shape == (134, 512, 512)
    np.testing.assert_allclose(npz["spacing"], (3.0, 0.9765625, 0.9765625), atol=1e-6)
    (rt,) = list((src / "RTSTRUCT").iterdir())
    _check_npz_against_dicom(npz, src / "CT", rt, ["GTV-1"])
    assert npz["imgs"].min() <= -1000 and npz["imgs"].max() > 1000  # Hounsfield units, not raw values


def test_convert_oblique_mr_with_overlapping_rois(tmp_path):
    src = shared_path("sts-001-mr", "MR_T1")
    out = tmp_path / "npz"
    assert main(["convert", str(src), str(out), "--roi", "GTV", "--no-progress"]) == 0
    (row,) = [r for r in read_csv(out / "convert_report.csv") if r["status"] == "converted"]
    assert row["labels"] == "GTV_Mass;GTV_Edema"
    assert "overlaps" in row["warnings"]  # the oedema surrounds the mass
    npz = load_npz(Path(row["file"]))
    assert not np.allclose(npz["direction"], np.eye(3)[::-1], atol=1e-3)  # oblique, kept as is
    (rt,) = list((src / "RTSTRUCT").iterdir())
    _check_npz_against_dicom(npz, src / "IMAGES", rt, ["GTV_Mass", "GTV_Edema"])
    # in the label map the smaller ROI (the mass) wins the shared voxels and stays whole
    geometry, _ = _headers_geometry(src / "IMAGES")
    mass = rasterize_roi(read_rtstruct(rt).roi("GTV_Mass"), geometry)
    np.testing.assert_array_equal(npz["gts"] == 1, mass)
