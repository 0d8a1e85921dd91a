#!/usr/bin/env python3
"""Build the study folder that README "Measured quality" is measured on, in one command.

``OUT`` gets the layout ``dicom-node study`` reads (``OUT/<dataset>/<case>/``):

* ``lung1`` (LUNG1-001 CT), ``sts-t1`` and ``sts-t2`` (STS-001 MR T1 and T2): links into
  ``../shared/data`` (``--shared``), each left out with a note when it is absent (a fresh
  checkout has no ``../shared``);
* ``phantom-ct`` and ``phantom-mr``: 8 phantoms each from :func:`dicom_node.phantom.make_phantom`,
  seeds 0-4 on the default grid (56 slices of 2.5 mm, 256x256 of 1.5 mm), ``thin`` (seed 5,
  112 slices of 1.25 mm), ``thick`` (seed 6, 28 slices of 5 mm) and ``oblique`` (seed 7);
* with ``--low-contrast``, also ``phantom-ct-low`` and ``phantom-mr-low``: the same 16 with
  ``contrast="low"`` (``dicom-node phantom --contrast low``).

Then, e.g.::

    .venv/bin/python benchmarks/study_cases.py /tmp/src --low-contrast
    .venv/bin/dicom-node study /tmp/src /tmp/out --roi '^(GTV-1|GTV_Mass|GTV)$' --seed 0 \\
        --engine litemedsam --prompt box --slice largest
    .venv/bin/python benchmarks/truth_boxes.py /tmp/src --study /tmp/out

An existing ``OUT`` is refused unless it is empty, so that no earlier case is mixed in.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.phantom import make_phantom, save_phantom  # noqa: E402

#: dataset -> folder of ``../shared/data`` (see its README)
REAL = {"lung1": "lung1-001-ct", "sts-t1": "sts-001-mr/MR_T1", "sts-t2": "sts-001-mr/MR_T2"}
#: case folder -> (seed, keyword arguments of make_phantom)
PHANTOMS = {
    **{f"s{seed}": (seed, {}) for seed in range(5)},
    "thin": (5, {"shape": (112, 256, 256), "spacing": (1.25, 1.5, 1.5)}),
    "thick": (6, {"shape": (28, 256, 256), "spacing": (5.0, 1.5, 1.5)}),
    "oblique": (7, {"oblique": True}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the study folder to write (new or empty)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data", help="the real cases' folder")
    ap.add_argument("--low-contrast", action="store_true", help="also the 16 low-contrast phantoms")
    ap.add_argument("--no-real", action="store_true", help="phantoms only")
    args = ap.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"{args.out} exists and is not an empty folder: give a new one", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.no_real:
        for dataset, rel in REAL.items():
            source = (args.shared / rel).resolve()
            if source.is_dir():
                (args.out / dataset).symlink_to(source, target_is_directory=True)
                print(f"{dataset}: {source}")
            else:
                print(f"note: {source} is absent: {dataset} left out")
    contrasts = ["high", "low"] if args.low_contrast else ["high"]
    for contrast in contrasts:
        for modality in ("CT", "MR"):
            dataset = f"phantom-{modality.lower()}" + ("-low" if contrast == "low" else "")
            for case, (seed, kw) in PHANTOMS.items():
                phantom = make_phantom(modality, seed, contrast=contrast, **kw)
                save_phantom(phantom, args.out / dataset / case)
            print(f"{dataset}: {len(PHANTOMS)} phantoms ({', '.join(PHANTOMS)})")
    print(f"written in {time.perf_counter() - start:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
