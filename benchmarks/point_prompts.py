#!/usr/bin/env python3
"""Clicks instead of a box, with LiteMedSAM: ways to turn clicks into a mask, measured on the prompted slice.

LiteMedSAM was trained with boxes only, so a planner's clicks (``POS_``/``NEG_`` points)
have to become a box. Every candidate method below is scored on the slice the clicks are
on (the walk then propagates boxes from that slice's mask the same way in every method):
Dice against the truth on that slice, and against the mask the planner's box (the truth's
bounding box on that slice) gives, per case and as medians over several click draws.

    .venv/bin/python benchmarks/point_prompts.py SRC [--draws 5] [--positives 2] [--negatives 1]

``SRC`` is a study folder (``dicom-node study``'s layout). Clicks are simulated as the study
does (:func:`dicom_node.research.simulate.simulate_points`: positives in the tumour's core,
negatives in a 3-10 mm ring around it), on the largest and the middle slice, one
generator per (draw, case, ROI). Methods:

``grow`` (the engine's default)
    boxes grown from the positive clicks by each of ``POINT_MARGINS_MM``; each mask decoded
    again from its own bounding box plus ``GROW_MM`` (3 mm, the walk's margin) until it
    stops changing; of the masks that agree with every click the one with the best
    predicted IoU.
``margins``
    the same without the re-decode.
``refine``
    the re-decode from the tight bounding box (:func:`inference.litemedsam.points_to_mask`).

Measured 2026-12-07 (``--draws 3``, 16 phantoms of ``dicom-node phantom`` and the real cases,
median Dice on the prompted slice; box / margins / refine / grow): CT phantoms 0.878 / 0.874 /
0.873 / 0.880, MR phantoms 0.981 / 0.968 / 0.972 / 0.980, LUNG1-001 0.942 / 0.923 / 0.926 /
0.930, STS-001 T2 0.987 / 0.966 / 0.987 / 0.983, T1 0.836 / 0.836 / 0.737 / 0.809; against the
box's mask (same order, all cases) 0.989 / 0.993 / 0.993. Worst draws: margins 0.710 (a CT
phantom whose box gives 0.706), refine 0.356 and grow 0.495 (both T1, box 0.84). End to end
the study decides (see ``points_to_mask``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.research.cases import load_cases  # noqa: E402
from dicom_node.research.simulate import case_rng, choose_slice, simulate_points  # noqa: E402
from inference.metrics import dice  # noqa: E402
from inference.propagation import bounding_box  # noqa: E402


def _dice2d(a: np.ndarray, b: np.ndarray) -> float:
    return dice(a[None], b[None])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("--roi", default="^(GTV-1|GTV_Mass|GTV)$")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--positives", type=int, default=2)
    ap.add_argument("--negatives", type=int, default=1)
    ap.add_argument("--methods", default="grow,margins,refine")
    args = ap.parse_args(argv)

    from inference import litemedsam as lm
    from inference import preprocess
    from inference.engine import get_engine

    engine = get_engine("litemedsam")
    methods = args.methods.split(",")
    loaded = load_cases(args.src, re.compile(args.roi))
    rows = []
    for lc in loaded:
        vol = lc.volume
        gray = preprocess.prepare(vol, None).gray
        spacing_yx = (vol.spacing[1], vol.spacing[2])
        for name, truth in lc.labels:
            for how in ("largest", "middle"):
                k = choose_slice(truth, how)
                seg = lm.LiteMedSamSliceSegmenter(engine.runtime, gray, spacing_yx, anchor_slices=[k])
                box_mask, _ = seg.segment_slice(k, bounding_box(truth[k]))
                for draw in range(args.draws):
                    rng = case_rng(draw, lc.dataset, lc.name, name)
                    pts = simulate_points(truth[k], spacing_yx, args.positives, args.negatives, (3.0, 10.0), rng)
                    pts = [(float(i), float(j), bool(p)) for i, j, p in pts]
                    row = {"case": f"{lc.dataset}/{lc.name}/{name}", "modality": vol.modality, "slice": how}
                    row["box"] = _dice2d(box_mask, truth[k])
                    for m in methods:
                        mask, _ = lm.points_to_mask(seg, k, pts, method=m)
                        row[m] = _dice2d(mask, truth[k])
                        row[m + " vs box"] = _dice2d(mask, box_mask)
                    rows.append(row)
        print(f"{lc.dataset}/{lc.name}: done", file=sys.stderr)

    def med(sel, key):
        v = [r[key] for r in rows if sel(r)]
        return f"{np.median(v):.3f}" if v else "-"

    groups = [
        ("phantoms CT", lambda r: r["case"].startswith("phantom") and r["modality"] == "CT"),
        ("phantoms MR", lambda r: r["case"].startswith("phantom") and r["modality"] == "MR"),
    ]
    for case in sorted({r["case"] for r in rows if not r["case"].startswith("phantom")}):
        groups.append((case, lambda r, c=case: r["case"] == c))
    groups.append(("all", lambda r: True))
    keys = ["box"] + [k for m in methods for k in (m, m + " vs box")]
    print(f"{'group (median Dice on the prompted slice)':44s}" + "".join(f" {k:>15s}" for k in keys))
    for label, sel in groups:
        print(f"{label:44s}" + "".join(f" {med(sel, k):>15s}" for k in keys))
    worst = {m: min(rows, key=lambda r, m=m: r[m]) for m in methods}
    for m, r in worst.items():
        print(f"worst {m}: {r['case']} {r['slice']} {r[m]:.3f} (box {r['box']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
