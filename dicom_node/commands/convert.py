"""``dicom-node convert SRC OUT``: DICOM image series + RTSTRUCT -> one NPZ per case."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert DICOM cases (image series + RTSTRUCT) into NPZ files for research",
        description=(
            "Walk SRC recursively; every CT/MR series with an RTSTRUCT on it becomes OUT/<dataset>/<case>.npz "
            "(imgs, gts label map, label_names, spacing, origin, direction). Cases that cannot be converted "
            "are listed with the reason, also in OUT/convert_report.csv; the rest go on."
        ),
    )
    p.add_argument("src", help="folder of DICOM files (searched recursively)")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--roi",
        metavar="REGEX",
        help="keep only ROIs whose name matches (Python regex, searched; default: every ROI "
        "except prompt ROIs BOX_/POS_/NEG_)",
    )
    p.add_argument(
        "--pseudonymize",
        action="store_true",
        help="name cases case_0001... with no identifier in the NPZ; write OUT/pseudonym_map.csv",
    )
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="parallel worker processes (default 1)")
    p.add_argument(
        "--dataset-name", metavar="NAME", help="dataset name for every case (default: the first folder below SRC)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.cli import CommandError
    from dicom_node.research.convert import MAP_NAME, REPORT_NAME, convert

    src = Path(args.src)
    if not src.is_dir():
        raise CommandError(f"SRC is not a folder: {src}")
    if args.jobs < 1:
        raise CommandError("--jobs must be at least 1")
    if args.roi:
        try:
            re.compile(args.roi)
        except re.error as exc:
            raise CommandError(f"--roi is not a valid regular expression: {exc}") from exc
    summary = convert(
        src,
        args.out,
        roi_pattern=args.roi,
        pseudonymize=args.pseudonymize,
        jobs=args.jobs,
        dataset_name=args.dataset_name,
        progress=not args.no_progress,
    )
    done, skipped = summary.converted, summary.skipped
    print(f"converted {len(done)} case(s) into {summary.out}")
    for r in done:
        print(f"  {r.case}: {r.shape} {r.modality}, labels {r.labels}" + (f" ({r.warnings})" if r.warnings else ""))
    if skipped:
        print(f"skipped {len(skipped)}:")
        for r in skipped:
            print(f"  {r.case or r.source}: {r.reason}")
    print(
        f"report: {summary.out / REPORT_NAME}"
        + (f", pseudonym map: {summary.out / MAP_NAME}" if args.pseudonymize else "")
    )
    if not done:
        print("error: no case could be converted", file=sys.stderr)
        return 1
    return 0
