"""``dicom-node finetune NPZ_DIR OUT_DIR --model litemedsam|sam2 [key=value ...]``."""

from __future__ import annotations

import argparse
import signal
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune LiteMedSAM or SAM2 on convert's NPZ files; writes checkpoints rules load",
        description=(
            "Train on the labelled targets of the NPZ files under NPZ_DIR (written by dicom-node convert), "
            "split by patient into training and validation, validate through the node's pipeline before "
            "the first epoch and after each, and write OUT_DIR/best.pt and last.pt (load them with "
            "checkpoint: in a rule or --checkpoint in segment and study), metrics.csv, curves.png, "
            "split.csv and config.yaml. Settings: config/finetune.yaml (every key documented there), "
            "changed as key=value, e.g. epochs=20 lr=5e-5 data.jitter_mm=5 val.fraction=0.25. Running "
            "the same command again resumes from OUT_DIR/last.pt."
        ),
    )
    p.add_argument("npz_dir", metavar="NPZ_DIR", help="folder of NPZ files (searched recursively)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (new or empty; or an earlier run to resume)")
    p.add_argument("--model", choices=["litemedsam", "sam2"], help="the model to fine-tune (default: the settings')")
    p.add_argument("--config", metavar="FILE", help="settings file instead of config/finetune.yaml")
    # REMAINDER: settings may follow the folders and be mixed with --model/--config (taken out in run)
    p.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="key=value", help="settings to change (Hydra override syntax)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.cli import CommandError
    from dicom_node.research.finetune import FinetuneError, FinetuneInterrupted, compose_settings, run_finetune

    overrides = []
    rest = list(args.overrides)
    while rest:
        item = rest.pop(0)
        if item in ("--model", "--config"):
            if not rest:
                raise CommandError(f"{item} needs a value")
            value = rest.pop(0)
            if item == "--model" and value not in ("litemedsam", "sam2"):
                raise CommandError(f"--model must be litemedsam or sam2, got {value!r}")
            setattr(args, item[2:], value)
        elif item.startswith(("--model=", "--config=")):
            key, value = item[2:].split("=", 1)
            setattr(args, key, value)
        else:
            overrides.append(item)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise CommandError(f"settings are key=value; got {' '.join(bad)}")
    if args.model:
        overrides.append(f"model={args.model}")

    def terminated(signum, frame):  # kill, systemd, timeout: stop as Ctrl-C does (last.pt written)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        settings, text = compose_settings(overrides, args.config)
        result = run_finetune(args.npz_dir, args.out_dir, settings, text)
    except FinetuneError as exc:
        raise CommandError(str(exc)) from None
    except FinetuneInterrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    change = result.best_dice - result.initial_dice if result.initial_dice == result.initial_dice else float("nan")
    print(
        f"done: {result.steps} steps; validation median Dice {result.initial_dice:.4f} before, best "
        f"{result.best_dice:.4f} at epoch {result.best_epoch} ({change:+.4f})"
    )
    if result.best is not None:
        engine = settings.model
        print(f"best weights: {result.best}  (a rule: engine: {engine}, checkpoint: {result.best.resolve()})")
    print(f"last weights: {result.last}; metrics: {result.out / 'metrics.csv'}, curves: {result.out / 'curves.png'}")
    return 0
