"""files_under: the folders users point the tools at may be assembled from symlinks."""

from __future__ import annotations

import os

from helpers import shared_path
from test_convert import read_csv

from dicom_node.cli import main
from inference.files import files_under


def test_linked_folders_are_followed_once_and_cycles_end(tmp_path):
    real = tmp_path / "archive" / "lung"
    (real / "sub").mkdir(parents=True)
    (real / "a.dcm").write_bytes(b"a")
    (real / "sub" / "b.dcm").write_bytes(b"b")
    (real / ".hidden").write_bytes(b"h")
    (real / "sub" / "up").symlink_to(real)  # a cycle
    root = tmp_path / "study"
    root.mkdir()
    (root / "lung").symlink_to(real)
    (root / "lung-again").symlink_to(real)  # the same folder twice
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    (root / "own.dcm").write_bytes(b"c")
    found = files_under(root)
    names = sorted(p.name for p in found)
    assert names == [".hidden", "a.dcm", "b.dcm", "own.dcm"]
    assert all(str(p).startswith(str(root)) for p in found)  # as reached, not resolved
    assert sorted(p.name for p in files_under(root, skip_hidden=True)) == ["a.dcm", "b.dcm", "own.dcm"]
    assert files_under(tmp_path / "absent") == []


def test_study_and_convert_read_a_linked_dataset(tmp_path):
    data = shared_path("ge-phantom-ct")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(data, src / "ge")
    out = tmp_path / "npz"
    assert main(["convert", str(src), str(out), "--no-progress"]) == 0
    rows = read_csv(out / "convert_report.csv")
    assert any(r["status"] == "converted" and r["dataset"] == "ge" for r in rows), rows
    assert not any("no DICOM files found" in r.get("reason", "") for r in rows)
