"""The watch folder: files dropped into the import folder enter the store like C-STOREs."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from helpers import NodeProcess, StoreSCP, check_result, image_files, phantom, wait_for, write_config

from dicom_node.config import config_from_data
from dicom_node.db import Database
from dicom_node.store import Store
from dicom_node.watch import WatchFolder


@pytest.fixture(scope="module")
def small_ct() -> dict[str, Path]:
    return phantom(3, "CT", shape=(20, 96, 96), spacing=(2.5, 4.0, 4.0))


@pytest.fixture
def watched(tmp_path):
    cfg = config_from_data(
        {
            "access": {"calling_aets": ["X"]},
            "data_dir": str(tmp_path / "data"),
            "watch": {"enabled": True, "import_dir": str(tmp_path / "import"), "stable_seconds": 0.5},
        }
    )
    store = Store(cfg.store_dir, Database(cfg.db_path), fsync=True)
    watch = WatchFolder(cfg, store)
    watch.start()
    try:
        yield cfg, store, watch
    finally:
        watch.stop()


def count(store: Store) -> int:
    return store.db.one("SELECT count(*) AS n FROM instances")["n"]


def test_a_case_copied_in_subfolders_is_imported_and_removed(watched, small_ct):
    cfg, store, watch = watched
    target = cfg.watch.import_dir / "patient1" / "ct"
    shutil.copytree(small_ct["images"], target)
    shutil.copy(small_ct["prompt"], cfg.watch.import_dir / "patient1" / "prompt.dcm")
    wait_for(lambda: count(store) == 21, 60, what="21 imported instances")
    rows = store.db.query("SELECT source, calling_aet, sop_instance_uid, path FROM instances")
    assert {r["source"] for r in rows} == {"watch"} and {r["calling_aet"] for r in rows} == {"WATCHFOLDER"}
    for f in image_files(small_ct)[:3]:
        ds = pydicom.dcmread(f)
        stored = store.path_of(ds.SOPInstanceUID)
        assert stored.read_bytes()[-2000:] == f.read_bytes()[-2000:]
    wait_for(lambda: not any(cfg.watch.import_dir.rglob("*")), 20, what="the import folder to empty")


def test_non_dicom_is_ignored_with_a_log_line(watched, small_ct, caplog):
    cfg, store, watch = watched
    caplog.set_level(logging.DEBUG, logger="dicom_node.watch")
    (cfg.watch.import_dir / "README.txt").write_text("scanned requisition, not DICOM")
    good = cfg.watch.import_dir / "one.dcm"
    shutil.copy(image_files(small_ct)[0], good)
    wait_for(lambda: count(store) == 1, 30, what="the DICOM file")

    def about_readme(name: str) -> int:  # log records ``name`` about README.txt
        return sum(name in r.getMessage() and "README.txt" in str(getattr(r, "fields", "")) for r in caplog.records)

    wait_for(lambda: about_readme("watch_ignored"), 30, what="the log line for README.txt")
    assert (cfg.watch.import_dir / "README.txt").exists()  # left alone
    n = sum("watch_ignored" in r.getMessage() for r in caplog.records)
    for scan in (1, 2):  # full rescans (every minute, or on a new folder) look at README.txt again
        passed = about_readme("watch_unchanged")
        watch.request_rescan()
        wait_for(
            lambda passed=passed: about_readme("watch_unchanged") > passed or about_readme("watch_ignored") > 1,
            30,
            what=f"rescan {scan} to pass README.txt",
        )
    assert sum("watch_ignored" in r.getMessage() for r in caplog.records) == n  # logged once, not every scan


def test_a_file_still_being_written_waits_until_stable(watched, small_ct, caplog):
    cfg, store, watch = watched
    caplog.set_level(logging.DEBUG, logger="dicom_node.watch")
    src = image_files(small_ct)[0].read_bytes()
    path = cfg.watch.import_dir / "slow.dcm"
    chunk = len(src) // 15 + 1
    with open(path, "wb") as f:
        for start in range(0, len(src), chunk):  # a slow copy: a piece every 0.1 s for 1.5 s
            f.write(src[start : start + chunk])
            f.flush()
            time.sleep(0.1)
            assert count(store) == 0
    wait_for(lambda: count(store) == 1, 30, what="the completed file")
    # it was never read while growing: no attempt on a partial file was logged
    assert not [r for r in caplog.records if "watch_ignored" in r.getMessage()]


def test_files_present_at_start_are_imported(tmp_path, small_ct):
    cfg = config_from_data(
        {
            "access": {"calling_aets": ["X"]},
            "data_dir": str(tmp_path / "data"),
            "watch": {"enabled": True, "import_dir": str(tmp_path / "import"), "stable_seconds": 0.2},
        }
    )
    shutil.copytree(small_ct["images"], cfg.watch.import_dir / "before")
    store = Store(cfg.store_dir, Database(cfg.db_path), fsync=False)
    watch = WatchFolder(cfg, store)
    watch.start()
    try:
        wait_for(lambda: count(store) == 20, 60, what="the files that were there before the start")
    finally:
        watch.stop()


@pytest.mark.network
def test_a_case_copied_into_the_import_folder_produces_the_result(tmp_path):
    p = phantom(1)
    tps = StoreSCP(tmp_path / "tps").start()
    export = tmp_path / "export"
    node = NodeProcess(
        write_config(
            tmp_path / "node",
            destinations={"tps": tps.destination()},
            watch={
                "enabled": True,
                "import_dir": str(tmp_path / "import"),
                "export_dir": str(export),
                "stable_seconds": 0.5,
            },
        )
    ).start()
    try:
        shutil.copytree(p["images"], tmp_path / "import" / "case1" / "images")
        shutil.copy(p["prompt"], tmp_path / "import" / "case1" / "prompt.dcm")
        # two deliveries: the rule's destination and the watch export folder
        wait_for(lambda: [s["state"] for s in node.sends()] == ["sent", "sent"], 180, 0.1, "both deliveries")
        (result,) = tps.files()
        check_result(result, p)
        (exported,) = list(export.iterdir())
        assert pydicom.dcmread(exported).SOPInstanceUID == pydicom.dcmread(result).SOPInstanceUID
        check_result(exported, p)
        case = node.cases()[0]
        assert case["source"] == "watch" and case["calling_aet"] == "WATCHFOLDER"
        wait_for(lambda: not any((tmp_path / "import").rglob("*.dcm")), 30, what="the import folder to empty")
    finally:
        node.stop()
        tps.stop()
