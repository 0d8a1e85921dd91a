"""Refusals a planner can act on, through the running node (issue 11, item 5).

The report: one slice of a CT sent with a structure set drawn on 30 slices gave a reason of
29 clauses "ROI 'BOX_Heart' contour N is outside the image ..." before the one that
matters, the missing images. Here the real LUNG1 CT is cut to one slice and sent by dcmtk
storescu; the reason must lead with the cause, be short, and be the same text in the
case (and job) row, the audit file and the log.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pydicom
import pytest
from helpers import NodeProcess, require_tool, shared_path, storescu, wait_for, write_config
from pydicom.uid import generate_uid

from rtstruct.series import load_series
from rtstruct.writer import RoiMask, write_rtstruct

pytestmark = pytest.mark.network

SLICE = 55  # the one slice sent; the box is drawn on slices 40-69


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+(?=[A-Z0-9'])", text.strip()) if s]


def _logged_reasons(node: NodeProcess, event: str, case: int) -> list[str]:
    """The ``reason`` fields of the node's log lines for ``event`` of ``case`` (text format)."""
    out = []
    for line in node.log_text().splitlines():
        if f": {event} " in line and re.search(rf"\bcase={case}\b", line):
            m = re.search(r'\breason=("(?:[^"\\]|\\.)*"|\S+)', line)
            if m:
                value = m.group(1)
                out.append(json.loads(value) if value.startswith('"') else value)
    return out


def _audited_reasons(node: NodeProcess, event: str, case: int) -> list[str]:
    return [r["reason"] for r in node.audit() if r["event"] == event and r.get("case") == case]


def test_one_slice_with_a_box_on_30_slices_is_refused_with_its_cause(tmp_path):
    require_tool("storescu")
    ct = shared_path("lung1-001-ct", "CT")
    volume = load_series(ct)
    box = np.zeros(volume.shape, dtype=bool)
    box[40:70, 200:300, 180:280] = True
    prompt = write_rtstruct(volume, [RoiMask("BOX_Heart", box, interpreted_type="CONTROL")], label="PROMPT")
    prompt.save_as(tmp_path / "prompt.dcm", enforce_file_format=True)
    # The same prompt after the CT was re-exported with new UIDs: its references are stale,
    # so the node takes the images of the series (the one slice) and the job refuses it.
    stale = pydicom.dcmread(tmp_path / "prompt.dcm")
    fresh: dict[str, str] = {}
    for item in stale.iterall():
        if item.keyword == "ReferencedSOPInstanceUID" and item.value in volume.sop_instance_uids:
            item.value = fresh.setdefault(item.value, generate_uid())
    stale.SOPInstanceUID = stale.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    stale.save_as(tmp_path / "stale.dcm", enforce_file_format=True)
    uid = volume.sop_instance_uids[SLICE]
    (one,) = [f for f in sorted(ct.glob("*.dcm")) if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == uid]

    node = NodeProcess(write_config(tmp_path / "node", cases={"incomplete_timeout_seconds": 5})).start()
    try:
        out = storescu([one, tmp_path / "prompt.dcm", tmp_path / "stale.dcm"], node.port)
        assert out.returncode == 0, out.stderr[-2000:]

        def failed(sop):
            def check():
                rows = node.query("SELECT * FROM cases WHERE rtstruct_uid = ?", (sop,))
                return rows and rows[0]["state"] == "failed" and rows[0]

            return check

        # 1. The reported case: 133 of the 134 images never arrive; the case fails at assembly.
        case = wait_for(failed(str(prompt.SOPInstanceUID)), 60, 0.2, "the case to fail")
        reason = case["reason"]
        assert reason == "133 of 134 referenced images missing after 5 s"
        assert not node.query("SELECT * FROM jobs WHERE case_id = ?", (case["id"],))
        assert _audited_reasons(node, "case_failed", case["id"]) == [reason]
        wait_for(lambda: _logged_reasons(node, "case_failed", case["id"]), 10, 0.2, "the log line")
        assert _logged_reasons(node, "case_failed", case["id"]) == [reason]

        # 2. Stale references: the job segments the one slice and refuses the prompt.
        case = wait_for(failed(str(stale.SOPInstanceUID)), 120, 0.2, "the stale case to fail")
        (job,) = node.query("SELECT * FROM jobs WHERE case_id = ?", (case["id"],))
        reason = job["error"]
        assert reason == case["reason"]
        assert len(_sentences(reason)) <= 3, reason
        assert "ROI 'BOX_Heart': 29 of 30 contours lie outside the image" in reason
        assert "contour 2 " not in reason  # no clause per contour
        assert _audited_reasons(node, "job_failed", case["id"]) == [reason]
        wait_for(lambda: _logged_reasons(node, "job_failed", case["id"]), 10, 0.2, "the log line")
        assert _logged_reasons(node, "job_failed", case["id"]) == [reason]
        print(reason)
    finally:
        node.stop()
