"""Helpers for the node's integration tests: configs, the node process, real DICOM peers.

Everything started here is stopped by the caller in ``finally`` (or by the fixtures in the
test modules). Waiting is done by polling with generous timeouts, never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from conftest import REPO, free_port, require_tool

PY = sys.executable
#: the dicom-node command line (``python -m dicom_node.cli`` would import cli.py twice)
CLI = [PY, "-c", "import sys; from dicom_node.cli import main; sys.exit(main())"]


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:g} s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else "")
    )


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def write_rules(
    path: Path, destinations: list[str], export_folder: str | None = None, extra_rules: list | None = None
) -> Path:
    action: dict[str, Any] = {"engine": "classic", "mode": "box2d", "destinations": destinations}
    if export_folder:
        action["export_folder"] = export_folder
    rules = list(extra_rules or []) + [{"name": "test-default", "action": action}]
    path.write_text(yaml.safe_dump({"version": 1, "rules": rules}, sort_keys=False))
    return path


def write_config(
    tmp: Path,
    *,
    port: int | None = None,
    destinations: dict | None = None,
    rule_destinations: list[str] | None = None,
    export_folder: str | None = None,
    rules: bool = True,
    extra_rules: list | None = None,
    **overrides: Any,
) -> Path:
    """A node.yaml in ``tmp`` (data in tmp/data, loopback, fast timeouts) merged with overrides.

    ``extra_rules`` come before the catch-all classic rule that sends to every destination."""
    from dicom_node.config import merge

    tmp.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "ae_title": "STARDUST",
        "data_dir": str(tmp / "data"),
        "network": {"bind": "127.0.0.1", "port": port or free_port()},
        "access": {
            "calling_aets": ["STORESCU", "ECHOSCU", "TPS", "STARDUST", "PYNETDICOM"],
            "networks": ["127.0.0.0/8"],
        },
        "storage": {"min_free_mb": 64},
        "cases": {"settle_seconds": 2, "incomplete_timeout_seconds": 120, "stale_reference_wait_seconds": 3},
        "jobs": {"lease_seconds": 30},
        "workers": {"devices": ["cpu"], "poll_seconds": 0.5, "restart_backoff_max_seconds": 2},
        "send": {"backoff_initial_seconds": 0.5, "backoff_max_seconds": 2, "max_attempts": 10},
        "destinations": destinations or {},
        "logging": {"level": "INFO"},
    }
    if rules:
        dest_names = list((destinations or {}).keys()) if rule_destinations is None else rule_destinations
        cfg["rules"] = str(write_rules(tmp / "rules.yaml", dest_names, export_folder, extra_rules))
    cfg = merge(cfg, overrides)
    path = tmp / "node.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------
# the node
# --------------------------------------------------------------------------------------
class NodeProcess:
    """``dicom-node serve -c CONFIG`` in its own process group."""

    def __init__(self, config: Path) -> None:
        self.config = Path(config)
        data = yaml.safe_load(self.config.read_text())
        self.port = int(data["network"]["port"])
        self.data_dir = Path(data["data_dir"])
        self.ae_title = data.get("ae_title", "STARDUST")
        self.log_path = self.config.parent / f"node-{int(time.time() * 1000)}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*CLI, "serve", "-c", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            start_new_session=True,
        )
        wait_for(lambda: self.proc.poll() is not None or port_open(self.port), timeout, 0.1, "the node to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"the node exited with {self.proc.returncode}:\n{self.log_text()}")
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        """SIGKILL the whole process group (the node and its workers), like a power cut of the service."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # any worker left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- database views ------------------------------------------------------------------
    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.data_dir / "node.db", timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, params: tuple = ()) -> list[dict]:
        conn = self.db()
        try:
            return [dict(r) for r in conn.execute(sql, params).fetchall()]
        finally:
            conn.close()

    def cases(self) -> list[dict]:
        return self.query("SELECT * FROM cases ORDER BY id")

    def jobs(self) -> list[dict]:
        return self.query("SELECT * FROM jobs ORDER BY id")

    def sends(self) -> list[dict]:
        return self.query("SELECT * FROM sends ORDER BY id")

    def audit(self) -> list[dict]:
        from dicom_node.audit import read_audit

        return list(read_audit(self.data_dir / "audit.jsonl"))

    def echo(self, aet: str = "ECHOSCU") -> bool:
        return echoscu(self.port, self.ae_title, aet).returncode == 0


# --------------------------------------------------------------------------------------
# dcmtk
# --------------------------------------------------------------------------------------
def storescu(
    paths: list[Path] | Path,
    port: int,
    aec: str = "STARDUST",
    aet: str = "STORESCU",
    extra: list[str] | None = None,
    timeout: float = 300.0,
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess:
    exe = require_tool("storescu")
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    args = [exe, "-v", "-aet", aet, "-aec", aec]
    if any(Path(p).is_dir() for p in paths):
        args += ["+sd", "+r"]
    args += list(extra or []) + [host, str(port)] + [str(p) for p in paths]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def echoscu(
    port: int, aec: str = "STARDUST", aet: str = "ECHOSCU", host: str = "127.0.0.1", extra: list[str] | None = None
) -> subprocess.CompletedProcess:
    exe = require_tool("echoscu")
    return subprocess.run(
        [exe, "-aet", aet, "-aec", aec, *(extra or []), host, str(port)], capture_output=True, text=True, timeout=60
    )


class StoreSCP:
    """dcmtk storescp standing in for the TPS import: every received file lands in ``folder``."""

    def __init__(
        self, folder: Path, port: int | None = None, aet: str = "TPS_IMPORT", extra: list[str] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.extra = list(extra or [])
        self.port = port or free_port()
        self.aet = aet
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        exe = require_tool("storescp")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder.parent / f"storescp-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [exe, "-aet", self.aet, "-od", str(self.folder), "-uf", "+B", *self.extra, str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        wait_for(lambda: port_open(self.port), 20, 0.05, f"storescp on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file()) if self.folder.exists() else []

    def destination(self) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "ae_title": self.aet}


class Orthanc:
    """A real Orthanc server (DICOM + REST) with a generated configuration in ``workdir``."""

    def __init__(self, workdir: Path, node_aet: str = "STARDUST", node_port: int = 104) -> None:
        self.workdir = Path(workdir)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.aet = "ORTHANC"
        self.node_aet = node_aet
        self.node_port = node_port
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        exe = require_tool("Orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "stardust-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomModalities": {"stardust": [self.node_aet, "127.0.0.1", self.node_port]},
            "Plugins": [],
            "StableAge": 1,
        }
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(config, indent=1))
        self._log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([exe, str(cfg_path)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self._get("/system"), 60, 0.2, "Orthanc to start")
        if self.proc.poll() is not None:
            raise AssertionError(
                "Orthanc exited: " + (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:]
            )
        return self

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def get(self, path: str) -> Any:
        return self._get(path)

    def instances(self) -> list[str]:
        return self._get("/instances")

    def instance_tags(self, orthanc_id: str) -> dict:
        return self._get(f"/instances/{orthanc_id}/simplified-tags")

    def file(self, orthanc_id: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/instances/{orthanc_id}/file", timeout=30) as r:
            return r.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()

    def destination(self) -> dict:
        return {"host": "127.0.0.1", "port": self.dicom_port, "ae_title": self.aet}


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for a file (warnings are not errors)."""
    exe = require_tool("dciodvfy")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    return [line for line in text.splitlines() if line.startswith("Error")]


def stored_successes(storescu_output: str) -> list[str]:
    """Files that storescu -v reported as stored with Success (in order)."""
    ok: list[str] = []
    current = None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response" in line and "(Success)" in line and current:
            ok.append(current)
            current = None
    return ok


def copy_files(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        dst = folder / f.name
        shutil.copyfile(f, dst)
        out.append(dst)
    return out


# --------------------------------------------------------------------------------------
# phantoms (made once per test session, in a temporary folder)
# --------------------------------------------------------------------------------------
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
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
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


def delivered(node: NodeProcess, tps: StoreSCP, n: int = 1, timeout: float = 180.0) -> list[Path]:
    """Wait until the node recorded ``n`` deliveries as sent, then the files at ``tps``.

    storescp answers Success only after writing its file, so a delivery marked sent is a
    complete file (listing the folder earlier could show a file still being written).
    """
    wait_for(lambda: sum(s["state"] == "sent" for s in node.sends()) >= n, timeout, 0.1, f"{n} deliveries")
    files = tps.files()
    assert len(files) >= n, f"{len(files)} files at the TPS after {n} deliveries"
    return files
