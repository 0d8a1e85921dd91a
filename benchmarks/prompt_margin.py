#!/usr/bin/env python3
"""How loose should the box be that LiteMedSAM gets? The planner's box on its slice, grown by 0-15 mm.

For every case and ROI of a study folder, on the tumour's largest and middle slice, the box
is the truth's bounding box on that slice (what a careful planner draws: exactly on the
tumour's edge) grown by each of ``--margins`` mm, and the mask's Dice against the truth on
that slice is reported (per case, and the median over all). This is how
``prompt_margin_mm`` (:class:`inference.limits.WalkLimits`, default 3 mm) was chosen; the
walk itself is measured end to end by ``dicom-node study --prompt-margin-mm X``.

    .venv/bin/python benchmarks/prompt_margin.py SRC [--margins 0,3,6,10,15]

``SRC`` is a study folder (``dicom-node study``'s layout). Measured 2026-12-07 on LUNG1-001,
STS-001 T1 and T2 and 16 phantoms (38 slices), median Dice for 0 / 3 / 6 / 10 / 15 mm:
0.942 / 0.956 / 0.953 / 0.946 / 0.939. The tight box undersegments the CT phantoms (one
0.766 at 0 mm, 0.889 at 15 mm) and STS-001 T1 (middle slice 0.841 at 0 mm, 0.958 at 3 mm);
STS-001 T2 loses from 10 mm (0.987 -> 0.970 -> 0.938).
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
from dicom_node.research.simulate import choose_slice  # noqa: E402
from inference.metrics import dice  # noqa: E402
from inference.propagation import bounding_box, expand_box  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("--roi", default="^(GTV-1|GTV_Mass|GTV)$")
    ap.add_argument("--margins", default="0,3,6,10,15", help="box margins to try, mm")
    args = ap.parse_args(argv)
    margins = [float(m) for m in args.margins.split(",")]

    from inference import litemedsam as lm
    from inference import preprocess
    from inference.engine import get_engine

    engine = get_engine("litemedsam")
    loaded = load_cases(args.src, re.compile(args.roi))
    print(f"{'case, slice (Dice on that slice)':60s}" + "".join(f" {m:>6g} mm" for m in margins))
    table = []
    for lc in loaded:
        gray = preprocess.prepare(lc.volume, None).gray
        spacing_yx = (lc.volume.spacing[1], lc.volume.spacing[2])
        for name, truth in lc.labels:
            for how in ("largest", "middle"):
                k = choose_slice(truth, how)
                seg = lm.LiteMedSamSliceSegmenter(engine.runtime, gray, spacing_yx, anchor_slices=[k])
                tight = bounding_box(truth[k])
                row = []
                for m in margins:
                    mask, _ = seg.segment_slice(k, expand_box(tight, m, spacing_yx, gray.shape[1:]))
                    row.append(dice(mask[None], truth[k][None]))
                table.append(row)
                label = f"{lc.dataset}/{lc.name}/{name} {how}"
                print(f"{label[:60]:60s}" + "".join(f" {d:9.3f}" for d in row), flush=True)
    medians = np.median(np.array(table), axis=0)
    print(f"{f'median over {len(table)} slices':60s}" + "".join(f" {d:9.3f}" for d in medians))
    return 0


if __name__ == "__main__":
    sys.exit(main())
