"""``dicom-node demo``: the whole node on a synthetic phantom, from C-STORE in to RTSTRUCT back.

1. writes a CT phantom (images, ``prompt.dcm`` with a ``BOX_`` ROI, ``truth.dcm``);
2. starts a receiver standing in for the TPS (dcmtk ``storescp`` if installed, else a
   pynetdicom storage SCP in this process);
3. starts ``dicom-node serve`` with the default configuration (``config/node.yaml`` and its
   rules), changed only where a demo must: a free port on 127.0.0.1, a data directory
   under the output folder, the demo's AE title allowed, the ``tps`` destination pointing
   at the receiver. The engine is the one the rules choose for the phantom when it is
   SAM2 with an existing checkpoint (or ``--checkpoint``); otherwise the classic engine,
   and the demo says so;
4. sends the phantom and its prompt (dcmtk ``storescu`` if installed, else pynetdicom);
5. prints when the result arrived, the latency from the release of the association that
   completed the case to the result stored at the receiver (with the node's own
   breakdown from its audit trail), and the Dice of the result against the truth;
6. stops everything it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dicom_node.cli import CommandError

DEMO_AET = "DEMO_TPS"


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the node end to end on a synthetic phantom (writes ./demo-output/)")
    p.add_argument("--outdir", default="demo-output", help="output folder (default ./demo-output; replaced)")
    p.add_argument("-c", "--config", help="node.yaml to start from (default: the repository's config/node.yaml)")
    p.add_argument("--modality", choices=["CT", "MR"], default="CT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="use SAM2 with this checkpoint (default: what the rules say, else classic)")
    p.add_argument("--model-cfg", help="SAM2 model config for --checkpoint (e.g. configs/sam2.1/sam2.1_hiera_t.yaml)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the result")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CommandError(f"{what} exited with status {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.3)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise CommandError(f"{what} is not listening on port {port} after {timeout:g} s")


class _Receiver:
    """The TPS stand-in: dcmtk storescp, or a pynetdicom storage SCP; records arrival times."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.server = None
        self.arrivals: dict[str, float] = {}
        self.kind = ""

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("storescp")
        if exe:
            self.kind = "dcmtk storescp"
            self.proc = subprocess.Popen(
                [exe, "-aet", DEMO_AET, "-od", str(self.folder), "-uf", str(self.port)],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait_port(self.port, self.proc, 20, "storescp")
            return
        from pydicom.uid import RTStructureSetStorage
        from pynetdicom import AE, evt

        self.kind = "pynetdicom storage SCP (dcmtk not installed)"

        def on_store(ev):
            ds = ev.dataset
            ds.file_meta = ev.file_meta
            path = self.folder / f"RS.{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.arrivals[path.name] = time.time()
            return 0x0000

        ae = AE(DEMO_AET)
        ae.add_supported_context(RTStructureSetStorage)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def results(self) -> list[tuple[Path, float]]:
        """Complete result files with the time they were stored."""
        out = []
        for path in sorted(self.folder.glob("*")):
            if self.proc is not None:  # storescp: complete once the node recorded the delivery (see run)
                out.append((path, path.stat().st_mtime))
            elif path.name in self.arrivals:
                out.append((path, self.arrivals[path.name]))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.server is not None:
            self.server.shutdown()


def _choose_engine(args, base_cfg, phantom_paths: dict, work: Path) -> tuple[Path | None, str]:
    """The rules file for the demo node and a sentence saying which engine runs and why.

    ``--checkpoint``: SAM2 with that file. Otherwise the action of the rule that the node's
    rules file picks for the phantom (the shipped catch-all: LiteMedSAM), sent to the demo's
    receiver; a SAM2 rule whose checkpoint is missing, or no rules file, gives the default
    engine.
    """
    from dicom_node.rules import Action, RuleContext, RulesError, RuleSet
    from inference.engine import DEFAULT_ENGINE, ENGINES

    def rules_for(name: str, data: dict) -> dict:
        data = {**data, "destinations": ["tps"], "export_folder": None}
        return {"version": 1, "rules": [{"name": name, "action": data}]}

    default = Action().model_dump(mode="json")
    label = ENGINES[DEFAULT_ENGINE].label
    if args.checkpoint:
        ckpt = Path(args.checkpoint).resolve()
        if not ckpt.is_file():
            raise CommandError(f"--checkpoint {ckpt}: no such file")
        action = {"engine": "sam2", "mode": "box2d", "checkpoint": str(ckpt)}
        if args.model_cfg:
            action["model_cfg"] = args.model_cfg
        rules, why = rules_for("demo-sam2", action), f"engine: sam2 with checkpoint {ckpt} (--checkpoint)"
    elif base_cfg.rules is None or not Path(base_cfg.rules).is_file():
        rules, why = rules_for("demo-default", default), f"engine: {DEFAULT_ENGINE}, {label} (no rules file)"
    else:
        try:
            ruleset = RuleSet.load(base_cfg.rules)
            ctx = RuleContext.from_files(
                phantom_paths["images"], phantom_paths["prompt"], calling_aet=DEMO_AET, called_aet=base_cfg.ae_title
            )
            decision = ruleset.evaluate(ctx)
        except RulesError as exc:
            raise CommandError(f"rules: {exc}") from None
        action = decision.action
        name = decision.rule.name if decision.rule is not None else None
        where = f"rule {name!r} of {base_cfg.rules}"
        if action is None:
            rules, why = rules_for("demo-default", default), f"engine: {DEFAULT_ENGINE}, {label} (no rule matched)"
        elif action.engine == "sam2" and not (action.checkpoint and Path(action.checkpoint).is_file()):
            rules = rules_for("demo-default", default)
            why = f"engine: {DEFAULT_ENGINE} - {where} asks for SAM2 but its checkpoint {action.checkpoint} is missing"
        else:
            rules = rules_for(f"{name} (from {base_cfg.rules.name})", action.model_dump(mode="json"))
            detail = f"checkpoint {action.checkpoint}" if action.checkpoint else ENGINES[action.engine].label
            why = f"engine: {action.engine}, {detail} ({where})"
    import yaml

    path = work / "rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path, why


def _events(audit: Path) -> list[dict]:
    from dicom_node.audit import read_audit

    return list(read_audit(audit))


def _node_yaml(args, out: Path, receiver: _Receiver, paths: dict) -> tuple[Path, dict, int]:
    """The node's configuration for the demo: the default one (or ``--config``) on loopback,
    with the receiver as destination ``tps``; (path, raw settings, port)."""
    import yaml

    from dicom_node.config import REPO_CONFIG, ConfigError, load_config

    config_path = Path(args.config) if args.config else REPO_CONFIG
    try:
        base = load_config(config_path)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    rules_path, why = _choose_engine(args, base, paths, out)
    print(why)
    port = _free_port()
    raw = yaml.safe_load(config_path.read_text()) or {}
    raw.update({"data_dir": str(out / "node-data"), "rules": str(rules_path)})
    raw.setdefault("network", {}).update({"bind": "127.0.0.1", "port": port})
    access = raw.setdefault("access", {})
    access["calling_aets"] = sorted(set(access.get("calling_aets") or []) | {DEMO_AET})
    access["networks"] = sorted(set(access.get("networks") or []) | {"127.0.0.0/8"})
    raw.setdefault("destinations", {})["tps"] = {"host": "127.0.0.1", "port": receiver.port, "ae_title": DEMO_AET}
    raw.setdefault("watch", {})["enabled"] = False
    raw.setdefault("logging", {}).update({"file": str(out / "node.log")})
    raw.setdefault("storage", {})["min_free_mb"] = min(int(raw.get("storage", {}).get("min_free_mb", 2048)), 256)
    node_yaml = out / "node.yaml"
    node_yaml.write_text(yaml.safe_dump(raw, sort_keys=False))
    return node_yaml, raw, port


def _start_node(node_yaml: Path, raw: dict, port: int, out: Path, started: list) -> Path:
    """``dicom-node serve`` on the demo's configuration, up to its worker's ``worker_ready``;
    returns the audit file. The worker imports the segmentation code and loads the models
    once, at start; a node runs for months, so the demo measures the steady state."""
    node = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from dicom_node.cli import main; sys.exit(main())",
            "serve",
            "-c",
            str(node_yaml),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started.append(node)
    _wait_port(port, node, 60, "the node")
    audit = out / "node-data" / "audit.jsonl"
    deadline = time.monotonic() + 300
    while not any(e["event"] == "worker_ready" for e in _events(audit)):
        if node.poll() is not None or time.monotonic() > deadline:
            raise CommandError(f"the node's worker did not start (see {out / 'node.log'})")
        time.sleep(0.05)
    ready = next(e for e in _events(audit) if e["event"] == "worker_ready")
    print(
        f"node: dicom-node serve -c {node_yaml} (AE {raw.get('ae_title', 'STARDUST')} on 127.0.0.1:{port}, "
        f"worker on {ready.get('device')} ready in {ready.get('seconds', 0):.1f} s, log {out / 'node.log'})"
    )
    return audit


def _send(files: list[Path], port: int, called_aet: str) -> str:
    """Send ``files`` as the TPS would (dcmtk storescu, or pynetdicom without dcmtk); how."""
    storescu = shutil.which("storescu")
    if storescu:
        done = subprocess.run(
            [storescu, "-aet", DEMO_AET, "-aec", called_aet, "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise CommandError(f"storescu failed: {done.stderr.strip()[-500:]}")
        return "dcmtk storescu"
    from tqdm import tqdm

    from dicom_node.sender import c_store_files

    with tqdm(total=len(files), unit="file", desc="sending", disable=None) as bar:
        res = c_store_files(files, "127.0.0.1", port, called_aet, DEMO_AET, progress=bar)
    bad = [r for r in res if r[1] != 0]
    if bad:
        raise CommandError(f"{len(bad)} file(s) not stored, e.g. {bad[0][0].name}: {bad[0][2]}")
    return "pynetdicom (dcmtk not installed)"


def _wait_result(audit: Path, receiver: _Receiver, node: subprocess.Popen, timeout: float, out: Path) -> dict:
    """Wait until the result is at the receiver (the ``sent`` audit event); that event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = _events(audit)
        failed = [e for e in events if e["event"] in ("case_failed", "job_failed")]
        if failed:
            raise CommandError(
                f"the node could not process the case: {failed[-1].get('reason')} (see {out / 'node.log'})"
            )
        sent = next((e for e in events if e["event"] == "sent"), None)
        if sent is not None and receiver.results():
            return sent
        if node.poll() is not None:
            raise CommandError(f"the node exited with status {node.returncode} (see {out / 'node.log'})")
        time.sleep(0.02)
    raise CommandError(f"no result after {timeout:g} s (see {out / 'node.log'})")


def _report(result: Path, t_result: float, t_release: float, sent: dict, audit: Path, ph, paths: dict) -> None:
    """Latency (from the audit) and Dice of the result against the phantom's truth."""
    from inference.metrics import dice
    from rtstruct.rasterize import rasterize_roi
    from rtstruct.reader import read_rtstruct
    from rtstruct.series import load_series

    ev = {e["event"]: e for e in _events(audit) if e.get("case") == 1}
    print(
        f"result arrived at {time.strftime('%H:%M:%S', time.localtime(t_result))}"
        f".{int((t_result % 1) * 1000):03d}: {result}"
    )
    print(f"latency from the release of the association to the result stored at the TPS: {t_result - t_release:.2f} s")
    if {"case_ready", "inference_start", "inference_end"} <= ev.keys():
        print(
            f"  case ready {max(0.0, ev['case_ready']['ts'] - t_release):.2f} s after the release "
            f"(no settle delay), inference {ev['inference_end']['ts'] - ev['inference_start']['ts']:.2f} s "
            f"({ev['inference_end'].get('engine')}), delivery {sent['ts'] - ev['inference_end']['ts']:.2f} s"
        )
    volume = load_series(paths["images"])
    roi = read_rtstruct(result).rois[0]
    mask = rasterize_roi(roi, volume.geometry)
    print(
        f"  {roi.name}: {int(mask.any(axis=(1, 2)).sum())} slices, {roi.generation_algorithm or ''} "
        f"- Dice against the phantom's truth {dice(mask, ph.truth):.3f}"
    )


def _stop_all(started: list) -> None:
    """Stop what the demo started, newest first (SIGTERM, then SIGKILL to the group)."""
    for thing in reversed(started):
        try:
            if isinstance(thing, subprocess.Popen):
                if thing.poll() is None:
                    thing.send_signal(signal.SIGTERM)
                    try:
                        thing.wait(30)
                    except subprocess.TimeoutExpired:
                        os.killpg(thing.pid, signal.SIGKILL)
                        thing.wait(10)
            else:
                thing.stop()
        except Exception:  # keep stopping the rest
            pass


def run(args) -> int:
    from dicom_node.commands.phantom import describe
    from dicom_node.phantom import make_phantom, save_phantom

    out = Path(args.outdir).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started: list = []
    t_start = time.perf_counter()
    try:
        ph = make_phantom(args.modality, args.seed)
        paths = save_phantom(ph, out / "phantom")
        print(describe(ph, paths))
        receiver = _Receiver(out / "tps")
        receiver.start()
        started.append(receiver)
        print(f"TPS stand-in: {receiver.kind}, AE {DEMO_AET} on 127.0.0.1:{receiver.port} -> {receiver.folder}/")
        node_yaml, raw, port = _node_yaml(args, out, receiver, paths)
        audit = _start_node(node_yaml, raw, port, out, started)
        files = sorted(Path(paths["images"]).glob("*.dcm")) + [Path(paths["prompt"])]
        t_send = time.time()
        how = _send(files, port, raw.get("ae_title", "STARDUST"))
        t_release = time.time()  # the association that completed the case is released
        print(
            f"sent {len(files) - 1} images + prompt with {how} in {t_release - t_send:.2f} s; waiting for the result ..."
        )
        sent = _wait_result(audit, receiver, started[-1], args.timeout, out)
        result, t_result = receiver.results()[0]
        _report(result, t_result, t_release, sent, audit, ph, paths)
        print(f"demo finished in {time.perf_counter() - t_start:.1f} s; files in {out}/")
        return 0
    finally:
        _stop_all(started)
