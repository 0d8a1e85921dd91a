"""``dicom-node study SRC OUT``: re-contour a cohort from simulated prompts and score it.

``dicom-node study --report STUDY_DIR [STUDY_DIR ...] -o OUT`` combines earlier studies
(for example one per model) into one summary, box plots and a dataset x model heatmap.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from dicom_node.commands._engine_options import add_engine_option_argument, parse_engine_options
from dicom_node.commands._limits import add_limit_arguments, limit_overrides
from inference.engine import DEFAULT_ENGINE, ENGINES


def register(sub) -> None:
    p = sub.add_parser(
        "study",
        help="validation study: simulate planner prompts from ground truth, segment, score, plot",
        description=(
            "For every case under SRC (DICOM image series with an RTSTRUCT, or NPZ files from 'dicom-node "
            "convert') and every ground-truth ROI: simulate the planner's prompt, segment it the way the node "
            "does, and score Dice, surface Dice at 2 mm, HD95, volume ratio and slices reached. Writes "
            "OUT/cases.csv, OUT/summary.csv/.txt and PNG figures in OUT/figures. With --report, combine the "
            "results of earlier studies instead: dicom-node study --report DIR1 DIR2 ... -o OUT."
        ),
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="SRC OUT, or with --report the study folders to combine")
    p.add_argument("--report", action="store_true", help="combine earlier studies' cases.csv (PATHs) into -o OUT")
    p.add_argument("-o", "--out", help="output folder for --report")
    g = p.add_argument_group("model")
    g.add_argument("--engine", choices=list(ENGINES), default=DEFAULT_ENGINE)
    g.add_argument(
        "--checkpoint",
        action="append",
        metavar="FILE",
        help="model weights: sam2's checkpoint, or a fine-tuned litemedsam one ('packaged': the weights the "
        "litemedsam package ships). Given several times, the checkpoints are compared side by side: one "
        "study each in OUT/models/<name>/, combined in OUT (one heatmap column per checkpoint)",
    )
    g.add_argument("--model-cfg", help="SAM2 model config name")
    g.add_argument("--device", choices=["cpu", "cuda"], help="SAM2 device (default: cuda when present)")
    g.add_argument("--mode", choices=["box2d", "video3d"], default="box2d")
    add_engine_option_argument(g)
    g.add_argument("--window", metavar="L,W", help="CT window level,width in HU (default 40,400)")
    g.add_argument(
        "--model-name",
        metavar="LABEL",
        help="the model's name in tables and figures (default: engine[:checkpoint name])",
    )
    g.add_argument(
        "--predictions",
        metavar="DIR",
        help="run no engine: score the predictions saved in DIR (OUT/predictions of an earlier study, "
        "or <dataset>/<case>.npz files with a 'segs' label map and 'label_names')",
    )
    add_limit_arguments(p.add_argument_group("the walk's limits and stop rules"))
    g = p.add_argument_group("prompt simulation")
    g.add_argument("--prompt", choices=["box", "points"], default="box")
    g.add_argument(
        "--slice",
        choices=["largest", "middle"],
        default="largest",
        help="slice of the prompt: largest GT area, or the middle of the GT's z-extent",
    )
    g.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        metavar="MM",
        help="move each box edge by a random amount in [-MM, +MM] mm (default 0)",
    )
    g.add_argument("--positives", type=int, default=3, metavar="N", help="positive clicks (--prompt points)")
    g.add_argument("--negatives", type=int, default=3, metavar="N", help="negative clicks (--prompt points)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    g = p.add_argument_group("cases")
    g.add_argument(
        "--roi",
        metavar="REGEX",
        default=None,
        help="ground-truth ROIs to score (Python regex, searched; default '(?i)gtv')",
    )
    g.add_argument(
        "--dataset-name", metavar="NAME", help="dataset name for every case (default: first folder below SRC)"
    )
    g.add_argument("--worst", type=int, default=3, metavar="N", help="overlay figures for the N lowest-Dice ROIs")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


PACKAGED = "packaged"


def checkpoint_labels(engine: str, checkpoints: list[str | None]) -> list[str]:
    """The model names of a comparison: ``engine:<file stem>`` (with the folder when two
    files share a stem), ``engine:packaged`` for the shipped weights, ``engine`` alone."""
    stems = [Path(c).stem for c in checkpoints if c not in (None, PACKAGED)]
    out = []
    for c in checkpoints:
        if c is None:
            out.append(engine if engine != "sam2" else "sam2:no-checkpoint")
        elif c == PACKAGED:
            out.append(f"{engine}:packaged")
        else:
            p = Path(c)
            name = p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}"
            out.append(f"{engine}:{name}")
    return out


def run(args) -> int:
    from dicom_node.cli import CommandError

    if args.report:
        return _run_report(args, CommandError)
    if len(args.paths) != 2:
        raise CommandError("usage: dicom-node study SRC OUT [options]  (or: dicom-node study --report DIR... -o OUT)")
    if args.out:
        raise CommandError("-o/--out is for --report; give OUT as the second argument")
    src, out = Path(args.paths[0]), Path(args.paths[1])
    if not src.is_dir():
        raise CommandError(f"SRC is not a folder: {src}")

    from dicom_node.research.simulate import PromptSpec
    from dicom_node.research.study import DEFAULT_ROI_PATTERN, StudyConfig, StudyError, run_study

    roi = args.roi if args.roi is not None else DEFAULT_ROI_PATTERN
    try:
        re.compile(roi)
    except re.error as exc:
        raise CommandError(f"--roi is not a valid regular expression: {exc}") from exc
    window = None
    if args.window:
        from inference.preprocess import parse_window

        try:
            window = parse_window(args.window)
        except ValueError as exc:
            raise CommandError(f"--window: {exc}") from exc
    if args.engine == "classic" and (args.checkpoint or args.model_cfg):
        raise CommandError(
            "the classic engine uses no weights: --checkpoint is for sam2 and litemedsam, --model-cfg for sam2"
        )
    if args.engine == "classic" and args.mode != "box2d":
        raise CommandError("the classic engine supports only --mode box2d")
    if args.predictions and not Path(args.predictions).is_dir():
        raise CommandError(f"--predictions is not a folder: {args.predictions}")
    checkpoints = list(args.checkpoint or [None])
    for c in checkpoints:
        if c == PACKAGED:
            if args.engine != "litemedsam":
                raise CommandError("--checkpoint packaged is for --engine litemedsam")
        elif c is not None and not Path(c).is_file():
            raise CommandError(f"checkpoint not found: {c}")
    if len(checkpoints) > 1 and args.model_name:
        raise CommandError("--model-name names one model; with several --checkpoint each is named after its file")
    if len(checkpoints) > 1 and args.predictions:
        raise CommandError("--predictions scores saved masks: it takes no --checkpoint")
    try:
        spec = PromptSpec(
            kind=args.prompt,
            slice=args.slice,
            jitter_mm=args.jitter,
            positives=args.positives,
            negatives=args.negatives,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    try:
        engine_options = dict(parse_engine_options(args.engine_option))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if engine_options and args.predictions:
        raise CommandError("--predictions scores saved masks: it runs no engine, so it takes no --engine-option")
    config = StudyConfig(
        engine=args.engine,
        engine_options=engine_options,
        checkpoint=None,
        model_cfg=args.model_cfg,
        device=args.device,
        mode=args.mode,
        window=window,
        model_label=args.model_name,
        prompt=spec,
        seed=args.seed,
        roi_pattern=roi,
        dataset_name=args.dataset_name,
        worst=args.worst,
        predictions=args.predictions,
        limits=limit_overrides(args),
    )
    labels = checkpoint_labels(args.engine, checkpoints)
    try:
        if len(checkpoints) == 1:
            c = checkpoints[0]
            config.checkpoint = None if c in (None, PACKAGED) else c
            if c == PACKAGED and not args.model_name:
                config.model_label = labels[0]
            result = run_study(src, out, config, progress=not args.no_progress)
        else:
            from dataclasses import replace

            from dicom_node.research.study import combine_reports

            parts = []
            for c, label in zip(checkpoints, labels):
                part = out / "models" / label.replace(":", "_").replace("/", "_")
                print(f"{label}: {c}")
                run_study(
                    src,
                    part,
                    replace(config, checkpoint=None if c == PACKAGED else c, model_label=label),
                    progress=not args.no_progress,
                )
                parts.append(part)
            result = combine_reports(parts, out)
    except StudyError as exc:
        raise CommandError(str(exc)) from exc
    scored = [r for r in result.rows if r["status"] in ("ok", "failed")]
    skipped = [r for r in result.rows if r["status"] == "skipped"]
    print(result.table)
    if skipped:
        print(f"\nskipped {len(skipped)}:")
        for r in skipped:
            what = " / ".join(v for v in (r["dataset"], r["case"], r["roi"]) if v)
            print(f"  {what}: {r['reason']}")
    failed = [r for r in scored if r["status"] == "failed"]
    if failed:
        print(f"\nengine failed on {len(failed)} ROI(s) (scored as empty predictions):")
        for r in failed:
            print(f"  {r['dataset']} / {r['case']} / {r['roi']}: {r['reason']}")
    print(f"\n{len(scored)} ROI(s) scored; results in {out} (cases.csv, summary.csv, figures/)")
    if not scored:
        print("error: no ROI could be scored", file=sys.stderr)
        return 1
    return 0


def _run_report(args, CommandError) -> int:
    from dicom_node.research.study import combine_reports

    if not args.out:
        raise CommandError("--report needs -o OUT")
    if not args.paths:
        raise CommandError("--report needs at least one study folder (or cases.csv)")
    try:
        result = combine_reports(args.paths, args.out)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    print(result.table)
    print(f"\ncombined {len(args.paths)} stud{'y' if len(args.paths) == 1 else 'ies'} into {result.out}")
    return 0
