"""The node under test: its configuration files and ``dicom-node serve`` as a process.

Everything started here is stopped by the caller (``stop()`` in ``finally`` or a fixture).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .data import phantom
from .env import REPO, free_port
from .peers import StoreSCP, echoscu, storescu
from .wait import port_open, wait_for

PY = sys.executable
#: the dicom-node command line (``python -m dicom_node.cli`` would import cli.py twice)
CLI = [PY, "-c", "import sys; from dicom_node.cli import main; sys.exit(main())"]


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
class ProcessGroup:
    """A ``dicom-node`` command in its own process group, its output in ``log_path``:
    what :class:`NodeProcess` (serve) and the tests' worker processes share."""

    log_path: Path
    proc: subprocess.Popen | None = None

    def _spawn(self, args: list[str], cwd: Path, env: dict | None = None) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*CLI, *args], stdout=self._log, stderr=subprocess.STDOUT, cwd=str(cwd), env=env, start_new_session=True
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        """SIGKILL the whole process group (the process and its workers), like a power cut."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL to the group after ``timeout`` s and to any worker left behind."""
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


class NodeProcess(ProcessGroup):
    """``dicom-node serve -c CONFIG`` in its own process group.

    ``tree``: run the code of another checkout (a previous release taken from git history)
    instead of this one: from that folder and with it on ``PYTHONPATH``, so that the
    workers, which import from the node's working directory, run it too.
    """

    def __init__(self, config: Path, tree: Path | None = None) -> None:
        self.config = Path(config)
        self.tree = Path(tree) if tree is not None else None
        data = yaml.safe_load(self.config.read_text())
        self.port = int(data["network"]["port"])
        self.data_dir = Path(data["data_dir"])
        self.ae_title = data.get("ae_title", "STARDUST")
        self.log_path = self.config.parent / f"node-{int(time.time() * 1000)}.log"
        self.proc = None

    def start(self, timeout: float = 60.0) -> NodeProcess:
        env = {**os.environ, "PYTHONPATH": str(self.tree)} if self.tree is not None else None
        self._spawn(["serve", "-c", str(self.config)], self.tree or REPO, env)
        wait_for(lambda: self.proc.poll() is not None or port_open(self.port), timeout, 0.1, "the node to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"the node exited with {self.proc.returncode}:\n{self.log_text()}")
        return self

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


def delivered(node: NodeProcess, tps: StoreSCP, n: int = 1, timeout: float = 180.0) -> list[Path]:
    """Wait until the node recorded ``n`` deliveries as sent, then the files at ``tps``.

    storescp answers Success only after writing its file, so a delivery marked sent is a
    complete file (listing the folder earlier could show a file still being written).
    """
    wait_for(lambda: sum(s["state"] == "sent" for s in node.sends()) >= n, timeout, 0.1, f"{n} deliveries")
    files = tps.files()
    assert len(files) >= n, f"{len(files)} files at the TPS after {n} deliveries"
    return files


def deliver_later_case(node: NodeProcess, seed: int = 5, timeout: float = 180.0) -> dict:
    """Send another case (phantom ``seed``) and wait until the node has delivered its result
    to every destination; returns that case's job row (``case_id``, ``result_sop_uid``...).

    This is the positive evidence a "nothing more happens" check waits for: the node has run
    past everything that came before. Its case assembler took a later arrival, a worker a
    later job, and its sender a later pass over the queue (a pass claims every delivery that
    is due, so an earlier one still due would have gone with it). The prompt is a copy with
    a new SOP Instance UID each time, so every call makes a new case, also on one node.
    """
    import pydicom

    p = phantom(seed)
    ds = pydicom.dcmread(p["prompt"])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    folder = node.config.parent / "later-cases"
    folder.mkdir(exist_ok=True)
    prompt = folder / f"prompt-{ds.SOPInstanceUID}.dcm"
    ds.save_as(prompt, enforce_file_format=True)
    out = storescu([p["images"], prompt], node.port)
    assert out.returncode == 0, out.stderr[-2000:]

    def done() -> dict | None:
        jobs = node.query(
            "SELECT j.* FROM jobs j JOIN cases c ON c.id = j.case_id WHERE c.rtstruct_uid = ?", (ds.SOPInstanceUID,)
        )
        if not jobs or jobs[0]["state"] != "done":
            return None
        sends = node.query("SELECT state FROM sends WHERE job_id = ?", (jobs[0]["id"],))
        return jobs[0] if sends and all(s["state"] == "sent" for s in sends) else None

    return wait_for(done, timeout, 0.1, f"a later case (phantom {seed}) to be delivered")
