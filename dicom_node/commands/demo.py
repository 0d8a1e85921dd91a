"""``dicom-node demo``: the interim end-to-end demo (until segmentation and the node exist).

Generates a phantom (images, prompt.dcm, truth.dcm) in ``--outdir``, loads the images
back as a volume, writes the phantom's tumour back through the RTSTRUCT writer as
``result.dcm`` and checks that the result rasterises to the tumour.
"""

from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the demo on a synthetic phantom (writes ./demo-output/)")
    p.add_argument("--outdir", default="demo-output", help="output folder (default ./demo-output)")
    p.add_argument("--modality", choices=["CT", "MR"], default="CT")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.commands.phantom import describe
    from dicom_node.phantom import make_phantom, save_phantom
    from inference.metrics import dice
    from inference.volume import load_series
    from rtstruct.rasterize import rasterize_roi
    from rtstruct.reader import read_rtstruct
    from rtstruct.writer import RoiMask, write_rtstruct

    outdir = Path(args.outdir)
    start = time.perf_counter()
    phantom = make_phantom(args.modality, args.seed)
    paths = save_phantom(phantom, outdir)
    print(describe(phantom, paths))

    volume = load_series(paths["images"])  # the volume as the node would see it
    result = write_rtstruct(
        volume,
        [RoiMask("GTV_AI", phantom.truth, algorithm_name="STARDUST demo (phantom truth)")],
        series_description="STARDUST demo result",
    )
    result_path = outdir / "result.dcm"
    result.save_as(result_path, enforce_file_format=True)
    back = rasterize_roi(read_rtstruct(result_path).roi("GTV_AI"), volume.geometry)
    score = dice(back, phantom.truth)
    print(f"  result: {result_path} (GTV_AI, {int(phantom.truth.any(axis=(1, 2)).sum())} slices; "
          f"Dice against the truth after rasterising {score:.3f})")
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0
