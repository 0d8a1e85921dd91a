#!/usr/bin/env python3
"""The litemedsam engine's 2D walk on the real cases, with today's stop rules, slice by slice.

Box from the truth on the largest slice of LUNG1-001 ``GTV-1`` (CT) and STS-001 MR T1
``GTV_Mass`` (``../shared/data``), default :class:`~inference.engine.SegmentOptions`.
Printed per case: 3D scores against the truth (:func:`inference.metrics.evaluate`), the
slices the walk kept against the truth's, how each direction stopped, and per slice the
model's predicted IoU, the mask's area and its Dice against the truth (``-`` where the truth
is empty): the signals a stop rule can use where the tumour ends. Not a tuning script: the
stop rules belong to :mod:`inference.propagation`.

    .venv/bin/python benchmarks/litemedsam_walk.py [--runtime auto|eager|openvino]

Measured (2026-12-01, OpenVINO f32, default options: margin 3 mm, stop below 4 mm2 or 5 % of
the prompted slice's area, 120 mm): LUNG1-001 3D Dice 0.763, HD95 93.0 mm, volume ratio 1.45:
kept 34..87 for a truth of 65..85, 31 slices past the lower end and 2 past the upper; past
the ends the predicted IoU stays 0.50-0.88 and the area 350-1000 mm2 (9-24 % of the prompted
slice's 4109 mm2), so neither stops it. STS-001 T1 3D Dice 0.571, HD95 36.8 mm: the box
shrinks with the under-segmented mask (per-slice Dice 0.43-0.83 against the oracle's
0.60-0.85), and the walk runs 9 slices past the upper end to the last slice of the series.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.engine import SegmentOptions  # noqa: E402
from inference.metrics import dice, evaluate  # noqa: E402
from inference.prompts import BoxPrompt, TargetPrompts  # noqa: E402
from inference.propagation import bounding_box  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
CASES = [
    ("LUNG1-001 GTV-1 (CT)", "lung1-001-ct", "CT", "GTV-1"),
    ("STS-001 T1 GTV_Mass (MR)", "sts-001-mr/MR_T1", "IMAGES", "GTV_Mass"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default="auto", choices=["auto", "eager", "openvino"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from inference.engines.litemedsam import LiteMedSamEngine
    from rtstruct import rasterize_roi, read_rtstruct
    from rtstruct.series import load_series

    engine = LiteMedSamEngine(runtime=args.runtime)
    print(f"{engine.algorithm_name} ({engine.runtime.name})")
    for label, folder, images, roi in CASES:
        root = SHARED / folder
        if not root.exists():
            print(f"{label}: skipped ({root} not found)")
            continue
        vol = load_series(root / images)
        (rs_file,) = sorted((root / "RTSTRUCT").glob("*.dcm"))
        truth = rasterize_roi(read_rtstruct(rs_file).roi(roi), vol.geometry)
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        box = BoxPrompt(k, *bounding_box(truth[k]))
        t0 = time.perf_counter()
        res = engine.segment(vol, TargetPrompts("", "GTV_AI", boxes=[box]), SegmentOptions())
        seconds = time.perf_counter() - t0
        scores = evaluate(res.mask, truth, vol.spacing)
        ks = np.flatnonzero(res.mask.any(axis=(1, 2)))
        ts = np.flatnonzero(truth.any(axis=(1, 2)))
        print(f"\n{label}: box on slice {k}; {scores}; {seconds:.1f} s")
        print(
            f"  slices kept {ks[0]}..{ks[-1]} ({len(ks)}), truth {ts[0]}..{ts[-1]} ({len(ts)}): "
            f"{ts[0] - ks[0]:+d} below, {ks[-1] - ts[-1]:+d} above the truth's ends"
        )
        for w in res.warnings:
            print(f"  warning: {w}")
        pixel = vol.spacing[1] * vol.spacing[2]
        print("  slice  IoU    area mm2  Dice")
        for s in sorted(set(int(v) for v in ks) | set(int(v) for v in ts)):
            iou = res.slice_scores.get(s)
            d = f"{dice(res.mask[s], truth[s]):.3f}" if truth[s].any() else "-"
            mark = " (prompt)" if s == k else ""
            iou_txt = f"{iou:.3f}" if iou is not None else "  -  "
            print(f"  {s:5d}  {iou_txt}  {res.mask[s].sum() * pixel:8.0f}  {d}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
