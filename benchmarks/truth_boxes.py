#!/usr/bin/env python3
"""Is it the model or the walk? LiteMedSAM with a box from the truth on every slice, against the walk.

For every case and ROI of a study folder, each slice of the truth gets the truth's bounding
box on that slice grown by ``--margin-mm`` (default: the walk's ``prompt_margin_mm``, 3 mm):
what a walk that never loses the tumour would hand the model, and an *oracle*, since it
knows where the tumour is and where it ends. A CT's masks then get the node's partial-volume
rim (``ct_rim_mm``, as the walk's do). Reported per case: the median Dice over the slices and
the 3D Dice of those masks. With ``--study OUT`` (a ``dicom-node study`` output of the same
folder), the walk's 3D Dice from its ``cases.csv`` stands beside them, and their ratio:
near 1, the model is what limits the case (a better walk cannot help); well below 1, the
walk loses what the model can see.

    .venv/bin/python benchmarks/truth_boxes.py SRC [--study OUT] [--margin-mm 3]

Measured 2026-12-07 (the walk: ``dicom-node study --engine litemedsam --prompt box --slice
largest``), 3D Dice, oracle / walk:

* LUNG1-001 ``GTV-1`` 0.932 / 0.924; STS-001 T2 0.953 / 0.925; the 16 phantoms (median)
  0.954 / 0.951, every one of them within 0.02: the walk gives what the model can see.
* STS-001 T1 0.854 / 0.655: the walk loses 0.2 (its boxes shrink with masks short of the
  mass, and it runs on into muscle of the same brightness).
* The 16 phantoms of ``dicom-node phantom --contrast low`` (median) 0.938 / 0.932; the eight
  CT ones 0.793 / 0.766. On those the model itself is the limit: it stops at the edge it
  sees (tumour against lung) and leaves out the part abutting the chest wall or the
  mediastinum, with the truth's box on every slice too. One walk loses more (seed 1: 0.808
  / 0.591, its box shrinking as on T1). The eight MR ones: 0.949 / 0.947.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.research.cases import load_cases  # noqa: E402
from inference.limits import WalkLimits  # noqa: E402
from inference.metrics import dice  # noqa: E402
from inference.partial_volume import add_lung_rim  # noqa: E402
from inference.propagation import bounding_box, expand_box  # noqa: E402


def walk_dice(study: Path | None) -> dict[tuple[str, str, str], float]:
    """(dataset, case, roi) -> the walk's 3D Dice, from a study's cases.csv."""
    if study is None:
        return {}
    out = {}
    with open(study / "cases.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["status"] == "ok":
                out[(row["dataset"], row["case"], row["roi"])] = float(row["dice"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a study folder (dicom-node study's layout)")
    ap.add_argument("--roi", default="^(GTV-1|GTV_Mass|GTV)$")
    ap.add_argument("--study", type=Path, help="a dicom-node study output of SRC: the walk's Dice beside the oracle's")
    ap.add_argument("--margin-mm", type=float, default=WalkLimits().prompt_margin_mm)
    args = ap.parse_args(argv)

    from inference import litemedsam as lm
    from inference import preprocess
    from inference.engine import get_engine

    engine = get_engine("litemedsam")
    walked = walk_dice(args.study)
    rim_mm = WalkLimits().ct_rim_mm
    loaded = load_cases(args.src, re.compile(args.roi))
    print(f"oracle: the truth's box + {args.margin_mm:g} mm on every slice; CT rim {rim_mm:g} mm")
    print(f"{'case':52s} {'slices':>6s} {'slice Dice':>10s} {'3D oracle':>9s} {'3D walk':>8s} {'walk/oracle':>11s}")
    by_dataset: dict[str, list[tuple[float, float | None]]] = {}
    for lc in loaded:
        vol = lc.volume
        gray = preprocess.prepare(vol, None).gray
        spacing_yx = (vol.spacing[1], vol.spacing[2])
        for name, truth in lc.labels:
            ks = [int(k) for k in np.flatnonzero(truth.any(axis=(1, 2)))]
            seg = lm.LiteMedSamSliceSegmenter(engine.runtime, gray, spacing_yx, anchor_slices=ks[:1])
            pred = np.zeros_like(truth, dtype=bool)
            for k in ks:
                box = expand_box(bounding_box(truth[k]), args.margin_mm, spacing_yx, gray.shape[1:])
                pred[k] = np.asarray(seg.segment_slice(k, box)[0], dtype=bool)
            if vol.modality == "CT" and rim_mm > 0:
                pred = add_lung_rim(pred, vol.array, vol.spacing, rim_mm)
            per_slice = [dice(pred[k][None], truth[k][None]) for k in ks]
            oracle = dice(pred, truth)
            walk = walked.get((lc.dataset, lc.name, name))
            ratio = f"{walk / oracle:11.3f}" if walk is not None and oracle > 0 else f"{'-':>11s}"
            label = f"{lc.dataset}/{lc.name}/{name}"
            print(
                f"{label[:52]:52s} {len(ks):6d} {statistics.median(per_slice):10.3f} {oracle:9.3f} "
                + (f"{walk:8.3f}" if walk is not None else f"{'-':>8s}")
                + ratio,
                flush=True,
            )
            by_dataset.setdefault(lc.dataset, []).append((oracle, walk))
    print("median by dataset:")
    for dataset, rows in by_dataset.items():
        oracle = statistics.median(o for o, _ in rows)
        walks = [w for _, w in rows if w is not None]
        walk = f"{statistics.median(walks):8.3f}" if walks else f"{'-':>8s}"
        print(f"  {dataset:50s} {len(rows):6d} {'':10s} {oracle:9.3f} {walk}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
