"""A fine-tuning run on phantoms whose labels the pretrained model gets wrong in a known way.

The cohort: ``dicom-node phantom`` series (CT and/or MR, one patient per seed) written as
DICOM and converted by ``dicom-node convert`` (OUT/src -> OUT/npz), then each label grown
in-plane by ``--margin-mm`` (a department that contours its GTV with a margin, or an
oedema rim the image does not show). LiteMedSAM follows the visible edge, so against these
labels its masks are systematically too small; fine-tuning on them should learn the
margin. With ``--run``, ``dicom-node finetune OUT/npz OUT/run --model litemedsam`` follows
(extra settings after ``--``) and the validation Dice before and after is printed.

    python benchmarks/finetune_phantoms.py /tmp/ft --modality MR CT --seeds 0-5 --run -- epochs=3

The suite's fine-tuning test builds its cohort with :func:`make_cohort` (small sizes).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def grow_labels(npz_dir: Path, margin_mm: float) -> int:
    """Grow every label of every NPZ under ``npz_dir`` in-plane by ``margin_mm`` (a disc
    in mm, with the file's own pixel spacing); returns the number of files changed."""
    if margin_mm <= 0:
        return 0
    n = 0
    for path in sorted(npz_dir.rglob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        dy, dx = float(data["spacing"][1]), float(data["spacing"][2])
        ry, rx = int(np.ceil(margin_mm / dy)), int(np.ceil(margin_mm / dx))
        yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
        disc = (yy * dy) ** 2 + (xx * dx) ** 2 <= margin_mm**2 + 1e-6
        gts = data["gts"]
        grown = np.zeros_like(gts)
        for label in range(1, int(gts.max()) + 1):  # larger labels first would overlap: one each
            mask = np.stack([ndimage.binary_dilation(m, disc) for m in gts == label])
            grown[mask & (grown == 0)] = label
        data["gts"] = grown
        data.pop("roi_masks", None)
        np.savez_compressed(path, **data)
        n += 1
    return n


def make_cohort(
    out: Path,
    modalities: list[str],
    seeds: list[int],
    margin_mm: float,
    slices: int = 28,
    slice_spacing: float = 5.0,
    size: int = 256,
) -> Path:
    """Phantoms -> DICOM (``out/src``) -> ``convert`` (``out/npz``) -> labels grown; returns ``out/npz``."""
    from dicom_node.phantom import make_phantom, save_phantom
    from dicom_node.research.convert import convert

    src, npz = out / "src", out / "npz"
    pixel = 384.0 / size
    for modality in modalities:
        for seed in seeds:
            ph = make_phantom(modality, seed, shape=(slices, size, size), spacing=(slice_spacing, pixel, pixel))
            paths = save_phantom(ph, src / f"{modality.lower()}{seed}")
            Path(paths["prompt"]).unlink()  # the truth's GTV is the label; the BOX_ prompt is not
    convert(src, npz, progress=False)
    grow_labels(npz, margin_mm)
    return npz


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-", 1)
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--modality", nargs="+", default=["MR"], choices=["CT", "MR"])
    p.add_argument("--seeds", default="0-4", help="phantom seeds, e.g. 0-4 or 0,2,5 (default 0-4)")
    p.add_argument("--margin-mm", type=float, default=3.0, help="in-plane growth of every label (default 3)")
    p.add_argument("--slices", type=int, default=28)
    p.add_argument("--slice-spacing", type=float, default=5.0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--run", action="store_true", help="then fine-tune litemedsam on the cohort (settings after --)")
    args = p.parse_args(argv)
    npz = make_cohort(
        args.out, args.modality, _seeds(args.seeds), args.margin_mm, args.slices, args.slice_spacing, args.size
    )
    print(f"cohort: {npz} ({len(list(npz.rglob('*.npz')))} NPZ files, labels grown by {args.margin_mm:g} mm)")
    if not args.run:
        return 0
    from dicom_node.cli import main as cli

    run = args.out / "run"
    rc = cli(["finetune", str(npz), str(run), "--model", "litemedsam", *extra])
    if rc == 0:
        with open(run / "metrics.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                print(
                    f"epoch {row['epoch']}: steps {row['steps']}, loss {row['train_loss'] or '-'}, "
                    f"val Dice {row['val_dice_median']}, HD95 {row['val_hd95_median']} mm, {row['seconds']} s"
                )
    return rc


if __name__ == "__main__":
    sys.exit(main())
