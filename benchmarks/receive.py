"""Receive throughput: dcmtk ``storescu`` sending a CT to the node vs to dcmtk ``storescp``.

A 300-slice 512x512 CT phantom (``make_phantom`` + ``write_image_series``) is sent with
``storescu`` to (a) ``dicom-node serve`` with the default durable writes (fsync of every
file and its directory before Success) and (b) dcmtk ``storescp`` started with
``TCP_NODELAY=1``, both writing to the same file system, alternately, several times. The
wall time of each ``storescu`` run is measured (after a ``sync``, so that neither receiver
pays for the other's write-back) and the ratio of the medians printed.
Target (DESIGN.md): ratio <= 2.0.

The client is measured twice, because on loopback ``storescp`` is bimodal: ``TCP_NODELAY``
on the receiver does not stop the *sender's* Nagle algorithm from holding the tail of each
request until a delayed ACK (about 40 ms per instance, 10 s for this CT) in some runs and
not in others. So the ratio is printed for ``storescu`` as it comes (the setting the issue
names) and for ``storescu`` with ``TCP_NODELAY=1`` too (the same client for both
receivers, no Nagle anywhere: storescp at its fastest).

    .venv/bin/python benchmarks/receive.py [--reps 5] [--slices 300] [--size 512] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listening on port {port} after {timeout:g} s")


def make_series(folder: Path, slices: int, size: int) -> list[Path]:
    from dicom_node.phantom import make_phantom, write_image_series

    t = time.perf_counter()
    phantom = make_phantom("CT", 0, shape=(slices, size, size))
    files = write_image_series(phantom.volume, folder)
    mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"series: {len(files)} slices of {size}x{size}, {mb:.0f} MiB (made in {time.perf_counter() - t:.1f} s)")
    return files


def send(storescu: str, folder: Path, port: int, aec: str, env: dict | None = None) -> float:
    t = time.perf_counter()
    out = subprocess.run(
        [storescu, "+sd", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), str(folder)],
        capture_output=True,
        text=True,
        env=env,
    )
    elapsed = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"storescu to {aec} failed ({out.returncode}): {out.stderr[-2000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workdir", help="where the series and both receivers write (default: a temp dir)")
    parser.add_argument("--no-fsync", action="store_true", help="node without durable writes (for comparison only)")
    args = parser.parse_args(argv)

    storescu, storescp = shutil.which("storescu"), shutil.which("storescp")
    if not storescu or not storescp:
        raise SystemExit("dcmtk storescu/storescp not found: sudo apt-get install dcmtk")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stardust-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        series = work / "series"
        make_series(series, args.slices, args.size)

        node_port, scp_port = free_port(), free_port()
        cfg = {
            "ae_title": "STARDUST",
            "data_dir": str(work / "node-data"),
            "rules": None,
            "network": {"bind": "127.0.0.1", "port": node_port},
            "access": {"calling_aets": ["STORESCU"], "networks": ["127.0.0.0/8"]},
            "storage": {"fsync": not args.no_fsync, "min_free_mb": 512},
            "workers": {"devices": ["cpu"]},
            "logging": {"level": "WARNING"},
        }
        (work / "node.yaml").write_text(yaml.safe_dump(cfg))
        node_log = open(work / "node.log", "wb")
        node = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from dicom_node.cli import main; sys.exit(main())",
                "serve",
                "-c",
                str(work / "node.yaml"),
            ],
            stdout=node_log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            start_new_session=True,
        )
        procs.append(node)
        scp_dir = work / "storescp-out"
        scp_dir.mkdir()
        scp = subprocess.Popen(
            [storescp, "-aet", "STORESCP", "-od", str(scp_dir), str(scp_port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(scp)
        wait_port(node_port)
        wait_port(scp_port)

        send(storescu, series, node_port, "STARDUST")  # warm-up (directories, page cache)
        send(storescu, series, scp_port, "STORESCP")
        # a timing only means something if each receiver kept every instance
        for name, folder in (("node", work / "node-data" / "store"), ("storescp", scp_dir)):
            kept = sum(1 for f in folder.rglob("*") if f.is_file() and not f.name.endswith(".part"))
            if kept != args.slices:
                raise SystemExit(
                    f"{name} kept {kept} of {args.slices} instances: the timing would mean nothing "
                    f"(see {work / 'node.log'})"
                )
        mb = sum(f.stat().st_size for f in series.iterdir()) / 2**20
        plain_env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        clients = [("storescu", plain_env), ("storescu with TCP_NODELAY=1", {**plain_env, "TCP_NODELAY": "1"})]
        summary = []
        for client, env in clients:
            print(f"client: {client}")
            node_times, scp_times = [], []
            for rep in range(args.reps):
                order = [("node", node_port, "STARDUST"), ("storescp", scp_port, "STORESCP")]
                if rep % 2:
                    order.reverse()
                for name, port, aec in order:
                    if name == "storescp":
                        shutil.rmtree(scp_dir)
                        scp_dir.mkdir()
                    os.sync()  # no dirty pages of the previous run may slow this one down
                    seconds = send(storescu, series, port, aec, env)
                    (node_times if name == "node" else scp_times).append(seconds)
                print(
                    f"  rep {rep + 1}: node {node_times[-1]:.2f} s, storescp {scp_times[-1]:.2f} s, "
                    f"ratio {node_times[-1] / scp_times[-1]:.2f}"
                )
            n_med, s_med = statistics.median(node_times), statistics.median(scp_times)
            print(
                f"  node     ({'fsync off' if args.no_fsync else 'durable: fsync file + directory'}): "
                f"median {n_med:.2f} s ({mb / n_med:.0f} MiB/s)  runs {', '.join(f'{t:.2f}' for t in node_times)}"
            )
            print(
                f"  storescp (TCP_NODELAY=1, no fsync): median {s_med:.2f} s ({mb / s_med:.0f} MiB/s)  "
                f"runs {', '.join(f'{t:.2f}' for t in scp_times)}"
            )
            summary.append((client, n_med / s_med, min(node_times) / min(scp_times)))
        for client, ratio, best in summary:
            print(
                f"ratio node/storescp, client {client}: {ratio:.2f} (medians), {best:.2f} (best runs)  (target <= 2.0)"
            )
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
