#!/usr/bin/env python3
"""Loading a multi-frame CT against the same slices as single-frame files: time and peak memory.

A CT phantom (``dicom_node.phantom``) is written as single-frame files and converted into
one Legacy Converted Enhanced CT instance with highdicom's converter; both are loaded with
:func:`rtstruct.series.load_series` and the arrays compared. Reported for each: the
seconds of the load (best of ``--reps``) and the peak of Python-traced memory during it
(``tracemalloc``, which counts NumPy's buffers) as a ratio to the volume's array. The
multi-frame loader decodes frame by frame from the file, so its peak stays near the
array's size, as the single-frame loader's does.

    .venv/bin/python benchmarks/multiframe_load.py [--slices 200] [--size 512] [--reps 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.phantom import make_phantom, save_phantom  # noqa: E402
from rtstruct.series import load_series  # noqa: E402


def convert(images: Path, out: Path) -> Path:
    """The single-frame files of ``images`` as one Legacy Converted Enhanced CT instance."""
    import pydicom
    from highdicom import UID
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    slices = [pydicom.dcmread(f) for f in sorted(images.glob("*.dcm"))]
    image = LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=UID(), series_number=2, sop_instance_uid=UID(), instance_number=1
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(out, enforce_file_format=True)
    return out


def measure(source: Path, reps: int) -> tuple[float, int, object]:
    """(best seconds, largest traced peak in bytes, the volume) of ``reps`` loads."""
    best, peak, volume = float("inf"), 0, None
    for _ in range(reps):
        volume = None
        tracemalloc.start()
        t0 = time.perf_counter()
        volume = load_series(source)
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return best, peak, volume


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="rows and columns")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stardust-multiframe-") as tmp:
        root = Path(tmp)
        phantom = make_phantom("CT", 3, shape=(args.slices, args.size, args.size))
        images = save_phantom(phantom, root / "single", rtstructs=False)["images"]
        enhanced = convert(images, root / "enhanced" / "ct.dcm")
        print(f"series: {args.slices} slices of {args.size}x{args.size}")
        single_s, single_peak, single = measure(images, args.reps)
        multi_s, multi_peak, multi = measure(enhanced, args.reps)
        assert np.array_equal(single.array, multi.array), "the two volumes differ"
        size = single.array.nbytes
        for name, seconds, peak in (("single-frame", single_s, single_peak), ("multi-frame", multi_s, multi_peak)):
            print(f"{name}: {seconds:.2f} s, peak {peak / 2**20:.0f} MiB = {peak / size:.2f} x the array")
        print(f"ratio multi-frame/single-frame: time {multi_s / single_s:.2f}, peak {multi_peak / single_peak:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
