"""The DICOM peers of the tests: dcmtk storescu/echoscu as senders, dcmtk storescp and Orthanc as the TPS.

Everything started here is stopped by the caller (``stop()`` in ``finally`` or a fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from .env import free_port, require_tool
from .wait import port_open, wait_for


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

    def received(self) -> dict[str, Path]:
        """The received files by SOP Instance UID, in the order of :meth:`files`.

        storescp names a file after its instance, so an instance received twice is one
        file: the node's audit (``sent`` events) counts deliveries."""
        import pydicom

        return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in self.files()}

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
