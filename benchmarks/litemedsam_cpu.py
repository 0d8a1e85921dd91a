#!/usr/bin/env python3
"""LiteMedSAM on the CPU: per-slice encoder and decoder time of each runtime against the
package's eager PyTorch model in the same run, the masks' agreement, and a 40-slice walk.

Table 1, per slice: every variant encodes the same slices and decodes the same boxes (a box
from the truth on each slice), interleaved slice by slice so that load from other processes
falls on all variants alike. Columns: encoder and decoder seconds per slice (medians), the
ratio of the eager model's encoder+decoder time to the variant's, and the Dice of the
variant's masks against the eager model's masks (3D over the slices, and the lowest slice).
Variants (those whose runtime is missing are listed as skipped):

* ``eager``: the package's modules as they are (torch threads as configured, default all cores);
* ``eager 1 thread``: the same with ``torch.set_num_threads(1)``;
* ``eager batch of 4``: 4 slices per encoder call (the time split among them);
* ``eager bf16``: ``torch.autocast("cpu", torch.bfloat16)`` around the encoder;
* ``torch.compile``: inductor on the encoder (``--variants`` only: it compiles for minutes);
* ``openvino f32`` (the engine's default on the CPU), the same on 1 thread, ``openvino bf16``;
* ``openvino f32+bf16 tail``: the encoder split after its third stage, the first part
  compiled in f32 and the last stage with the neck in bf16 (where bf16's error comes from:
  every stage adds some, so only the tail can run in bf16 and keep the masks);
* ``onnxruntime f32``: the encoder exported with ``torch.onnx.export`` (needs ``onnx``),
  eager decoder;
* ``openvino int8``: NNCF post-training quantisation of the encoder (needs ``nncf``),
  calibrated on other slices of the same volume.

Lines 2, end to end: :class:`~inference.engines.litemedsam.LiteMedSamEngine` ``segment``
(preprocessing, encoding, decoding, walk, post-processing; the engine is built before timing)
on a 512x512 CT phantom (``dicom_node.phantom``) whose tumour spans 40 slices, box on its
largest slice, the walk bounded (``max_extent_mm``) to the tumour's slices: seconds, slices,
seconds per slice, for the default engine and the eager one, with the Dice of the default's
3D mask against the eager one's; and once more with the walk not bounded (how far the
propagation's own stop rules let it run).

Slices: the tumour slices of LUNG1-001 ``GTV-1`` and STS-001 MR T1 ``GTV_Mass`` from
``../shared/data`` when present, else the phantom's. ``--quick``: one slice of a phantom, eager
against OpenVINO f32, a 3-slice walk with the default engine (a smoke run of well under a
minute once the OpenVINO cache exists; its numbers mean little).

    .venv/bin/python benchmarks/litemedsam_cpu.py [--quick] [--variants eager,openvino-f32,...]

Numbers are only comparable within one run on one machine (other processes on a shared
machine slow every variant, not always equally): the ratio is the measurement.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference import litemedsam as lm  # noqa: E402
from inference.preprocess import prepare  # noqa: E402
from inference.propagation import bounding_box  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
ALL_VARIANTS = [
    "eager",
    "eager-1thread",
    "eager-batch4",
    "eager-bf16",
    "torch-compile",
    "openvino-f32",
    "openvino-f32-1thread",
    "openvino-bf16",
    "openvino-bf16-tail",
    "onnxruntime-f32",
    "openvino-int8",
]
DEFAULT_VARIANTS = [v for v in ALL_VARIANTS if v != "torch-compile"]
LABELS = {
    "eager": "eager (reference)",
    "eager-1thread": "eager 1 thread",
    "eager-batch4": "eager batch of 4",
    "eager-bf16": "eager bf16 autocast",
    "torch-compile": "torch.compile",
    "openvino-f32": "openvino f32",
    "openvino-f32-1thread": "openvino f32 1 thread",
    "openvino-bf16": "openvino bf16",
    "openvino-bf16-tail": "openvino f32+bf16 tail",
    "onnxruntime-f32": "onnxruntime f32",
    "openvino-int8": "openvino int8 (nncf)",
}


class Skip(Exception):
    pass


# -- variants -------------------------------------------------------------------------------


class ThreadsRuntime(lm.EagerRuntime):
    def __init__(self, model, threads: int):
        super().__init__(model)
        self.threads = threads
        self.name = f"eager {threads} thread"

    def _with_threads(self, fn, *args):
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(old)

    def encode(self, images):
        return self._with_threads(super().encode, images)

    def decode(self, embedding, box):
        return self._with_threads(super().decode, embedding, box)


class Bf16Runtime(lm.EagerRuntime):
    name = "eager bf16"

    def encode(self, images):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
            return self.model.image_encoder(x).float().numpy()


class CompiledRuntime(lm.EagerRuntime):
    name = "torch.compile"

    def __init__(self, model):
        super().__init__(model)
        self.encoder = torch.compile(model.image_encoder)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.encoder(torch.zeros(1, 3, lm.IMAGE_SIZE, lm.IMAGE_SIZE))
        self.compile_s = time.perf_counter() - t0

    def encode(self, images):
        with torch.inference_mode():
            return self.encoder(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()


class OrtRuntime(lm.EagerRuntime):
    name = "onnxruntime f32"

    def __init__(self, model, workdir: Path):
        super().__init__(model)
        try:
            import onnx  # noqa: F401
            import onnxruntime as ort
        except ImportError as exc:
            raise Skip(f"needs onnx and onnxruntime ({exc.name} is not installed)") from None
        path = workdir / "encoder.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.image_encoder,
                (torch.zeros(1, 3, lm.IMAGE_SIZE, lm.IMAGE_SIZE),),
                str(path),
                dynamo=False,
                input_names=["image"],
                output_names=["embedding"],
                opset_version=17,
            )
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def encode(self, images):
        images = np.ascontiguousarray(images, dtype=np.float32)
        return np.concatenate([self.session.run(None, {"image": images[n : n + 1]})[0] for n in range(len(images))])


class SplitRuntime(lm.EagerRuntime):
    """The encoder as two OpenVINO models: stages ``< split`` in f32, the rest and the neck in bf16."""

    name = "openvino f32+bf16 tail"

    def __init__(self, model, split: int = 3):
        import openvino as ov

        super().__init__(model)
        enc = model.image_encoder.eval()

        class Head(torch.nn.Module):
            def forward(self, x):
                x = enc.patch_embed(x)
                for layer in enc.layers[:split]:
                    x = layer(x)
                return x

        class Tail(torch.nn.Module):
            def forward(self, x):
                for layer in enc.layers[split:]:
                    x = layer(x)
                b, _, c = x.size()
                side = lm.EMBEDDING_SHAPE[1]
                return enc.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))

        x0 = torch.zeros(1, 3, lm.IMAGE_SIZE, lm.IMAGE_SIZE)
        core = ov.Core()
        parts = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for part, precision in ((Head(), "f32"), (Tail(), "bf16")):
                ir = ov.convert_model(torch.jit.trace(part, x0, check_trace=False), example_input=x0)
                parts.append(core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": precision}))
                x0 = part(x0)
        self.head, self.tail = parts

    def encode(self, images):
        images = np.ascontiguousarray(images, dtype=np.float32)
        out = []
        for n in range(len(images)):
            mid = self.head(images[n : n + 1])[0]
            out.append(np.asarray(self.tail(mid)[0]))
        return np.concatenate(out)


class Int8Runtime:
    name = "openvino int8"

    def __init__(self, fp32: lm.OpenVinoRuntime, calibration: np.ndarray):
        try:
            import nncf
        except ImportError:
            raise Skip("needs nncf (not installed)") from None
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(fp32.folder / "encoder.xml"))
        data = nncf.Dataset([calibration[n : n + 1] for n in range(len(calibration))])
        quantized = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
        self.encoder = core.compile_model(quantized, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        self.fp32 = fp32

    def encode(self, images):
        return np.concatenate([self.encoder(images[n : n + 1])[0] for n in range(len(images))])

    def decode(self, embedding, box):
        return self.fp32.decode(embedding, box)


# -- data -----------------------------------------------------------------------------------


def load_real(folder: str, images: str, roi: str):
    from rtstruct import rasterize_roi, read_rtstruct
    from rtstruct.series import load_series

    root = SHARED / folder
    vol = load_series(root / images)
    (rs_file,) = sorted((root / "RTSTRUCT").glob("*.dcm"))
    return vol, rasterize_roi(read_rtstruct(rs_file).roi(roi), vol.geometry)


def phantom(tumour_slices: int, size: int, seed: int = 0):
    """A CT phantom whose tumour spans about ``tumour_slices`` slices (the slice spacing is
    chosen for it: the phantom's tumour is about 25 mm long, its volume 60 mm)."""
    from dicom_node.phantom import make_phantom

    dz = 25.0 / tumour_slices
    n = int(np.ceil(60.0 / dz))
    ph = make_phantom("CT", seed, shape=(n, size, size), spacing=(dz, 384.0 / size, 384.0 / size))
    return ph


def slice_sets(quick: bool):
    """(label, model inputs (n,3,256,256), boxes in the 256 frame, letterbox, calibration inputs)."""
    sets = []
    cases = (
        []
        if quick
        else [
            ("LUNG1-001 CT", "lung1-001-ct", "CT", "GTV-1"),
            ("STS-001 MR T1", "sts-001-mr/MR_T1", "IMAGES", "GTV_Mass"),
        ]
    )
    for label, folder, images, roi in cases:
        if not (SHARED / folder).exists():
            print(f"note: {label} skipped ({SHARED / folder} not found)")
            continue
        vol, truth = load_real(folder, images, roi)
        sets.append((label, vol, truth))
    if not sets:
        ph = phantom(4 if quick else 20, 128 if quick else 256)
        sets.append(("phantom CT", ph.volume, ph.truth))
    out = []
    for label, vol, truth in sets:
        ks = [int(k) for k in np.flatnonzero(truth.any(axis=(1, 2)))]
        if quick:
            ks = ks[len(ks) // 2 : len(ks) // 2 + 1]
        gray = prepare(vol).gray
        lb = lm.Letterbox.for_shape(vol.shape[1:])
        x = lm.to_model_input(gray[ks], lb)
        boxes = [lm.box_to_model(bounding_box(truth[k]), lb) for k in ks]
        others = [k for k in range(0, vol.shape[0], 7) if k not in ks][:8]
        out.append((label, x, boxes, lb, lm.to_model_input(gray[others], lb)))
    return out


# -- measurements ---------------------------------------------------------------------------


def cpu_features() -> str:
    """The vector and matrix instruction sets that decide f32/bf16/int8 speed (Linux; else unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def encoder_gflop(model) -> float:
    """Floating-point operations of one slice through the image encoder (PyTorch's counter), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.image_encoder(torch.zeros(1, 3, lm.IMAGE_SIZE, lm.IMAGE_SIZE))
    return counter.get_total_flops() / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """This machine's matrix-multiply rate (PyTorch, all its threads, best of ``repeats``) in
    f32 and bf16, GFLOP/s: the practical ceiling any runtime's encoder meets in that precision."""
    rates = {}
    for label, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        rates[label] = 2.0 * n**3 / best / 1e9
    return rates


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def build(name: str, model, info, args, workdir: Path, calibration: np.ndarray):
    if name == "eager":
        return lm.EagerRuntime(model)
    if name == "eager-1thread":
        return ThreadsRuntime(model, 1)
    if name == "eager-batch4":
        rt = lm.EagerRuntime(model)
        rt.batch = 4
        return rt
    if name == "eager-bf16":
        return Bf16Runtime(model)
    if name == "torch-compile":
        return CompiledRuntime(model)
    if name.startswith("openvino"):
        if not lm.openvino_available():
            raise Skip("openvino is not installed")
        if name == "openvino-bf16-tail":
            return SplitRuntime(model)
        if name == "openvino-int8":
            fp32 = lm.OpenVinoRuntime(model, info.sha256, cache_root=args.cache_dir, precision="f32")
            return Int8Runtime(fp32, calibration)
        threads = 1 if name.endswith("1thread") else None
        return lm.OpenVinoRuntime(
            model, info.sha256, cache_root=args.cache_dir, precision=name.split("-")[1], threads=threads
        )
    if name == "onnxruntime-f32":
        return OrtRuntime(model, workdir)
    raise ValueError(name)


def per_slice_table(model, info, args, workdir: Path) -> None:
    sets = slice_sets(args.quick)
    calibration = np.concatenate([s[4] for s in sets])
    runtimes, skipped = {}, {}
    for name in args.variants:
        t0 = time.perf_counter()
        try:
            runtimes[name] = build(name, model, info, args, workdir, calibration)
        except Skip as exc:
            skipped[name] = str(exc)
            continue
        print(f"built {LABELS[name]} in {time.perf_counter() - t0:.1f} s", flush=True)
    enc_t = {n: [] for n in runtimes}
    dec_t = {n: [] for n in runtimes}
    masks = {n: [] for n in runtimes}
    for rt in runtimes.values():  # warm-up
        e = rt.encode(sets[0][1][:1])
        rt.decode(e[0], sets[0][2][0])
    for _label, x, boxes, lb, _ in sets:
        pending: dict[str, list] = {name: [] for name in runtimes}
        for n in range(len(x)):
            for name, rt in runtimes.items():
                batch = getattr(rt, "batch", 1)
                if n % batch == 0:  # encode the next batch (its time shared by its slices)
                    chunk = x[n : n + batch]
                    t0 = time.perf_counter()
                    pending[name] = list(rt.encode(chunk))
                    per = (time.perf_counter() - t0) / len(chunk)
                    enc_t[name].extend([per] * len(chunk))
                emb = pending[name].pop(0)
                t1 = time.perf_counter()
                logits, _ = rt.decode(emb, boxes[n])
                dec_t[name].append(time.perf_counter() - t1)
                masks[name].append(lm.mask_from_logits(logits, lb))
        print(f"measured {len(x)} slices of {_label}", flush=True)
    slices = sum(len(s[1]) for s in sets)
    print(f"\nper slice: {slices} slices ({', '.join(f'{s[0]} {len(s[1])}' for s in sets)}), box from the truth")
    print(
        f"{'variant':24} {'encoder s':>10} {'decoder s':>10} {'total s':>8} {'ratio':>6} {'Dice 3D':>8} "
        f"{'min slice':>9} {'GFLOP/s':>8}"
    )
    ref = "eager" if "eager" in runtimes else next(iter(runtimes))
    ref_total = np.median(enc_t[ref]) + np.median(dec_t[ref])
    ref_masks = np.stack(masks[ref])
    for name in args.variants:
        if name in skipped:
            print(f"{LABELS[name]:24} skipped: {skipped[name]}")
            continue
        e, d = float(np.median(enc_t[name])), float(np.median(dec_t[name]))
        m = np.stack(masks[name])
        per = [dice(a, b) for a, b in zip(m, ref_masks)]
        print(
            f"{LABELS[name]:24} {e:10.3f} {d:10.3f} {e + d:8.3f} {ref_total / (e + d):6.2f} "
            f"{dice(m, ref_masks):8.4f} {min(per):9.4f} {args.encoder_gflop / e:8.0f}"
        )
    print(
        f"(ratio and Dice against {LABELS[ref]}; medians over the slices; GFLOP/s: the encoder's "
        f"{args.encoder_gflop:.1f} GFLOP per slice over its time)"
    )
    rates = matmul_gflops(512 if args.quick else 2048)
    print(
        f"ceiling: this machine multiplies matrices at {rates['f32']:.0f} GFLOP/s in f32 and {rates['bf16']:.0f} "
        f"in bf16 ({torch.get_num_threads()} threads), so the encoder alone needs at least "
        f"{args.encoder_gflop / rates['f32']:.3f} s per slice in f32 and {args.encoder_gflop / rates['bf16']:.3f} s "
        "in bf16"
    )


def end_to_end(args) -> None:
    from inference.engine import SegmentOptions
    from inference.engines.litemedsam import LiteMedSamEngine
    from inference.prompts import TargetPrompts

    n = 4 if args.quick else args.tumour_slices
    ph = phantom(n, 128 if args.quick else 512)
    zs = np.flatnonzero(ph.truth.any(axis=(1, 2)))
    dz = ph.volume.spacing[0]
    k = ph.box.slice_index
    # the walk is bounded to the tumour's slices (the stop rules are not what is measured here)
    extent = (1 if args.quick else max(k - zs[0], zs[-1] - k)) * dz
    prompts = TargetPrompts("", "GTV_AI", boxes=[ph.box])
    configs = [("default", {}, extent)]
    if not args.quick:
        configs += [("eager", {"runtime": "eager"}, extent), ("default, walk not bounded", {}, 1e9)]
    print(
        f"\nend to end: phantom CT {ph.volume.shape[0]} slices of {ph.volume.shape[1]}x{ph.volume.shape[2]}, "
        f"tumour on {len(zs)} slices {zs[0]}..{zs[-1]} ({dz:.3f} mm), box on slice {k}, walk bounded to "
        f"{extent:.2f} mm from it"
    )
    results = {}
    for label, extra, max_extent in configs:
        engine = LiteMedSamEngine(cache_dir=args.cache_dir, **extra)
        t0 = time.perf_counter()
        res = engine.segment(ph.volume, prompts, SegmentOptions(max_extent_mm=max_extent))
        seconds = time.perf_counter() - t0
        results[label] = res
        ks = np.flatnonzero(res.mask.any(axis=(1, 2)))
        vs = (
            f"Dice vs eager {dice(res.mask, results['eager'].mask):.4f}; "
            if "eager" in results and label != "eager"
            else ""
        )
        print(
            f"end to end, {len(zs)}-slice tumour, {label} ({engine.runtime.name}): {seconds:.1f} s for "
            f"{len(ks)} slices {ks[0]}..{ks[-1]} ({seconds / max(len(ks), 1):.3f} s/slice); {vs}"
            f"Dice vs truth {dice(res.mask, ph.truth):.3f}",
            flush=True,
        )
    if "eager" in results:
        d = dice(results["default"].mask, results["eager"].mask)
        print(f"end to end: default vs eager masks Dice {d:.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 slice of a phantom, a 3-slice walk")
    ap.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {','.join(ALL_VARIANTS)} (default: all but torch-compile)",
    )
    ap.add_argument("--tumour-slices", type=int, default=40, help="slices of the end-to-end tumour (40)")
    ap.add_argument("--cache-dir", default=None, help="OpenVINO IR cache (default: the engine's)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end walk")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in ALL_VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; known: {ALL_VARIANTS}")
    if args.quick and args.variants == DEFAULT_VARIANTS:
        args.variants = ["eager", "openvino-f32"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("nncf", "openvino"):
        logging.getLogger(name).setLevel(logging.ERROR)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), openvino {lm.openvino_version() or 'not installed'}"
    )
    print(f"instruction sets: {cpu_features()}")
    model, info = lm.load_model()
    print(f"LiteMedSAM {info.short}, {lm.PACKAGE} {info.package_version}")
    args.encoder_gflop = encoder_gflop(model)
    with tempfile.TemporaryDirectory(prefix="litemedsam-bench-") as tmp:
        per_slice_table(model, info, args, Path(tmp))
    if not args.no_e2e:
        end_to_end(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
