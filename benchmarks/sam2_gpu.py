#!/usr/bin/env python3
"""SAM2 and LiteMedSAM throughput: image-encoding slices/s and end-to-end seconds per case.

Two tables:

1. **Encoding**: slices/s of the image encoder as the engine runs it (uint8 slices ->
   resize + normalise on the device -> ``forward_image``), for SAM2.1 tiny at 1024 and at
   512 (the MedSAM2 variant), batch sizes 1..32, float32 vs bfloat16 autocast. On CUDA
   the peak GPU memory of each configuration is shown; an out-of-memory configuration is
   reported as ``OOM`` and the benchmark goes on.
2. **End to end**: seconds of ``Sam2Engine.segment`` (preprocessing, encoding, decoding,
   propagation, post-processing; the model is built before timing) on a synthetic
   200-slice CT volume with a 40-slice tumour, box on its middle slice, in 2D
   (``box2d``) and 3D (``video3d``) modes.

Weights: randomly initialised (seed 0, whose masks do not vanish early, so the walk covers
the tumour and the stop margin like a real model would; ``--max-extent-mm`` bounds it) or
``--checkpoint PATH`` (with the matching ``--model-cfg``).

    .venv/bin/python benchmarks/sam2_gpu.py                      # on a GPU machine
    .venv/bin/python benchmarks/sam2_gpu.py --device cpu --quick  # smoke run, 1-2 min on CPU
    .venv/bin/python benchmarks/sam2_gpu.py --checkpoint MedSAM2_latest.pt --model-cfg sam2.1_hiera_t512

Numbers are only comparable within one run on one machine; the device is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pydicom.uid import CTImageStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.engine import SegmentOptions  # noqa: E402
from inference.geometry import Geometry  # noqa: E402
from inference.prompts import BoxPrompt, TargetPrompts  # noqa: E402
from inference.volume import Volume  # noqa: E402

ENCODE_MODELS = ["sam2.1_hiera_t", "sam2.1_hiera_t512"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    import contextlib

    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# -- encoding ---------------------------------------------------------------------------------
def bench_encoding(model, device, batch_sizes, dtypes, min_slices, warmup) -> list[dict]:
    from inference.sam2_features import encode_batch, slices_to_model_input

    rows = []
    rng = np.random.default_rng(0)
    slices = (rng.random((max(batch_sizes), 512, 512)) * 255).astype(np.uint8)
    for dtype in dtypes:
        for bs in batch_sizes:
            row = {"model": model.name_for_bench, "size": model.image_size, "dtype": dtype, "batch": bs}
            batch = slices[:bs]
            iters = max(1, -(-min_slices // bs))
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                with torch.inference_mode(), autocast(device, dtype):
                    for _ in range(warmup):
                        encode_batch(model, slices_to_model_input(batch, model.image_size, device))
                    sync(device)
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        encode_batch(model, slices_to_model_input(batch, model.image_size, device))
                    sync(device)
                    dt = time.perf_counter() - t0
                row["slices_per_s"] = bs * iters / dt
                row["ms_per_slice"] = 1000.0 * dt / (bs * iters)
                if device.type == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            except torch.cuda.OutOfMemoryError:
                row["slices_per_s"] = None
                row["note"] = "OOM"
                torch.cuda.empty_cache()
            rows.append(row)
            print(
                f"  encode {row['model']:<20} {row['dtype']:<4} batch {bs:>2}: "
                + (f"{row['slices_per_s']:8.2f} slices/s" if row.get("slices_per_s") else row.get("note", "")),
                flush=True,
            )
    return rows


def bench_litemedsam_encoding(device, batch_sizes, dtypes, min_slices, warmup) -> list[dict]:
    """LiteMedSAM's image encoder (the packaged weights, eager PyTorch on ``device``), as its
    engine feeds it: 512x512 uint8 slices letterboxed to 256."""
    from inference import litemedsam as lm

    model, _ = lm.load_model()
    model = model.to(device).eval()
    rows = []
    rng = np.random.default_rng(0)
    slices = (rng.random((max(batch_sizes), 512, 512)) * 255).astype(np.uint8)
    lb = lm.Letterbox.for_shape((512, 512))
    for dtype in dtypes:
        for bs in batch_sizes:
            row = {"model": "litemedsam", "size": lm.IMAGE_SIZE, "dtype": dtype, "batch": bs}
            iters = max(1, -(-min_slices // bs))
            x = torch.from_numpy(lm.to_model_input(slices[:bs], lb)).to(device)
            with torch.inference_mode(), autocast(device, dtype):
                for _ in range(warmup):
                    model.image_encoder(x)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    model.image_encoder(x)
                sync(device)
                dt = time.perf_counter() - t0
            row["slices_per_s"] = bs * iters / dt
            row["ms_per_slice"] = 1000.0 * dt / (bs * iters)
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rows.append(row)
            print(f"  encode litemedsam {dtype:<4} batch {bs:>2}: {row['slices_per_s']:8.2f} slices/s", flush=True)
    return rows


# -- end to end -------------------------------------------------------------------------------
def synthetic_ct(n_slices: int, size: int, tumour_slices: int, slice_mm: float = 2.5, seed: int = 0):
    """A CT-like volume (body, lungs, noise) with an ellipsoid tumour over ``tumour_slices``."""
    rng = np.random.default_rng(seed)
    pixel_mm = 384.0 / size
    yy, xx = np.mgrid[:size, :size]
    cy, cx = (size - 1) / 2.0, (size - 1) / 2.0
    r_mm = np.hypot((yy - cy) * pixel_mm, (xx - cx) * pixel_mm)
    body = np.hypot((yy - cy) * pixel_mm / 0.75, (xx - cx) * pixel_mm) < 170
    lungs = (np.hypot((yy - cy) * pixel_mm / 1.4, (xx - cx - size * 0.2) * pixel_mm) < 60) | (
        np.hypot((yy - cy) * pixel_mm / 1.4, (xx - cx + size * 0.2) * pixel_mm) < 60
    )
    base = np.where(body, 40.0, -1000.0)
    base = np.where(lungs, -850.0, base)
    del r_mm
    array = np.empty((n_slices, size, size), dtype=np.int16)
    truth = np.zeros((n_slices, size, size), dtype=bool)
    kc = n_slices // 2
    tc = (cy, cx + size * 0.2)
    semi_z = tumour_slices / 2.0
    semi_xy = 25.0 / pixel_mm
    for k in range(n_slices):
        dzn = (k - kc + 0.5) / semi_z
        img = base.copy()
        if abs(dzn) < 1:
            r = semi_xy * np.sqrt(1 - dzn**2)
            t = np.hypot(yy - tc[0], xx - tc[1]) < r
            img[t] = 60.0
            truth[k] = t
        array[k] = np.clip(img + rng.normal(0, 12, img.shape), -1024, 3071).astype(np.int16)
    geometry = Geometry(
        shape=(n_slices, size, size),
        spacing=(slice_mm, pixel_mm, pixel_mm),
        origin=np.array([-192.0, -192.0, 0.0]),
        direction=np.eye(3),
    )
    vol = Volume(
        array=array,
        geometry=geometry,
        sop_instance_uids=tuple(f"2.25.{k + 1}" for k in range(n_slices)),
        modality="CT",
        series_instance_uid="2.25.100",
        study_instance_uid="2.25.200",
        frame_of_reference_uid="2.25.300",
        sop_class_uid=CTImageStorage,
    )
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    rows = np.flatnonzero(truth[k].any(axis=1))
    cols = np.flatnonzero(truth[k].any(axis=0))
    margin = max(1, round(4.0 / pixel_mm))
    box = BoxPrompt(k, rows[0] - margin, cols[0] - margin, rows[-1] + margin, cols[-1] + margin)
    return vol, truth, box


def bench_e2e(engine_kwargs, vol, truth, box, modes, max_extent_mm, repeats, name="sam2") -> list[dict]:
    from inference.engine import get_engine

    rows = []
    t0 = time.perf_counter()
    engine = get_engine(name, **engine_kwargs)
    build_s = time.perf_counter() - t0
    prompts = TargetPrompts(target="", output_name="GTV_AI", boxes=[box])
    for mode in modes:
        opts = SegmentOptions(mode=mode, max_extent_mm=max_extent_mm, min_area_fraction=0.0)
        times, result, error = [], None, None
        for _ in range(repeats):
            try:
                t = time.perf_counter()
                result = engine.segment(vol, prompts, opts)
                sync(torch.device(getattr(engine, "device", "cpu")))
                times.append(time.perf_counter() - t)
            except Exception as exc:  # noqa: BLE001 - the benchmark reports and goes on
                error = f"{type(exc).__name__}: {exc}"[:120]
                break
        row = {
            "model": engine.spec.name if name == "sam2" else "litemedsam",
            "mode": mode,
            "build_s": build_s,
            "precision": "bf16" if getattr(engine, "autocast_dtype", None) is not None else "fp32",
            "runtime": getattr(getattr(engine, "runtime", None), "name", "torch"),
        }
        if times:
            n = int(result.mask.any(axis=(1, 2)).sum())
            inter = (result.mask & truth).sum()
            row.update(
                seconds=min(times),
                slices=n,
                slices_per_s=n / min(times),
                dice=float(2 * inter / (result.mask.sum() + truth.sum())),
            )
        else:
            row["note"] = error
        rows.append(row)
        print(
            f"  e2e {row['model']:<20} {mode:<8}: "
            + (f"{row['seconds']:.2f} s for {row['slices']} slices" if times else row["note"]),
            flush=True,
        )
    return rows


# -- main -------------------------------------------------------------------------------------
def print_tables(enc_rows, e2e_rows, device, args) -> None:
    print()
    print(
        f"SAM2 benchmark on {device_name(device)}; torch {torch.__version__}; "
        f"weights: {'checkpoint ' + args.checkpoint if args.checkpoint else 'random (seed 0)'}"
    )
    if enc_rows:
        print("\nImage encoding (uint8 slices -> features, as the engine runs it)")
        head = f"{'model':<20} {'size':>5} {'dtype':<5} {'batch':>5} {'slices/s':>9} {'ms/slice':>9}"
        if device.type == "cuda":
            head += f" {'peak GiB':>9}"
        print(head)
        print("-" * len(head))
        for r in enc_rows:
            line = f"{r['model']:<20} {r['size']:>5} {r['dtype']:<5} {r['batch']:>5} "
            if r.get("slices_per_s"):
                line += f"{r['slices_per_s']:>9.2f} {r['ms_per_slice']:>9.1f}"
                if device.type == "cuda":
                    line += f" {r.get('peak_gib', 0):>9.2f}"
            else:
                line += f"{r.get('note', ''):>9}"
            print(line)
    if e2e_rows:
        print(
            f"\nEnd to end: {args.slices} slices of {args.size}x{args.size}, tumour over "
            f"{args.tumour_slices} slices, max extent {args.max_extent_mm:g} mm (Sam2Engine.segment)"
        )
        head = (
            f"{'model':<20} {'mode':<8} {'prec':<5} {'build s':>8} {'seconds':>8} "
            f"{'slices':>6} {'slices/s':>8} {'dice*':>6}"
        )
        print(head)
        print("-" * len(head))
        for r in e2e_rows:
            line = f"{r['model']:<20} {r['mode']:<8} {r['precision']:<5} {r['build_s']:>8.1f} "
            if "seconds" in r:
                line += f"{r['seconds']:>8.2f} {r['slices']:>6} {r['slices_per_s']:>8.2f} {r['dice']:>6.2f}"
            else:
                line += r.get("note", "")
            print(line)
        if not args.checkpoint:
            print("* Dice against the synthetic truth is meaningless with random weights.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run (1-2 minutes)")
    p.add_argument("--checkpoint", default=None, help="weights for the end-to-end runs (default: random)")
    p.add_argument("--model-cfg", default=None, help="model for the end-to-end runs with --checkpoint")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,2,4,8,16,32; quick: 1,2)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16 (default both; quick on CPU: fp32)")
    p.add_argument(
        "--engine-batch", type=int, default=None, help="engine batch size for end to end (default 16 on CUDA, 4 on CPU)"
    )
    p.add_argument("--slices", type=int, default=None, help="end-to-end volume slices (default 200; quick 16)")
    p.add_argument("--size", type=int, default=None, help="end-to-end slice size (default 512; quick 128)")
    p.add_argument("--tumour-slices", type=int, default=None, help="default 40; quick 6")
    p.add_argument(
        "--max-extent-mm",
        type=float,
        default=None,
        help="propagation limit (default: half the tumour + 10 mm, so a random model covers the tumour)",
    )
    p.add_argument("--repeats", type=int, default=None, help="end-to-end repeats, best kept (default 2; quick 1)")
    p.add_argument(
        "--encode-models",
        default=",".join(ENCODE_MODELS),
        help=f"models for the encoding table (default {','.join(ENCODE_MODELS)})",
    )
    p.add_argument("--skip-encode", action="store_true")
    p.add_argument("--skip-litemedsam", action="store_true", help="no LiteMedSAM rows (encoding and end to end)")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from inference.engines.sam2 import resolve_device
    from inference.sam2_models import build_model

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    quick = args.quick
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if quick else "1,2,4,8,16,32")).split(",")]
    dtypes = (args.dtypes or ("fp32" if quick and not cuda else "fp32,bf16")).split(",")
    for d in dtypes:
        if d not in ("fp32", "bf16"):
            p.error(f"unknown dtype {d!r}")
    args.slices = args.slices or (16 if quick else 200)
    args.size = args.size or (128 if quick else 512)
    args.tumour_slices = args.tumour_slices or (6 if quick else 40)
    slice_mm = 2.5
    args.max_extent_mm = args.max_extent_mm or (args.tumour_slices / 2 * slice_mm + 10.0)
    repeats = args.repeats or (1 if quick else 2)
    engine_batch = args.engine_batch or (16 if cuda else 4)
    if not cuda:
        print("note: no CUDA device: running on the CPU; these numbers say nothing about GPU speed", flush=True)

    enc_rows: list[dict] = []
    if not args.skip_encode:
        for name in args.encode_models.split(","):
            model = build_model(name, device=device, seed=0)
            model.name_for_bench = name
            sizes = batch_sizes
            if quick and model.image_size > 512:
                sizes = batch_sizes[:1]  # one batch size at 1024 keeps the CPU run short
            min_slices = 1 if quick else 64
            enc_rows += bench_encoding(model, device, sizes, dtypes, min_slices=min_slices, warmup=1)
            del model
            if cuda:
                torch.cuda.empty_cache()
        if not args.skip_litemedsam:
            enc_rows += bench_litemedsam_encoding(device, batch_sizes, dtypes, 1 if quick else 64, warmup=1)

    e2e_rows: list[dict] = []
    if not args.skip_e2e:
        vol, truth, box = synthetic_ct(args.slices, args.size, args.tumour_slices, slice_mm)
        if args.checkpoint:
            configs = [dict(checkpoint=args.checkpoint, model_cfg=args.model_cfg or "sam2.1_hiera_t512")]
        else:
            names = ["sam2.1_hiera_t512"] if quick else ["sam2.1_hiera_t512", "sam2.1_hiera_t"]
            configs = [dict(model_cfg=n, allow_random_weights=True, random_seed=0) for n in names]
        precisions = ["bf16"] if cuda else ["fp32"]
        if cuda and not quick:
            precisions = ["bf16", "fp32"]
        for cfg in configs:
            for prec in precisions:
                kwargs = dict(
                    cfg,
                    device=str(device),
                    batch_size=engine_batch,
                    precision=prec,
                    object_score_stop=bool(args.checkpoint),
                )
                e2e_rows += bench_e2e(kwargs, vol, truth, box, ["box2d", "video3d"], args.max_extent_mm, repeats)
        if not args.skip_litemedsam:  # the real pretrained weights: its Dice means something
            kwargs = {"device": str(device)} if cuda else {}
            e2e_rows += bench_e2e(kwargs, vol, truth, box, ["box2d"], args.max_extent_mm, repeats, name="litemedsam")

    print_tables(enc_rows, e2e_rows, device, args)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device_name(device), "encode": enc_rows, "e2e": e2e_rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
