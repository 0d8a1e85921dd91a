#!/usr/bin/env python3
"""The CT partial-volume rim (``ct_rim_mm``) against the truth, with a box from the truth on every slice.

For every slice of the tumour the box is the bounding box of the truth on that slice plus
3 mm (an *oracle*: what a perfect walk hands the model), LiteMedSAM segments it in the
soft-tissue window (40/400), and :func:`inference.partial_volume.add_lung_rim` grows the
mask by up to each ``ct_rim_mm``. Reported per case and rim: Dice over the tumour's slices
(all slices pooled) and the volume ratio (mask / truth). Cases: the CT phantoms of
``dicom_node.phantom`` (seeds 0-4; thin 1.25 mm, thick 5 mm and oblique), and LUNG1-001
``GTV-1`` from ``../shared/data`` (skipped with a note where absent).

    .venv/bin/python benchmarks/partial_volume.py [--rims 0,1,1.5,2,3] [--quick]

``--quick`` runs one small phantom with rims 0 and 1.5 (for the test that keeps this runnable).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from litemedsam_preprocess import SHARED, load_case  # noqa: E402

from inference import litemedsam as lm  # noqa: E402
from inference.partial_volume import add_lung_rim_slice  # noqa: E402
from inference.preprocess import prepare  # noqa: E402
from inference.propagation import bounding_box, expand_box  # noqa: E402

MARGIN_MM = 3.0


def phantom_cases(quick: bool):
    from dicom_node.phantom import make_phantom

    if quick:
        ph = make_phantom("CT", 0, shape=(40, 192, 192), spacing=(2.5, 2.0, 2.0))
        yield "phantom CT seed 0 (small)", ph.volume, ph.truth
        return
    for seed in range(5):
        ph = make_phantom("CT", seed)
        yield f"phantom CT seed {seed}", ph.volume, ph.truth
    ph = make_phantom("CT", 5, shape=(112, 256, 256), spacing=(1.25, 1.5, 1.5))
    yield "phantom CT thin 1.25 mm", ph.volume, ph.truth
    ph = make_phantom("CT", 6, shape=(28, 256, 256), spacing=(5.0, 1.5, 1.5))
    yield "phantom CT thick 5 mm", ph.volume, ph.truth
    ph = make_phantom("CT", 7, oblique=True)
    yield "phantom CT oblique", ph.volume, ph.truth


def real_cases():
    root = SHARED / "lung1-001-ct"
    if not root.is_dir():
        print(f"note: {root} is absent: LUNG1-001 skipped")
        return
    yield "LUNG1-001 GTV-1", *load_case(root, "CT", "RTSTRUCT", "GTV-1")


def score(runtime, volume, truth, rims) -> dict[float, tuple[float, float]]:
    gray = prepare(volume).gray
    spacing_yx = (float(volume.spacing[1]), float(volume.spacing[2]))
    seg = lm.LiteMedSamSliceSegmenter(runtime, gray, spacing_yx)
    hu = volume.array
    inter = dict.fromkeys(rims, 0)
    pred = dict.fromkeys(rims, 0)
    total = 0
    for k in np.flatnonzero(truth.any(axis=(1, 2))):
        box = expand_box(bounding_box(truth[k]), MARGIN_MM, spacing_yx, truth.shape[1:])  # the walk's next box
        mask, _ = seg.segment_slice(int(k), box)
        total += int(truth[k].sum())
        for r in rims:
            m = add_lung_rim_slice(mask, hu[k].astype(np.float32), spacing_yx, r)
            inter[r] += int((m & truth[k]).sum())
            pred[r] += int(m.sum())
    return {r: (2.0 * inter[r] / max(pred[r] + total, 1), pred[r] / max(total, 1)) for r in rims}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rims", default="0,1,1.5,2,3", help="ct_rim_mm values, comma-separated (mm)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache-dir", default=None, help="OpenVINO cache folder (default: the node's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rims = [0.0, 1.5] if args.quick else [float(v) for v in args.rims.split(",")]
    model, info = lm.load_model()
    try:
        runtime = lm.OpenVinoRuntime(model, info.sha256, cache_root=args.cache_dir, precision="f32")
    except lm.LiteMedSamError as exc:
        print(f"note: OpenVINO unavailable ({exc}): eager PyTorch")
        runtime = lm.EagerRuntime(model)
    print(f"LiteMedSAM {info.short}, runtime {runtime.name}; oracle box (truth + {MARGIN_MM:g} mm) on every slice")
    head = f"{'case':28s}" + "".join(f"  {'rim ' + format(r, 'g') + ' mm':>17s}" for r in rims)
    print(head)
    print(f"{'':28s}" + "".join(f"  {'Dice':>8s} {'vol':>8s}" for _ in rims))
    cases = list(phantom_cases(args.quick)) + ([] if args.quick else list(real_cases()))
    for name, volume, truth in cases:
        result = score(runtime, volume, truth, rims)
        print(f"{name:28s}" + "".join(f"  {result[r][0]:8.3f} {result[r][1]:8.2f}" for r in rims), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
