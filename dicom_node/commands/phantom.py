"""``dicom-node phantom OUTDIR``: a synthetic CT/MR series with a tumour, its prompt and truth."""

from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "phantom",
        help="write a synthetic series, prompt.dcm and truth.dcm",
        description=(
            "Write OUTDIR/images/ (one DICOM file per slice), OUTDIR/prompt.dcm (an RTSTRUCT with "
            "a BOX_ ROI around the tumour on its largest slice) and OUTDIR/truth.dcm (the tumour "
            "as GTV). The same seed gives the same voxels; UIDs are new every time."
        ),
    )
    p.add_argument("outdir", help="output folder (created; the files of an earlier phantom there are replaced)")
    p.add_argument("--modality", choices=["CT", "MR"], default="CT")
    p.add_argument("--seed", type=int, default=0, help="random seed of anatomy, tumour and noise (default 0)")
    p.add_argument("--slices", type=int, default=56, help="number of slices (default 56)")
    p.add_argument("--size", type=int, default=256, help="rows and columns per slice (default 256)")
    p.add_argument("--slice-spacing", type=float, default=2.5, help="slice spacing in mm (default 2.5)")
    p.add_argument("--fov", type=float, default=384.0, help="in-plane field of view in mm (default 384)")
    p.add_argument("--oblique", action="store_true", help="image the body in an oblique orientation")
    p.add_argument(
        "--contrast",
        choices=["high", "low"],
        default="high",
        help="the tumour against the soft tissue it touches: high (default) or low, close to it "
        "(CT 10-15 HU above muscle; MR 15%% above muscle), as a lung tumour abutting the chest wall or "
        "a sarcoma on T1 looks",
    )
    p.add_argument("--images-only", action="store_true", help="write the image series only (no RTSTRUCTs)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.cli import CommandError
    from dicom_node.phantom import make_phantom, save_phantom

    if args.slices < 1 or args.size < 16:
        raise CommandError("--slices must be at least 1 and --size at least 16")
    if args.slice_spacing <= 0 or args.fov <= 0:
        raise CommandError("--slice-spacing and --fov must be positive")
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise CommandError(f"{outdir} exists and is not a folder")
    start = time.perf_counter()
    pixel = args.fov / args.size
    try:
        phantom = make_phantom(
            args.modality,
            args.seed,
            shape=(args.slices, args.size, args.size),
            spacing=(args.slice_spacing, pixel, pixel),
            oblique=args.oblique,
            contrast=args.contrast,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    paths = save_phantom(phantom, outdir, rtstructs=not args.images_only)
    elapsed = time.perf_counter() - start
    print(describe(phantom, paths, elapsed))
    return 0


def describe(phantom, paths: dict, elapsed: float | None = None) -> str:
    """What a phantom holds and where it was written, for the terminal."""
    v = phantom.volume
    nz, ny, nx = v.shape
    first, last = phantom.info["tumour_slices"]
    b = phantom.box
    lines = [
        f"{v.modality} phantom, seed {phantom.seed}: {nz} slices of {ny}x{nx}, "
        f"spacing {v.spacing[0]:g} x {v.spacing[1]:.4g} x {v.spacing[2]:.4g} mm"
        + (" (oblique)" if not _axial(v.geometry) else "")
        + (", low-contrast tumour" if phantom.info.get("contrast") == "low" else ""),
        f"  tumour: slices {first}-{last} ({phantom.info['tumour_extent_mm']:g} mm), "
        f"{phantom.info['tumour_volume_ml']:.1f} ml",
        f"  images: {paths['images']}/ ({nz} files, series {v.series_instance_uid})",
    ]
    if "prompt" in paths:
        lines.append(
            f"  prompt: {paths['prompt']} (BOX_ on slice {b.slice_index}: rows {b.i0:g}-{b.i1:g}, "
            f"columns {b.j0:g}-{b.j1:g})"
        )
        lines.append(f"  truth:  {paths['truth']} (GTV)")
    if elapsed is not None:
        lines.append(f"  written in {elapsed:.1f} s")
    return "\n".join(lines)


def _axial(geometry) -> bool:
    import numpy as np

    return bool(np.allclose(np.abs(geometry.direction), np.eye(3)[::-1], atol=1e-6))
