#!/usr/bin/env python3
"""Input sizes: the worker's peak memory and time for large cases, against a baseline case
in the same run.

Each case is a CT phantom written as DICOM (:func:`dicom_node.phantom.write_size_case`) and
run in a fresh child process through the function the node's worker runs for a job
(:func:`dicom_node.worker.segment_for_job`: load the series, read the prompt RTSTRUCT,
segment every target, write the result RTSTRUCT), under the default input limits
(:class:`inference.limits.InputLimits`, ``node.yaml`` ``limits:``). The child reports its
peak resident memory (``VmHWM`` of ``/proc/self/status``) and its seconds; a case over a
limit is refused, and the refusal's sentence is reported with the memory it took.

Cases (``--cases``; default all but ``ct1000x1024``, whose 2 GB of images take minutes to
write):

* ``baseline``: 100 slices of 512x512, 2.5 mm, one box prompt;
* ``ct1000``: 1000 slices of 512x512 (1 mm);
* ``matrix1024``: 100 slices of 1024x1024 (2.5 mm);
* ``thin06``: 500 slices of 512x512 at 0.6 mm;
* ``ct1000x1024``: 1000 slices of 1024x1024 at 0.6 mm (over ``max_voxels``: refused);
* ``targets20``: the baseline with 20 targets (``BOX_T01``...);
* ``rois200``: the baseline with 200 clinical ROIs holding 2 million contour points.

Columns: case, voxels, peak MB, ratio of the peak to the baseline's, seconds, engine,
outcome (``ok`` with the result's slices, or the refusal). Engines other than ``classic``
first run a tiny untimed case (the model's compiled cache is then warm). ``--quick``: a tiny baseline
and a tiny 3-target case (a smoke run; its numbers mean little).

    .venv/bin/python benchmarks/input_sizes.py [--engine classic|litemedsam] [--cases a,b] [--json out.json]

Numbers are comparable within one run on one machine; the ratio is the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: name -> write_size_case arguments
CASES: dict[str, dict] = {
    "baseline": {"slices": 100, "rows": 512, "slice_spacing": 2.5},
    "ct1000": {"slices": 1000, "rows": 512, "slice_spacing": 1.0},
    "matrix1024": {"slices": 100, "rows": 1024, "slice_spacing": 2.5},
    "thin06": {"slices": 500, "rows": 512, "slice_spacing": 0.6},
    "ct1000x1024": {"slices": 1000, "rows": 1024, "slice_spacing": 0.6},
    "targets20": {"slices": 100, "rows": 512, "slice_spacing": 2.5, "targets": 20},
    "rois200": {"slices": 100, "rows": 512, "slice_spacing": 2.5, "clinical_rois": 200, "contour_points": 2_000_000},
}
DEFAULT_CASES = [c for c in CASES if c != "ct1000x1024"]
QUICK_CASES: dict[str, dict] = {
    "baseline": {"slices": 40, "rows": 128, "slice_spacing": 2.5},
    "targets3": {
        "slices": 40,
        "rows": 128,
        "slice_spacing": 2.5,
        "targets": 3,
        "clinical_rois": 3,
        "contour_points": 3000,
    },
}


def peak_mb() -> float:
    """VmHWM (peak resident memory) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def child(case_dir: Path, engine: str, cache_dir: Path) -> dict:
    """One case in this (fresh) process, as the worker runs a job."""
    import logging

    logging.disable(logging.WARNING)
    from dicom_node.rules import Action
    from dicom_node.worker import PermanentJobError, segment_for_job

    images = sorted((case_dir / "images").glob("*.dcm"))
    t0 = time.perf_counter()
    try:
        case, info = segment_for_job(
            case_dir / "prompt.dcm",
            images,
            None,
            Action(engine=engine),
            "cpu",
            False,
            cache_dir=cache_dir,
        )
        out = Path(tempfile.mkdtemp()) / "result.dcm"
        case.dataset.save_as(out, enforce_file_format=True)
        outcome = f"ok: {len(info['targets'])} target(s), {max(t['slices'] for t in info['targets'])} slices"
        out.unlink()
    except PermanentJobError as exc:
        outcome = f"refused: {exc}"
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_mb": round(peak_mb(), 1), "outcome": outcome}


def run_case(name: str, args: dict, workdir: Path, engine: str) -> dict:
    from dicom_node.phantom import write_size_case

    case_dir = workdir / name
    meta = case_dir / "case.json"
    if not meta.exists():  # the data of a case is written once per work folder
        t0 = time.perf_counter()
        written = write_size_case(case_dir, **args)
        facts = {"voxels": written["voxels"], "points": written["points"], "write_seconds": time.perf_counter() - t0}
        meta.write_text(json.dumps(facts))
    facts = json.loads(meta.read_text())
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(case_dir), "--engine", engine, "--cache-dir", str(workdir / "cache")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"case": name, "voxels": facts["voxels"], "engine": engine, "outcome": f"crashed: {tail[0]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"case": name, "voxels": facts["voxels"], "points": facts["points"], "engine": engine, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="classic", help="classic or litemedsam (default classic)")
    parser.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)} (default: all but ct1000x1024)")
    parser.add_argument("--quick", action="store_true", help="tiny cases only (a smoke run)")
    parser.add_argument("--workdir", type=Path, help="where the cases' DICOM files are written (kept)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.engine, args.cache_dir)))
        return 0

    table = QUICK_CASES if args.quick else CASES
    names = list(table) if args.quick else (args.cases.split(",") if args.cases else DEFAULT_CASES)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(table)}")
    if "baseline" not in names:
        names = ["baseline", *names]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="input_sizes_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.engine != "classic" and not args.quick:  # the first run compiles the model (OpenVINO cache): not timed
        run_case("warm-up", QUICK_CASES["baseline"], workdir, args.engine)
    rows = []
    for name in names:
        row = run_case(name, table[name], workdir, args.engine)
        base = rows[0] if rows else row
        if "peak_mb" in row and "peak_mb" in base:
            row["ratio"] = round(row["peak_mb"] / base["peak_mb"], 2)
        rows.append(row)
        print(
            f"{row['case']:<12} {row['voxels']:>13,} vox  {row.get('peak_mb', float('nan')):>8.0f} MB  "
            f"x{row.get('ratio', float('nan')):<5}  {row.get('seconds', float('nan')):>6.1f} s  {row['engine']:<10}  "
            f"{row['outcome']}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
