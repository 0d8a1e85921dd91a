"""The operator's view of a running node that has processed phantoms.

One node for the module: its web page on loopback (no authentication: read-only), its
failure webhook pointed at an HTTP server of this test, and three cases:

1. phantom 1 from STORESCU: rule ``all-outputs`` delivers the RTSTRUCT, a SEG and the QA
   pictures as Secondary Capture to dcmtk storescp and to Orthanc;
2. phantom 2 from TPS: rule ``to-a-closed-port`` sends to a port where nobody listens, so
   its delivery is dead-lettered after two attempts;
3. phantom 3 from PYNETDICOM: no rule matches, the case fails.

Headless Chromium loads the health, cases and case pages; the screenshots are kept under
this module's pytest temporary folder (``.../web-screenshots*/``, printed by the test).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import yaml
from helpers import (
    NodeProcess,
    Orthanc,
    StoreSCP,
    dciodvfy_errors,
    free_port,
    phantom,
    port_open,
    storescu,
    wait_for,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.network

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
QA_FRAME = (47, 127, 208)  # the border of a QA picture on the case page (style.css figure.qa)


class Webhook:
    """An HTTP server that records JSON POSTs; the first answer is 503 (the node must retry)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.accepted: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                status = 503 if len(outer.requests) == 1 else 200
                if status == 200:
                    outer.accepted.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stardust"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def metric_values(text: str) -> dict[tuple, float]:
    """``(sample name, sorted labels) -> value`` of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(values: dict[tuple, float], name: str, **labels) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web-node")
    tps = StoreSCP(tmp / "tps").start()
    orthanc = Orthanc(tmp / "orthanc").start()
    hook = Webhook()
    web_port = free_port()
    rules = [
        {
            "name": "all-outputs",
            "match": {"calling_aet": "STORESCU"},
            "action": {"engine": "classic", "outputs": ["rtstruct", "seg", "overlay"], "destinations": ["tps", "pacs"]},
        },
        {
            "name": "to-a-closed-port",
            "match": {"calling_aet": "TPS"},
            "action": {"engine": "classic", "destinations": ["closed"]},
        },
    ]
    config = write_config(
        tmp / "node",
        destinations={
            "tps": tps.destination(),
            "pacs": orthanc.destination(),
            "closed": {"host": "127.0.0.1", "port": free_port(), "ae_title": "NOBODY"},
        },
        rules=False,
        web={"enabled": True, "port": web_port},
        webhook={"url": hook.url, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5},
        send={"max_attempts": 2, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5},
    )
    (tmp / "node" / "rules.yaml").write_text(yaml.safe_dump({"version": 1, "rules": rules}, sort_keys=False))
    data = yaml.safe_load(config.read_text())
    data["rules"] = str(tmp / "node" / "rules.yaml")
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    node = NodeProcess(config).start()
    base = f"http://127.0.0.1:{web_port}"
    try:
        wait_for(lambda: port_open(web_port), 30, 0.1, "the web page")
        wait_for(lambda: "ready" in httpx.get(f"{base}/").text, 60, 0.2, "the worker to be ready")
        before = httpx.get(f"{base}/metrics").text
        phantoms = [phantom(1), phantom(2), phantom(3)]
        for p, aet in zip(phantoms, ["STORESCU", "TPS", "PYNETDICOM"]):
            out = storescu([p["images"], p["prompt"]], node.port, aet=aet)
            assert out.returncode == 0, out.stderr
        wait_for(lambda: len(node.cases()) == 3 and all(c["state"] in ("done", "failed") for c in node.cases()), 180,
                 0.2, "three finished cases")  # fmt: skip
        wait_for(
            lambda: [s["state"] for s in node.sends()] and all(s["state"] in ("sent", "dead") for s in node.sends()),
            120,
            0.2,
            "every delivery sent or dead",
        )
        wait_for(lambda: len(hook.accepted) >= 2, 60, 0.1, "two failures reported by the webhook")
        yield {
            "node": node,
            "tps": tps,
            "orthanc": orthanc,
            "hook": hook,
            "base": base,
            "before": before,
            "phantoms": phantoms,
            "tmp": tmp,
        }
    finally:
        node.stop()
        hook.stop()
        orthanc.stop()
        tps.stop()


def _by_class(files: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for f in files:
        out.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID), []).append(f)
    return out


def test_seg_and_secondary_capture_are_valid_and_delivered(run):
    node, tps, orthanc = run["node"], run["tps"], run["orthanc"]
    case1 = node.query("SELECT * FROM sends WHERE job_id = 1 ORDER BY id")
    assert {(s["destination"], s["output"], s["state"], s["attempts"]) for s in case1} == {
        (d, o, "sent", 1) for d in ("tps", "pacs") for o in ("rtstruct", "seg", "overlay")
    }
    detail = json.loads(node.jobs()[0]["detail"])
    n_pictures = len(detail["qa"])
    assert 3 <= n_pictures <= 6 and len(detail["files"]["overlay"]) == n_pictures
    at_tps = _by_class(tps.files())
    assert len(at_tps[RTSTRUCT]) == 1 and len(at_tps[SEG]) == 1 and len(at_tps[SC]) == n_pictures
    images = pydicom.dcmread(sorted(Path(run["phantoms"][0]["images"]).glob("*.dcm"))[0], stop_before_pixels=True)
    for f in at_tps[SEG] + at_tps[SC][:2]:
        assert dciodvfy_errors(f) == [], f
        ds = pydicom.dcmread(f)
        assert ds.StudyInstanceUID == images.StudyInstanceUID and ds.SeriesInstanceUID != images.SeriesInstanceUID
    seg = pydicom.dcmread(at_tps[SEG][0])
    assert (
        seg.SegmentSequence[0].SegmentLabel == "GTV_AI" and seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    )
    assert seg.FrameOfReferenceUID == images.FrameOfReferenceUID
    assert int(seg.NumberOfFrames) == detail["targets"][0]["slices"]  # one frame per slice of the result
    sc = pydicom.dcmread(at_tps[SC][0])
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in Path(run["phantoms"][0]["images"]).glob("*")
    }
    classes = sorted(orthanc.instance_tags(i)["SOPClassUID"] for i in orthanc.instances())
    assert classes == sorted([RTSTRUCT, SEG] + [SC] * n_pictures)  # Orthanc received each once


def test_metrics_of_the_receiver_and_the_worker(run):
    before, after = metric_values(run["before"]), metric_values(httpx.get(f"{run['base']}/metrics").text)
    n_images = sum(len(list(Path(p["images"]).glob("*.dcm"))) for p in run["phantoms"])
    grew = {
        "stardust_instances_received_total": n_images + 3,  # the images and three prompts
        "stardust_associations_total": 3,
        "stardust_inference_seconds_count": 2,  # counted by the worker process
        "stardust_jobs_finished_total": 2,  # the worker process
        "stardust_release_to_ready_seconds_count": 3,
        "stardust_dead_letters_total": 1,
        "stardust_delivery_retries_total": 1,
    }
    for name, n in grew.items():
        assert total(after, name) - total(before, name) == n, name
    assert total(after, "stardust_received_bytes_total") > total(before, "stardust_received_bytes_total") + 1e6
    assert total(after, "stardust_inference_seconds_count", engine="classic") == 2
    assert total(after, "stardust_inference_seconds_per_slice_count", engine="classic") == 2
    assert total(after, "stardust_jobs_finished_total", outcome="done") == 2
    for output in ("rtstruct", "seg", "overlay"):
        assert total(after, "stardust_deliveries_total", output=output, outcome="sent") == 2
    assert total(after, "stardust_deliveries_total", output="rtstruct", outcome="failed") == 2  # the closed port
    assert total(after, "stardust_cases", state="done") == 2 and total(after, "stardust_cases", state="failed") == 1
    assert total(after, "stardust_deliveries_by_state", state="dead") == 1
    assert total(after, "stardust_jobs", state="pending") == 0  # the queue is empty
    assert total(after, "stardust_worker_up", worker="0", device="cpu") == 1
    assert total(after, "stardust_scp_listening") == 1
    assert total(after, "stardust_disk_free_bytes") > total(after, "stardust_disk_floor_bytes") > 0
    assert total(after, "stardust_webhook_posts_total", outcome="sent") == 2
    assert all(name.startswith("stardust_") for name, _ in after)


def test_the_webhook_fires_once_per_failure(run):
    hook, node = run["hook"], run["node"]
    time.sleep(1.5)  # anything sent twice would arrive by now
    kinds = sorted(b["event"] for b in hook.accepted)
    assert kinds == ["case_failed", "delivery_dead"]
    assert len({b["id"] for b in hook.accepted}) == 2 and len(hook.requests) == 3  # the 503 was retried once
    dead = next(b for b in hook.accepted if b["event"] == "delivery_dead")
    assert (dead["case"], dead["job"], dead["rule"], dead["destination"], dead["output"]) == (
        2,
        2,
        "to-a-closed-port",
        "closed",
        "rtstruct",
    )
    assert "gave up after 2 attempts" in dead["reason"] and "cannot connect to NOBODY@127.0.0.1" in dead["reason"]
    failed = next(b for b in hook.accepted if b["event"] == "case_failed")
    assert failed["case"] == 3 and failed["node"] == "STARDUST"
    rows = node.query("SELECT state, attempts FROM notifications ORDER BY id")
    assert sorted((r["state"], r["attempts"]) for r in rows) == [("sent", 1), ("sent", 2)]


def _pages(run) -> dict[str, str]:
    base = run["base"]
    out = {path: httpx.get(f"{base}{path}").text for path in ("/", "/cases", "/cases?state=failed", "/metrics")}
    for case_id in (1, 2, 3):
        out[f"/cases/{case_id}"] = httpx.get(f"{base}/cases/{case_id}").text
    return out


def test_no_patient_name_or_id_in_any_page_or_metric(run):
    pages = _pages(run)
    for p in run["phantoms"]:
        ds = pydicom.dcmread(p["prompt"], stop_before_pixels=True)
        for secret in (str(ds.PatientName), str(ds.PatientID), str(ds.PatientName).replace("^", " ")):
            for path, text in pages.items():
                assert secret not in text, f"{secret!r} on {path}"
    for path, text in pages.items():  # no UID in any link or picture address
        for href in [h.split('"')[0] for h in text.split('href="')[1:]] + [
            h.split('"')[0] for h in text.split('src="')[1:]
        ]:
            assert "1.2." not in href, (path, href)


def test_the_pages_say_what_happened(run):
    pages = _pages(run)
    health = pages["/"]
    assert "listening" in health and "ready" in health and "classic" in health  # the worker and its model
    assert "1 dead-lettered" in health and "gave up after 2 attempts" in health  # last errors
    cases = pages["/cases"]
    assert cases.index('href="/cases/3"') < cases.index('href="/cases/2"') < cases.index('href="/cases/1"')
    assert "all-outputs" in cases and "no rule matched" in cases.lower()
    assert 'href="/cases/3"' in pages["/cases?state=failed"] and 'href="/cases/1"' not in pages["/cases?state=failed"]
    one = pages["/cases/1"]
    assert one.count('<figure class="qa">') >= 3 and "Where the propagation stopped" in one and "prompted" in one
    assert "seg" in one and "overlay" in one and "Send the result again" not in one  # read-only: not signed in
    qa = httpx.get(f"{run['base']}/cases/1/qa/" + one.split("/cases/1/qa/")[1].split('"')[0])
    assert qa.status_code == 200 and qa.headers["content-type"] == "image/png" and qa.content[:4] == b"\x89PNG"


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _screenshot(chromium: str, url: str, out: Path, profile: Path) -> np.ndarray:
    from PIL import Image

    proc = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            "--window-size=1280,2000",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.exists(), proc.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB"))


def test_a_real_browser_shows_the_pages(run, tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not found: install it with 'sudo apt-get install chromium' (or run 'make test' as root)")
    shots = tmp_path_factory.mktemp("web-screenshots")
    pixels = {}
    for name, path in (("health", "/"), ("cases", "/cases"), ("case", "/cases/1")):
        pixels[name] = _screenshot(chromium, run["base"] + path, shots / f"{name}.png", shots / f"profile-{name}")
        image = pixels[name]
        assert image.shape[:2] == (2000, 1280)
        assert image.std() > 20, f"{name}: the page looks blank"
        assert (np.abs(image - [31, 58, 90]).sum(axis=2) < 10).sum() > 20000, f"{name}: no page header"
    # the case page: the QA pictures' frames, each holding an image with the red contour
    case = pixels["case"].astype(int)
    frame = np.abs(case - QA_FRAME).sum(axis=2) < 12
    rows, cols = np.flatnonzero(frame.any(axis=1)), np.flatnonzero(frame.any(axis=0))
    assert rows.size and cols.size, "no QA picture frame on the case page"
    inside = case[rows[0] + 6 : rows[0] + 300, cols[0] + 6 : cols[0] + 300]
    assert inside.std() > 25, "the QA picture area is uniform (the picture did not load)"
    assert (inside.sum(axis=2) < 60).mean() > 0.1, "no dark image pixels where the QA picture should be"
    red = (case[..., 0] > 200) & (case[..., 1] < 60) & (case[..., 2] < 60)
    assert red[rows[0] : rows[-1], cols[0] : cols[-1]].sum() > 100, "no contour in the QA pictures"
    print(f"\nscreenshots of the health, cases and case pages: {shots}")
