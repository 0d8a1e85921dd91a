#!/usr/bin/env python3
"""Where does a tumour end? Stop rules of the 2D walk, measured (a research script, not a test).

A stop rule only *truncates* a walk: up to the slice where it fires, the walk is the same
as a walk that never stops (the next box comes from the previous mask either way). So each
case is walked once per direction without any stop (up to ``--extent-mm`` from the prompted
slice), every slice's evidence is recorded (the model's predicted IoU, area, overlap with
the previous slice, how much of the box the mask fills, intensity agreement with the
prompted slice's mask), and every candidate rule is then scored by truncating the recorded
walks: 3D Dice, HD95 and the slices past the truth's ends, per case and as medians.

    .venv/bin/python benchmarks/stop_rules.py SRC [--engine litemedsam] [--cache DIR] [--slice largest]

``SRC`` is a study folder (``dicom-node study``'s layout: ``SRC/<dataset>/...``). The recorded
walks are cached in ``--cache`` (one NPZ per case and prompt), so rules can be re-scored
without running the model again. The rule finally chosen is measured again end to end with
``dicom-node study`` (the node's own code path).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.research.cases import load_dicom_case, load_npz_case, scan  # noqa: E402
from dicom_node.research.simulate import PromptSpec, case_rng, simulate_prompts  # noqa: E402
from inference.limits import WalkLimits  # noqa: E402
from inference.metrics import dice, hd95  # noqa: E402
from inference.propagation import bounding_box, expand_box, postprocess  # noqa: E402


@dataclass
class Step:
    """One slice of a recorded walk."""

    k: int
    mask: np.ndarray
    score: float | None
    box: tuple[float, float, float, float]


def _segmenter(engine_name: str, volume, prompts, window):
    from inference import preprocess
    from inference.engine import get_engine

    images = preprocess.prepare(volume, window)
    if engine_name == "litemedsam":
        from inference import litemedsam as lm

        engine = get_engine("litemedsam")
        seg = lm.LiteMedSamSliceSegmenter(
            engine.runtime,
            images.gray,
            (volume.spacing[1], volume.spacing[2]),
            anchor_slices=prompts.anchor_slices,
            cache_slices=4096,
            batch_size=1,
            point_margins_mm=engine.point_margins_mm,
        )
        return seg, images.gray
    raise SystemExit(f"engine {engine_name} is not supported by this script")


def record_walk(segmenter, shape, spacing, prompts, extent_mm: float, margin_mm: float) -> dict:
    """The anchor's mask and both unstopped walks: {"anchor": (k, mask, score), "up": [Step], "down": [Step]}."""
    nz, ny, nx = shape
    dz, dy, dx = spacing
    (k0,) = prompts.anchor_slices
    box = None
    if prompts.boxes:
        b = prompts.boxes[0]
        box = (b.i0, b.j0, b.i1, b.j1)
    points = [(p.i, p.j, p.positive) for p in prompts.points]
    m0, s0 = segmenter.segment_slice(k0, box, points)
    out = {"anchor": (k0, np.asarray(m0, bool), s0), "up": [], "down": []}
    for direction, step in (("up", 1), ("down", -1)):
        prev = out["anchor"][1]
        k = k0 + step
        while 0 <= k < nz and abs(k - k0) * dz <= extent_mm + 1e-6 and prev.any():
            b = expand_box(bounding_box(prev), margin_mm, (dy, dx), (ny, nx))
            m, s = segmenter.segment_slice(k, b, ())
            m = np.asarray(m, bool)
            out[direction].append(Step(k, m, None if s is None else float(s), b))
            prev = m
            k += step
    return out


def save_walk(path: Path, walk: dict) -> None:
    k0, m0, s0 = walk["anchor"]
    arrays = {"anchor": np.packbits(m0, axis=-1), "meta": np.array(json.dumps({
        "k0": k0, "s0": s0, "nx": int(m0.shape[1]),
        "up": [(st.k, st.score, st.box) for st in walk["up"]],
        "down": [(st.k, st.score, st.box) for st in walk["down"]],
    }))}  # fmt: skip
    for d in ("up", "down"):
        if walk[d]:
            arrays[d] = np.packbits(np.stack([st.mask for st in walk[d]]), axis=-1)
    np.savez_compressed(path, **arrays)


def load_walk(path: Path) -> dict:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        nx = meta["nx"]
        m0 = np.unpackbits(z["anchor"], axis=-1, count=nx).astype(bool)
        walk = {"anchor": (meta["k0"], m0, meta["s0"]), "up": [], "down": []}
        for d in ("up", "down"):
            if meta[d]:
                masks = np.unpackbits(z[d], axis=-1, count=nx).astype(bool)
                walk[d] = [Step(k, masks[i], s, tuple(b)) for i, (k, s, b) in enumerate(meta[d])]
    return walk


# -- evidence ---------------------------------------------------------------------------------
def evidence(walk: dict, gray: np.ndarray, pixel_mm2: float) -> dict[str, list[dict]]:
    """Per direction, one dict of signals per recorded slice."""
    k0, m0, s0 = walk["anchor"]
    a_vals = gray[k0][m0].astype(np.float32)
    a_mean = float(a_vals.mean()) if a_vals.size else 0.0
    a_std = float(a_vals.std()) + 1.0 if a_vals.size else 1.0
    lo, hi = np.percentile(a_vals, [5, 95]) if a_vals.size else (0, 0)
    a_area = float(m0.sum()) * pixel_mm2
    out = {}
    for direction in ("up", "down"):
        rows = []
        prev = m0
        prev_area = a_area
        peak = a_area
        for st in walk[direction]:
            m = st.mask
            area = float(m.sum()) * pixel_mm2
            inter = float((m & prev).sum())
            vals = gray[st.k][m].astype(np.float32)
            i0, j0, i1, j1 = st.box
            box_area = (i1 - i0 + 1) * (j1 - j0 + 1) * pixel_mm2
            rows.append(
                {
                    "k": st.k,
                    "area": area,
                    "score": st.score,
                    "rel_prev": area / prev_area if prev_area else 0.0,
                    "rel_anchor": area / a_area if a_area else 0.0,
                    "rel_peak": area / peak if peak else 0.0,
                    "inside_prev": inter / m.sum() if m.any() else 0.0,  # share of this mask on the previous one
                    "iou_prev": inter / float((m | prev).sum()) if (m | prev).any() else 0.0,
                    "fill": area / box_area if box_area else 0.0,
                    "z_int": abs(float(vals.mean()) - a_mean) / a_std if vals.size else 99.0,
                    "in_range": float(((vals >= lo) & (vals <= hi)).mean()) if vals.size else 0.0,
                }
            )
            prev, prev_area = m, area
            peak = max(peak, area)
        out[direction] = rows
    return out


# -- rules ------------------------------------------------------------------------------------
def make_rules() -> dict[str, callable]:
    """Candidate rules: row -> True where the walk must stop (that slice is not kept)."""
    rules: dict[str, callable] = {
        "naive: vanish or < 5% of anchor": lambda r: r["area"] == 0 or r["rel_anchor"] < 0.05,
    }
    for t in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85):
        rules[f"score < {t}"] = lambda r, t=t: r["area"] == 0 or (r["score"] or 0) < t
    for t in (0.3, 0.5, 0.6, 0.7):
        rules[f"inside_prev < {t}"] = lambda r, t=t: r["area"] == 0 or r["inside_prev"] < t
    for t in (1.2, 1.3, 1.5):
        rules[f"rel_prev > {t}"] = lambda r, t=t: r["area"] == 0 or r["rel_prev"] > t
    for t in (0.5, 0.7, 0.8):
        rules[f"in_range < {t}"] = lambda r, t=t: r["area"] == 0 or r["in_range"] < t
    for t in (1.0, 1.5, 2.0):
        rules[f"z_int > {t}"] = lambda r, t=t: r["area"] == 0 or r["z_int"] > t
    for t in (0.2, 0.3):
        rules[f"rel_anchor < {t}"] = lambda r, t=t: r["area"] == 0 or r["rel_anchor"] < t

    # combinations: the model's confidence, intensity agreement, overlap with the previous slice
    def any_of(*conds):
        return lambda r: r["area"] == 0 or r["rel_anchor"] < 0.05 or any(c(r) for c in conds)

    def score_below(t):
        return lambda r: (r["score"] if r["score"] is not None else 1.0) < t

    for zs in (1.5, 2.0, 2.5):
        for sc in (0.6, 0.65, 0.7):
            rules[f"z_int > {zs} | score < {sc}"] = any_of(lambda r, z=zs: r["z_int"] > z, score_below(sc))
            rules[f"z_int > {zs} | score < {sc} | inside_prev < 0.6"] = any_of(
                lambda r, z=zs: r["z_int"] > z, score_below(sc), lambda r: r["inside_prev"] < 0.6
            )
    for ir in (0.5, 0.6):
        rules[f"in_range < {ir} | score < 0.7"] = any_of(lambda r, t=ir: r["in_range"] < t, score_below(0.7))
    return rules


def apply_rule(walk: dict, ev: dict, rule, shape) -> tuple[np.ndarray, dict[str, int | None]]:
    """The 3D mask of a walk truncated where ``rule`` fires first; the stop slice per direction."""
    k0, m0, _ = walk["anchor"]
    mask = np.zeros(shape, bool)
    mask[k0] = m0
    stops: dict[str, int | None] = {}
    for direction in ("up", "down"):
        stops[direction] = None
        for st, row in zip(walk[direction], ev[direction], strict=True):
            if rule(row):
                stops[direction] = st.k
                break
            mask[st.k] = st.mask
    return postprocess(mask, {k0: m0}), stops


def past_ends(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """(slices beyond the truth's ends, slices of the truth's extent not reached)."""
    pk = np.flatnonzero(pred.any(axis=(1, 2)))
    tk = np.flatnonzero(truth.any(axis=(1, 2)))
    if pk.size == 0:
        return 0, int(tk.size)
    over = max(0, int(tk[0] - pk[0])) + max(0, int(pk[-1] - tk[-1]))
    under = max(0, int(pk[0] - tk[0])) + max(0, int(tk[-1] - pk[-1]))
    return over, under


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("--engine", default="litemedsam")
    ap.add_argument("--cache", default="/tmp/stop-rules-cache")
    ap.add_argument("--slice", default="largest", choices=["largest", "middle"])
    ap.add_argument("--jitter", type=float, default=0.0)
    ap.add_argument("--prompt", default="box", choices=["box", "points"])
    ap.add_argument(
        "--extent-mm",
        type=float,
        default=WalkLimits().max_extent_mm,
        help="how far each unstopped walk goes (default: the node's max_extent_mm, so that an overrun is counted whole)",
    )
    ap.add_argument("--margin-mm", type=float, default=3.0)
    ap.add_argument("--roi", default="^(GTV-1|GTV_Mass|GTV)$")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", help="write per-slice evidence of every case to this JSON file")
    args = ap.parse_args(argv)

    import re

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    found = scan(args.src)
    loaded = [load_dicom_case(c, re.compile(args.roi)) for c in found.cases] + [
        load_npz_case(n, re.compile(args.roi)) for n in found.npz
    ]
    spec = PromptSpec(kind=args.prompt, slice=args.slice, jitter_mm=args.jitter, positives=2, negatives=1)
    cases = []
    for lc in loaded:
        for name, truth in lc.labels:
            key = (
                f"{lc.dataset}-{lc.name}-{name}-{args.prompt}-{args.slice}-{args.jitter}-{args.seed}-{args.margin_mm}"
                f"-{args.extent_mm:g}"
            )
            prompts = simulate_prompts(truth, lc.volume.spacing, spec, case_rng(args.seed, lc.dataset, lc.name, name))
            path = cache / f"{args.engine}-{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.npz"
            vol = lc.volume
            from inference import preprocess

            gray = preprocess.prepare(vol, None).gray
            if path.exists():
                walk = load_walk(path)
                seconds = 0.0
            else:
                seg, gray = _segmenter(args.engine, vol, prompts, None)
                t0 = time.perf_counter()
                walk = record_walk(seg, vol.shape, vol.spacing, prompts, args.extent_mm, args.margin_mm)
                seconds = time.perf_counter() - t0
                save_walk(path, walk)
            ev = evidence(walk, gray, vol.spacing[1] * vol.spacing[2])
            print(
                f"{lc.dataset}/{lc.name}/{name}: walk {len(walk['up'])}+{len(walk['down'])} slices in {seconds:.1f} s",
                file=sys.stderr,
            )
            cases.append((lc.dataset, f"{lc.name}/{name}", walk, ev, truth, vol.spacing))
    if args.dump:
        Path(args.dump).write_text(
            json.dumps(
                {
                    f"{d}/{n}": {
                        "anchor": w["anchor"][0],
                        "truth_slices": [int(k) for k in np.flatnonzero(t.any(axis=(1, 2)))],
                        **e,
                    }
                    for d, n, w, e, t, _ in cases
                }
            )
        )
    rules = make_rules()
    print(
        f"{'rule':50s} {'phantoms: Dice':>14s} {'min':>6s} {'HD95':>5s} {'max':>5s} {'over':>4s} {'under':>5s}"
        "   real cases: Dice/HD95 mm/slices over/under"
    )
    for rname, rule in rules.items():
        ph, real = [], []
        for dataset, _name, walk, ev, truth, spacing in cases:
            pred, _ = apply_rule(walk, ev, rule, truth.shape)
            row = (dice(pred, truth), hd95(pred, truth, spacing), *past_ends(pred, truth))
            (ph if dataset.startswith("phantom") else real).append((dataset, row))
        line = f"{rname:50s}"
        if ph:
            d = np.array([r[0] for _, r in ph])
            h = np.array([r[1] for _, r in ph])
            line += f" {np.median(d):14.3f} {d.min():6.3f} {np.median(h):5.1f} {h.max():5.1f}"
            line += f" {sum(r[2] for _, r in ph):4d} {sum(r[3] for _, r in ph):5d}"
        line += "   " + " ".join(f"{ds}:{r[0]:.3f}/{r[1]:.1f}/{r[2]}/{r[3]}" for ds, r in real)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
