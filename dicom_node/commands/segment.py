"""``dicom-node segment`` (images + prompt RTSTRUCT -> result RTSTRUCT) and
``dicom-node evaluate`` (Dice, surface Dice at 2 mm, HD95 of a result against a truth)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from dicom_node.commands._engine_options import add_engine_option_argument, parse_engine_options
from dicom_node.commands._limits import add_limit_arguments, limit_overrides
from inference.engine import DEFAULT_ENGINE, ENGINES


def register(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment the tumour(s) prompted in an RTSTRUCT and write the result RTSTRUCT",
        description=(
            "Load the image series in IMAGES_DIR, read the BOX_/POS_/NEG_ prompts of PROMPT_RTSTRUCT, "
            "segment every prompted target and write one RTSTRUCT with one ROI per target (the node's "
            "writer: same frame of reference, ROIGenerationAlgorithm AUTOMATIC with the engine's name)."
        ),
    )
    p.add_argument("images", metavar="IMAGES_DIR", help="folder with the CT or MR series (searched recursively)")
    p.add_argument("prompt", metavar="PROMPT_RTSTRUCT", help="RTSTRUCT with the prompt ROIs")
    p.add_argument("-o", "--output", required=True, metavar="OUT.dcm", help="result RTSTRUCT file to write")
    p.add_argument(
        "--engine",
        choices=list(ENGINES),
        default=DEFAULT_ENGINE,
        help="; ".join(f"{e.name}: {e.label}" for e in ENGINES.values()) + f" (default {DEFAULT_ENGINE})",
    )
    p.add_argument(
        "--mode",
        choices=["box2d", "video3d"],
        default="box2d",
        help="box2d: slice-by-slice box propagation; video3d: SAM2 video predictor (sam2 only)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="model weights (.pt): SAM2's, or a fine-tuned litemedsam checkpoint (dicom-node finetune)",
    )
    p.add_argument("--model-cfg", metavar="NAME", help="SAM2 model config name or YAML path")
    p.add_argument("--window", metavar="L,W", help="CT window level,width in HU for the model (default 40,400)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="SAM2 device (default: cuda when present)")
    add_engine_option_argument(p)
    add_limit_arguments(p.add_argument_group("the walk's limits and stop rules"))
    p.add_argument("--series-uid", metavar="UID", help="the image series, when IMAGES_DIR holds several")
    p.add_argument("--force", action="store_true", help="overwrite OUT.dcm if it exists")
    p.set_defaults(func=run_segment)

    e = sub.add_parser(
        "evaluate",
        help="score a result RTSTRUCT against a truth RTSTRUCT: Dice, surface Dice (2 mm), HD95",
        description=(
            "Rasterise one ROI of --pred and one of --truth on the image grid of --images and print Dice, "
            "surface Dice at 2 mm and HD95 in mm, computed with the true (anisotropic) voxel spacing. "
            "Without --pred-roi/--truth-roi the file's only ROI with contours is used. An empty prediction "
            "gives Dice 0 and HD95 inf (null in JSON)."
        ),
    )
    e.add_argument("--images", required=True, metavar="DIR", help="folder with the image series")
    e.add_argument("--pred", required=True, metavar="FILE", help="predicted RTSTRUCT")
    e.add_argument("--truth", required=True, metavar="FILE", help="ground-truth RTSTRUCT")
    e.add_argument("--pred-roi", metavar="NAME", help="ROI of --pred to score")
    e.add_argument("--truth-roi", metavar="NAME", help="ROI of --truth to score against")
    e.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    e.add_argument("--series-uid", metavar="UID", help="the image series, when DIR holds several")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    e.set_defaults(func=run_evaluate)


def _window(text: str | None):
    from dicom_node.cli import CommandError
    from inference.preprocess import parse_window

    if text is None:
        return None
    try:
        return parse_window(text)
    except ValueError as exc:
        raise CommandError(f"--window: {exc}") from None


def run_segment(args) -> int:
    from dicom_node.cli import CommandError
    from dicom_node.pipeline import CaseError, segment_case
    from inference.engine import EngineSpec, SegmentOptions

    out = Path(args.output)
    if out.exists() and not args.force:
        raise CommandError(f"{out} exists: choose another -o or pass --force")
    if out.exists() and out.is_dir():
        raise CommandError(f"-o {out} is a folder: give a file name such as {out / 'result.dcm'}")
    if not out.parent.exists():
        raise CommandError(f"the folder of -o {out} does not exist")
    info = ENGINES[args.engine]
    if args.engine == "classic":
        for flag, value in (
            ("--checkpoint", args.checkpoint),
            ("--model-cfg", args.model_cfg),
            ("--device", args.device),
        ):
            if value is not None:
                raise CommandError(f"{flag} is a sam2 option; the classic engine uses no model")
    if args.mode not in info.modes:
        raise CommandError(f"--mode {args.mode} needs --engine sam2 (the {args.engine} engine segments slice by slice)")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CommandError(f"--checkpoint {args.checkpoint}: no such file")
    try:
        options = SegmentOptions(mode=args.mode, window=_window(args.window), **limit_overrides(args))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        engine = EngineSpec(
            args.engine,
            checkpoint=args.checkpoint,
            model_cfg=args.model_cfg,
            device=args.device,
            options=parse_engine_options(args.engine_option),
        )
    except ValueError as exc:
        raise CommandError(f"--engine {args.engine}: {exc}") from None
    try:
        case = segment_case(
            args.images, args.prompt, engine=engine, options=options, series_instance_uid=args.series_uid
        )
    except CaseError as exc:
        raise CommandError(str(exc)) from None

    tmp = out.with_name(f".{out.name}.part")
    case.dataset.save_as(tmp, enforce_file_format=True)
    tmp.replace(out)
    dz = case.volume.spacing[0]
    for t in case.targets:
        r = t.result
        ks = sorted(k for k in r.slice_scores)
        vol_ml = float(r.mask.sum()) * case.volume.geometry.voxel_volume_mm3 / 1000.0
        print(
            f"{t.roi_name}: {vol_ml:.1f} ml on {len(ks)} slices "
            f"({ks[0]}..{ks[-1]}, {len(ks) * dz:.0f} mm), {r.algorithm_name} {r.engine_version}, "
            f"mode {r.mode}, {r.seconds:.1f} s"
        )
        low = [f"{k}:{s:.2f}" for k, s in sorted(r.slice_scores.items()) if s is not None]
        if low:
            print(f"  per-slice scores: {' '.join(low)}")
    for w in case.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def run_evaluate(args) -> int:
    from dicom_node.cli import CommandError
    from dicom_node.pipeline import CaseError, load_roi_mask, load_volume, pick_roi, read_structure_set
    from inference.metrics import evaluate

    if args.tolerance_mm < 0:
        raise CommandError("--tolerance-mm must not be negative")
    try:
        volume = load_volume(args.images, series_instance_uid=args.series_uid)
        pred_set = read_structure_set(args.pred, "--pred")
        truth_set = read_structure_set(args.truth, "--truth")
        pred_roi = pick_roi(pred_set, args.pred_roi, f"--pred {args.pred}")
        truth_roi = pick_roi(truth_set, args.truth_roi, f"--truth {args.truth}")
        pred = load_roi_mask(pred_set, pred_roi, volume, "--pred")
        truth = load_roi_mask(truth_set, truth_roi, volume, "--truth")
    except CaseError as exc:
        raise CommandError(str(exc)) from None
    scores = evaluate(pred, truth, volume.spacing, tolerance_mm=args.tolerance_mm)
    if args.json:
        out = {"pred_roi": pred_roi.name, "truth_roi": truth_roi.name, "spacing_mm": list(volume.spacing)}
        out.update(scores.as_dict())
        print(json.dumps(out))
        return 0

    def fmt(v: float) -> str:
        return "inf" if math.isinf(v) else f"{v:.2f}"

    print(
        f"pred {pred_roi.name!r} vs truth {truth_roi.name!r} "
        f"(spacing {' x '.join(f'{s:g}' for s in volume.spacing)} mm, z y x)"
    )
    rows = [
        ("Dice", f"{scores.dice:.4f}"),
        (f"surface Dice {args.tolerance_mm:g} mm", f"{scores.surface_dice:.4f}"),
        ("HD95", f"{fmt(scores.hd95_mm)} mm"),
        ("volume ratio", f"{fmt(scores.volume_ratio)} ({scores.pred_volume_ml:.1f} / {scores.truth_volume_ml:.1f} ml)"),
    ]
    for label, value in rows:
        print(f"{label:<20} {value}")
    return 0
