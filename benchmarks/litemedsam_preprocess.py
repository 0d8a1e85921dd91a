#!/usr/bin/env python3
"""LiteMedSAM preprocessing choices against the truth, with a box from the truth on every slice.

For every slice of the tumour the box is the bounding box of the ground truth on that slice
(an *oracle*: what a perfect walk would hand the model), and the per-slice Dice of the mask
against the truth is reported (median, mean and minimum over the slices) for each choice:

* ``resize``: ``bilinear`` (no antialiasing), ``area`` (MedSAM's ``cv2.INTER_AREA``),
  ``bilinear-antialias``;
* ``box``: ``index`` (indices times the scale, MedSAM's), ``centre``, ``edge``
  (:func:`inference.litemedsam.box_to_model`);
* ``mask``: ``logits`` (upsample logits, threshold 0; MedSAM's), ``probabilities``,
  ``low-res`` (:func:`inference.litemedsam.mask_from_logits`);
* for CT also the window (default 40/400 against a lung window -600/1500);
* ``context``: the whole slice (the default) against a square crop around the box, its side
  ``CROP_FACTORS`` times the box's longest side (at least 64 pixels), as the model input, so
  that a small tumour covers more of the 256 pixels. Measured 2026-12-02 (median per-slice
  Dice, whole slice / crop x6 / x4 / x3): LUNG1-001 0.928 / 0.818 / 0.756 / 0.731, STS-001 T1
  0.759 / 0.759 / 0.770 / 0.770, T2 0.962 / 0.962 / 0.962 / 0.964; CT phantoms (seeds 0-2)
  0.870-0.914 whole against 0.575-0.825 cropped, MR phantoms 0.973-0.979 against 0.924-0.976.
  The model was trained on whole images: cropped CT loses up to 0.3, so the engine encodes
  the whole slice.

One choice is varied at a time from the default (bilinear, index, logits). Cases (from
``../shared/data``, skipped with a note where absent): LUNG1-001 ``GTV-1`` (CT 512x512),
STS-001 MR T1 ``GTV_Mass`` (512x512) and STS-001 MR T2 ``GTV_Mass`` (384x384: the only one
where 256 is not an exact halving, so the resize methods differ).

    .venv/bin/python benchmarks/litemedsam_preprocess.py [--runtime openvino|eager] [--per-slice]

A last table: two positive clicks inside the tumour on its largest slice (the deepest point
of each half along its longer axis), no box, through the segmenter's point rule
(:class:`inference.litemedsam.LiteMedSamSliceSegmenter`), against the box from the truth,
on the real cases and on CT and MR phantoms (``dicom_node.phantom``, seeds 0-2).

The encoder runs through OpenVINO f32 by default (its embeddings match the eager model's
to about 4e-6); ``--runtime eager`` uses the package's PyTorch model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference import litemedsam as lm  # noqa: E402
from inference.preprocess import prepare  # noqa: E402
from inference.propagation import bounding_box  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
CASES = [
    ("LUNG1-001 GTV-1 (CT)", "lung1-001-ct", "CT", "RTSTRUCT", "GTV-1"),
    ("STS-001 T1 GTV_Mass (MR)", "sts-001-mr/MR_T1", "IMAGES", "RTSTRUCT", "GTV_Mass"),
    ("STS-001 T2 GTV_Mass (MR 384)", "sts-001-mr/MR_T2", "IMAGES", "RTSTRUCT", "GTV_Mass"),
]
DEFAULT = {"resize": "bilinear", "box": "index", "mask": "logits", "window": None}
CROP_FACTORS = (6, 4, 3)


def load_case(root: Path, images: str, rtstruct: str, roi: str):
    from rtstruct import rasterize_roi, read_rtstruct
    from rtstruct.series import load_series

    vol = load_series(root / images)
    (rs_file,) = sorted((root / rtstruct).glob("*.dcm"))
    truth = rasterize_roi(read_rtstruct(rs_file).roi(roi), vol.geometry)
    return vol, truth


def dice2d(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def variants(modality: str):
    yield "default (bilinear, index, logits)", dict(DEFAULT)
    for r in lm.RESIZE_METHODS:
        if r != DEFAULT["resize"]:
            yield f"resize {r}", dict(DEFAULT, resize=r)
    for b in lm.BOX_CONVENTIONS:
        if b != DEFAULT["box"]:
            yield f"box {b}", dict(DEFAULT, box=b)
    for m in lm.MASK_METHODS:
        if m != DEFAULT["mask"]:
            yield f"mask {m}", dict(DEFAULT, mask=m)
    if modality == "CT":
        yield "window -600/1500 (lung)", dict(DEFAULT, window=(-600.0, 1500.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", choices=["openvino", "eager"], default="openvino")
    ap.add_argument("--cache-dir", default=None, help="OpenVINO IR cache (default: the engine's)")
    ap.add_argument("--per-slice", action="store_true", help="print every slice's Dice of the default")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    model, info = lm.load_model()
    if args.runtime == "openvino":
        runtime = lm.OpenVinoRuntime(model, info.sha256, cache_root=args.cache_dir, precision="f32")
    else:
        runtime = lm.EagerRuntime(model)
    print(f"LiteMedSAM {info.short}, {lm.PACKAGE} {info.package_version}, runtime {runtime.name}")
    print(f"{'case':30} {'variant':32} {'median':>7} {'mean':>7} {'min':>7} {'slices':>6}")
    real = []
    for label, folder, images, rtstruct, roi in CASES:
        root = SHARED / folder
        if not root.exists():
            print(f"{label:30} skipped: {root} not found")
            continue
        vol, truth = load_case(root, images, rtstruct, roi)
        real.append((label, vol, truth))
        ks = [int(k) for k in np.flatnonzero(truth.any(axis=(1, 2)))]
        lb = lm.Letterbox.for_shape(vol.shape[1:])
        embeddings: dict[tuple, np.ndarray] = {}
        for name, v in variants(vol.modality):
            key = (v["resize"], v["window"])
            if key not in embeddings:
                gray = prepare(vol, v["window"]).gray
                embeddings[key] = runtime.encode(lm.to_model_input(gray[ks], lb, v["resize"]))
            emb = embeddings[key]
            scores = []
            for n, k in enumerate(ks):
                box = bounding_box(truth[k])
                logits, _ = runtime.decode(emb[n], lm.box_to_model(box, lb, v["box"]))
                scores.append(dice2d(lm.mask_from_logits(logits, lb, v["mask"]), truth[k]))
            s = np.array(scores)
            print(
                f"{label:30} {name:32} {np.median(s):7.3f} {s.mean():7.3f} {s.min():7.3f} {len(ks):6d}",
                flush=True,
            )
            if args.per_slice and name.startswith("default"):
                areas = truth[ks].sum(axis=(1, 2))
                print("   per slice (k: Dice, truth pixels): " + ", ".join(
                    f"{k}: {d:.3f} ({a})" for k, d, a in zip(ks, scores, areas)
                ))  # fmt: skip
    context_table(runtime, real)
    points_table(runtime, real)
    return 0


def crop_around(box, shape_yx: tuple[int, int], factor: float) -> tuple[int, int, int, int]:
    """A square ``(a0, b0, a1, b1)`` (half-open) centred on ``box``, its side ``factor`` times the
    box's longest side (at least 64 pixels, at most the slice), shifted to lie inside the slice."""
    i0, j0, i1, j1 = box
    side = int(min(max(max(i1 - i0 + 1, j1 - j0 + 1) * factor, 64), max(shape_yx)))
    a0 = int(round((i0 + i1) / 2 - side / 2))
    b0 = int(round((j0 + j1) / 2 - side / 2))
    a0 = min(max(a0, 0), max(shape_yx[0] - side, 0))
    b0 = min(max(b0, 0), max(shape_yx[1] - side, 0))
    return a0, b0, min(a0 + side, shape_yx[0]), min(b0 + side, shape_yx[1])


def context_table(runtime, real) -> None:
    """Median per-slice Dice (oracle box) with the whole slice and with crops around the box
    as the model input, on the real cases and CT and MR phantoms (seeds 0-2)."""
    from dicom_node.phantom import make_phantom

    cases = list(real)
    for modality in ("CT", "MR"):
        for seed in range(3):
            ph = make_phantom(modality, seed=seed)
            cases.append((f"phantom {modality} seed {seed}", ph.volume, ph.truth))
    factors = (None, *CROP_FACTORS)
    print("\ncontext: the whole slice or a crop around the box as the model input (median per-slice Dice)")
    print(f"{'case':30} " + " ".join(f"{'whole' if f is None else f'crop x{f:g}':>8}" for f in factors))
    for label, vol, truth in cases:
        gray = prepare(vol).gray
        scores: dict = {f: [] for f in factors}
        for k in np.flatnonzero(truth.any(axis=(1, 2))):
            box = bounding_box(truth[k])
            for f in factors:
                a0, b0, a1, b1 = (0, 0, *gray.shape[1:]) if f is None else crop_around(box, gray.shape[1:], f)
                lb = lm.Letterbox.for_shape((a1 - a0, b1 - b0))
                emb = runtime.encode(lm.to_model_input(gray[k : k + 1, a0:a1, b0:b1], lb))
                local = (box[0] - a0, box[1] - b0, box[2] - a0, box[3] - b0)
                logits, _ = runtime.decode(emb[0], lm.box_to_model(local, lb))
                mask = np.zeros(truth[k].shape, bool)
                mask[a0:a1, b0:b1] = lm.mask_from_logits(logits, lb)
                scores[f].append(dice2d(mask, truth[k]))
        print(f"{label:30} " + " ".join(f"{np.median(scores[f]):8.3f}" for f in factors), flush=True)


def two_clicks(mask2d: np.ndarray) -> list[tuple[float, float, bool]]:
    """The deepest point of each half of the mask (split across its longer axis)."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(mask2d)
    ii, jj = np.nonzero(mask2d)
    if np.ptp(jj) >= np.ptp(ii):
        half = np.arange(mask2d.shape[1])[None, :] < jj.mean()
    else:
        half = np.arange(mask2d.shape[0])[:, None] < ii.mean()
    clicks = []
    for h in (mask2d & half, mask2d & ~half):
        i, j = np.unravel_index(int(np.argmax(np.where(h, dist, 0))), mask2d.shape)
        clicks.append((float(i), float(j), True))
    return clicks


def points_table(runtime, real) -> None:
    from dicom_node.phantom import make_phantom

    cases = list(real)
    for modality in ("CT", "MR"):
        for seed in range(3):
            ph = make_phantom(modality, seed=seed)
            cases.append((f"phantom {modality} seed {seed}", ph.volume, ph.truth))
    print(f"\ntwo clicks, no box (margins {', '.join(f'{m:g}' for m in lm.POINT_MARGINS_MM)} mm), largest slice")
    print(f"{'case':30} {'clicks':>7} {'box':>7}")
    for label, vol, truth in cases:
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        seg = lm.LiteMedSamSliceSegmenter(runtime, prepare(vol).gray, vol.spacing[1:], anchor_slices=[k])
        m_pts, _ = seg.segment_slice(k, None, two_clicks(truth[k]))
        m_box, _ = seg.segment_slice(k, bounding_box(truth[k]))
        print(f"{label:30} {dice2d(m_pts, truth[k]):7.3f} {dice2d(m_box, truth[k]):7.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
