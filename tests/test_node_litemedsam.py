"""A real CT case through the running node with the shipped rules: the default engine is
LiteMedSAM (storescu -> node -> storescp), and its result passes dciodvfy."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import yaml
from helpers import (
    REPO,
    NodeProcess,
    StoreSCP,
    dciodvfy_errors,
    delivered,
    require_tool,
    shared_path,
    storescu,
    write_config,
)

from inference.metrics import dice, hd95
from rtstruct.rasterize import rasterize_roi
from rtstruct.reader import read_rtstruct
from rtstruct.series import load_series
from rtstruct.writer import RoiMask, write_rtstruct

pytestmark = pytest.mark.network

REPO_RULES = REPO / "config" / "rules.yaml"


def _box_prompt(volume, truth: np.ndarray, path):
    """A planner's box around GTV-1 on its largest slice, as a BOX_ ROI."""
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    rows = np.flatnonzero(truth[k].any(axis=1))
    cols = np.flatnonzero(truth[k].any(axis=0))
    box = np.zeros(volume.shape, dtype=bool)
    box[k, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    ds = write_rtstruct(volume, [RoiMask("BOX_", box, interpreted_type="CONTROL")], label="PROMPT")
    ds.save_as(path, enforce_file_format=True)
    return path


def test_lung1_through_the_node_with_the_default_rules(tmp_path):
    require_tool("storescu")
    require_tool("storescp")
    require_tool("dciodvfy")
    ct = shared_path("lung1-001-ct", "CT")
    volume = load_series(ct)
    (rt,) = sorted(shared_path("lung1-001-ct", "RTSTRUCT").glob("*.dcm"))
    truth = rasterize_roi(read_rtstruct(rt).roi("GTV-1"), volume.geometry)
    prompt = _box_prompt(volume, truth, tmp_path / "prompt.dcm")

    tps = StoreSCP(tmp_path / "tps").start()
    node = None
    try:
        config = write_config(tmp_path / "node", destinations={"tps": tps.destination()})
        rules = shutil.copy(REPO_RULES, tmp_path / "node" / "shipped-rules.yaml")  # the catch-all sends to tps
        data = yaml.safe_load(config.read_text())
        data["rules"] = str(rules)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        node = NodeProcess(config).start()
        out = storescu([ct, prompt], node.port)
        assert out.returncode == 0, out.stderr[-2000:]
        (result,) = delivered(node, tps, timeout=600)
        assert dciodvfy_errors(result) == []
        ds = pydicom.dcmread(result)
        item = ds.StructureSetROISequence[0]
        algorithm = item.ROIDerivationAlgorithmIdentificationSequence[0].AlgorithmName
        assert item.ROIGenerationAlgorithm == "AUTOMATIC" and algorithm.startswith("LiteMedSAM sha256:79d8c9dc")
        (job,) = node.jobs()
        assert job["rule"] == "default" and job["engine"] == "litemedsam"
        ss = read_rtstruct(ds)
        assert ss.referenced_series_uids == [volume.series_instance_uid]
        pred = rasterize_roi(ss.rois[0], volume.geometry)
        assert dice(pred, truth) >= 0.85
        assert hd95(pred, truth, volume.spacing) <= 6.0
    finally:
        if node is not None:
            node.stop()
        tps.stop()
