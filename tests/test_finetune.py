"""``dicom-node finetune`` with LiteMedSAM on the CPU.

The cohort (benchmarks/finetune_phantoms.py): five MR phantoms (five patients) converted by
``dicom-node convert``, each label grown in-plane by 3 mm. The pretrained model follows the
visible edge, so its validation Dice against these labels starts near 0.84 (its masks lack
the 3 mm rim: a systematic, known error). One epoch of decoder updates (8 of batch 4) teaches the rim: measured 0.841 -> 0.946, HD95
4.0 -> 1.5 mm, no slice past the ends, 258 s for the whole run under CI.

Why the bar is +0.05: the pipeline is deterministic (same seed, same prompts, same masks),
so there is no run-to-run noise to beat; the bar is the size of a change a planner would
notice (on these 30 mm tumours a 3 mm rim is about a third of the volume: Dice 0.84 ->
0.95 measured, see the note of the fine-tuning issue), and a quarter of what the rim
costs. A fine-tune that only reproduced the pretrained masks would stay at +0.00.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import torch
from helpers import CLI, REPO, NodeProcess, StoreSCP, delivered, image_files, require_tool, storescu, write_config

from dicom_node.cli import main

sys.path.insert(0, str(REPO / "benchmarks"))
from finetune_phantoms import grow_labels, make_cohort  # noqa: E402

MARGIN_MM = 3.0
FAST = ["progress=false", "device=cpu"]


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), ["MR"], [0, 1, 2, 3, 4], MARGIN_MM)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """One patient, for the tests of resume, interrupt and bad input (no validation)."""
    return make_cohort(tmp_path_factory.mktemp("small"), ["MR"], [0], MARGIN_MM)


@pytest.fixture(scope="module")
def finetuned(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    rc = main(
        ["finetune", str(cohort), str(out), "--model", "litemedsam", "epochs=1", "batch_size=4", "val.fraction=0.4"]
        + FAST
    )
    assert rc == 0
    return out


def test_finetune_learns_the_rim_the_model_leaves_out(finetuned):
    out = finetuned
    metrics = read_csv(out / "metrics.csv")
    assert [m["epoch"] for m in metrics] == ["0", "1"]  # one epoch: the whole run within 5 minutes
    before = float(metrics[0]["val_dice_median"])
    after = max(float(m["val_dice_median"]) for m in metrics[1:])
    assert 0.6 < before < 0.9, "the pretrained model should miss the 3 mm rim"
    assert after >= before + 0.05, f"validation Dice {before:.3f} -> {after:.3f}"
    assert all(np.isfinite(float(m["train_loss"])) for m in metrics[1:])
    # and the walk still ends where the tumour does (data.beyond_ends): at most a slice past per target
    assert int(metrics[-1]["val_slices_extra"]) <= int(metrics[-1]["val_targets"])
    assert int(metrics[-1]["steps"]) > 0 and metrics[0]["train_loss"] == ""
    # the split is by patient, seeded, and written down; no case on both sides
    split = read_csv(out / "split.csv")
    assert sorted(r["split"] for r in split) == ["train", "train", "train", "val", "val"]
    assert not {r["patient"] for r in split if r["split"] == "train"} & {
        r["patient"] for r in split if r["split"] == "val"
    }
    assert (out / "config.yaml").read_text().startswith("model: litemedsam")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # best.pt is a checkpoint the engine loads strictly; its record says how it was made
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["finetune"]["epoch"] >= 1 and best["finetune"]["model"] == "litemedsam"
    assert abs(best["finetune"]["val_dice_median"] - after) < 1e-4  # metrics.csv rounds to 4 places
    assert oct((out / "best.pt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_finetuned_checkpoint_runs_in_a_rule_through_the_node(finetuned, tmp_path):
    """A rule names best.pt; the running node delivers the fine-tuned model's contour."""
    require_tool("storescu")
    require_tool("storescp")
    from dicom_node.phantom import make_phantom as mk
    from dicom_node.phantom import save_phantom
    from inference.checkpoints import file_sha256
    from inference.metrics import dice
    from rtstruct.rasterize import rasterize_roi
    from rtstruct.reader import read_rtstruct

    best = finetuned / "best.pt"
    ph = mk("MR", 7, shape=(28, 256, 256), spacing=(5.0, 1.5, 1.5))  # a patient the run never saw
    paths = save_phantom(ph, tmp_path / "case")
    tps = StoreSCP(tmp_path / "tps").start()
    node = None
    try:
        rule = {
            "name": "finetuned",
            "action": {"engine": "litemedsam", "checkpoint": str(best), "destinations": ["tps"]},
        }
        config = write_config(tmp_path / "node", destinations={"tps": tps.destination()}, extra_rules=[rule])
        node = NodeProcess(config).start()
        out = storescu([*image_files(paths), paths["prompt"]], node.port)
        assert out.returncode == 0, out.stderr[-2000:]
        (result,) = delivered(node, tps, timeout=600)
        ds = pydicom.dcmread(result)
        algorithm = ds.StructureSetROISequence[0].ROIDerivationAlgorithmIdentificationSequence[0].AlgorithmName
        assert algorithm.startswith(f"LiteMedSAM fine-tune sha256:{file_sha256(best)[:12]}")
        (job,) = node.jobs()
        assert job["rule"] == "finetuned" and job["engine"] == "litemedsam"
        pred = rasterize_roi(read_rtstruct(ds).rois[0], ph.volume.geometry)
    finally:
        if node is not None:
            node.stop()
        tps.stop()
    # the delivered contour carries the learnt rim: it fits the grown label better than the visible tumour
    spacing = ph.volume.spacing
    r = int(np.ceil(MARGIN_MM / spacing[1]))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2 <= MARGIN_MM**2 + 1e-6
    from scipy import ndimage

    grown = np.stack([ndimage.binary_dilation(m, disc) for m in ph.truth])
    assert dice(pred, grown) > dice(pred, ph.truth)
    assert dice(pred, grown) >= 0.85


def test_resume_continues_and_other_settings_are_refused(small_cohort, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", str(small_cohort), str(out), "val.fraction=0", "steps_per_epoch=2", "batch_size=2", *FAST]
    assert main([*args, "epochs=1"]) == 0
    first = torch.load(out / "last.pt", weights_only=True)
    assert first["finetune"]["epoch"] == 1 and first["optimizer"]["steps"] == 2
    assert main([*args, "epochs=2"]) == 0
    assert "resuming" in capsys.readouterr().out
    metrics = read_csv(out / "metrics.csv")
    assert [m["epoch"] for m in metrics] == ["0", "1", "2"] and metrics[-1]["steps"] == "4"
    second = torch.load(out / "last.pt", weights_only=True)
    assert second["finetune"]["epoch"] == 2
    # without validation, best is the last epoch's weights
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["finetune"]["epoch"] == 2
    # another learning rate is another run: refused, nothing changed
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    assert main([*args, "epochs=3", "lr=1e-3"]) == 2
    assert "lr differ" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_ctrl_c_leaves_a_usable_last_checkpoint(small_cohort, tmp_path):
    out = tmp_path / "run"
    cmd = [*CLI, "finetune", str(small_cohort), str(out), "val.fraction=0", "epochs=1000", "batch_size=2", *FAST]
    # SIGINT as a terminal delivers it: a suite started in the background (nohup, CI) would
    # otherwise pass on an ignored SIGINT, which Python then leaves ignored
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stdout.readline()  # printed once the data are loaded, right before training
        assert line.startswith("fine-tuning litemedsam"), line + proc.stderr.read()
        # wait until a first epoch is done, then interrupt the next one
        for line in proc.stdout:
            if line.startswith("epoch 1:"):
                break
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted in epoch" in err and "last.pt holds the weights" in err
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["finetune"]["interrupted"] is True
    from inference.engines.litemedsam import LiteMedSamEngine

    engine = LiteMedSamEngine(checkpoint=str(out / "last.pt"), runtime="eager")
    assert engine.weights.source == "checkpoint"


# -- bad input: clear errors, nothing written -------------------------------------------------
def _refused(capsys, args, out) -> str:
    assert main(["finetune", *args, *FAST, "val.fraction=0"]) == 2
    assert not out.exists(), "a refused run must not create OUT_DIR"
    return capsys.readouterr().err


def test_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "npz").mkdir()
    err = _refused(capsys, [str(tmp_path / "npz"), str(tmp_path / "out")], tmp_path / "out")
    assert "no NPZ file under" in err and "dicom-node convert" in err


def test_npz_without_labels_is_refused(tmp_path, capsys):
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez_compressed(npz / "a.npz", imgs=np.zeros((4, 8, 8), np.int16), spacing=np.ones(3))
    err = _refused(capsys, [str(npz), str(tmp_path / "out")], tmp_path / "out")
    assert "holds labels to train on" in err and "NPZ lacks gts" in err


def test_label_that_matches_nothing_is_refused(small_cohort, tmp_path, capsys):
    err = _refused(capsys, [str(small_cohort), str(tmp_path / "out"), "data.label='^CTV'"], tmp_path / "out")
    assert "matches data.label='^CTV'" in err and "labels found: GTV" in err
    err = _refused(capsys, [str(small_cohort), str(tmp_path / "out"), "data.label=^CTV"], tmp_path / "out")
    assert "quote a value with special characters" in err


def test_checkpoint_of_another_model_is_refused(small_cohort, tmp_path, capsys):
    wrong = tmp_path / "other.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict()}, wrong)
    err = _refused(capsys, [str(small_cohort), str(tmp_path / "out"), f"init_checkpoint={wrong}"], tmp_path / "out")
    assert "does not fit the LiteMedSAM architecture" in err and "missing keys" in err


def test_bad_settings_are_refused(small_cohort, tmp_path, capsys):
    out = tmp_path / "out"
    err = _refused(capsys, [str(small_cohort), str(out), "epoch=3"], out)
    assert "epoch" in err and "cannot apply the settings" in err
    err = _refused(capsys, [str(small_cohort), str(out), "lr=-1"], out)
    assert "lr: Input should be greater than 0" in err
    err = _refused(capsys, [str(small_cohort), str(out), "data.points=2"], out)
    assert "LiteMedSAM takes box prompts only" in err
    err = _refused(capsys, [str(small_cohort), str(out), "--model", "sam2"], out)
    assert "needs init_checkpoint" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["finetune", str(small_cohort), str(foreign), *FAST, "val.fraction=0"]) == 2
    assert "holds no last.pt" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_grow_labels_grows_in_plane_only(tmp_path):
    gts = np.zeros((3, 21, 21), np.uint8)
    gts[1, 10, 10] = 1
    np.savez_compressed(tmp_path / "c.npz", gts=gts, spacing=np.array([5.0, 1.0, 1.0]))
    assert grow_labels(tmp_path, 3.0) == 1
    grown = np.load(tmp_path / "c.npz")["gts"]
    assert not grown[0].any() and not grown[2].any()
    assert grown[1].sum() == 29  # a disc of radius 3 px


def test_study_compares_pretrained_and_finetuned_side_by_side(finetuned, tmp_path):
    """``study --checkpoint packaged --checkpoint best.pt`` on the run's validation cases:
    one heatmap column per checkpoint, and the study's Dice is the run's validation Dice."""
    import shutil

    val = tmp_path / "val"
    val.mkdir()
    for row in read_csv(finetuned / "split.csv"):
        if row["split"] == "val":
            shutil.copy(row["file"], val / os.path.basename(row["file"]))
    out = tmp_path / "study"
    best = finetuned / "best.pt"
    args = ["study", str(val), str(out), "--engine", "litemedsam", "--no-progress"]
    assert main([*args, "--checkpoint", "packaged", "--checkpoint", str(best)]) == 0
    rows = read_csv(out / "cases.csv")
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(float(r["dice"]))
    assert sorted(by_model) == ["litemedsam:best", "litemedsam:packaged"]
    assert all(len(v) == 2 for v in by_model.values())
    metrics = read_csv(finetuned / "metrics.csv")
    assert float(np.median(by_model["litemedsam:packaged"])) == pytest.approx(
        float(metrics[0]["val_dice_median"]), abs=0.005
    )
    epoch = torch.load(best, weights_only=True)["finetune"]["epoch"]
    assert float(np.median(by_model["litemedsam:best"])) == pytest.approx(
        float(metrics[epoch]["val_dice_median"]), abs=0.005
    )
    assert (out / "figures" / "heatmap_dice.png").is_file()
    assert (out / "models" / "litemedsam_best" / "cases.csv").is_file()


def test_a_loss_that_is_not_finite_stops_the_run_with_a_clear_error(small_cohort, tmp_path, capsys):
    """An absurd learning rate blows the weights up within a few updates: the run stops,
    names the epoch and batch, and last.pt stays the checkpoint of the epoch before."""
    out = tmp_path / "run"
    args = ["finetune", str(small_cohort), str(out), "val.fraction=0", "batch_size=2", "clip_norm=null", *FAST]
    assert main([*args, "lr=1e30", "steps_per_epoch=20", "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"the loss is (nan|inf|-inf) at epoch 1, batch \d+: training stopped", err), err
    assert not (out / "last.pt").exists()  # no epoch finished: nothing claims to be trained weights


def test_slices_past_the_ends_train_with_an_empty_label(small_cohort):
    """``data.beyond_ends``: the walk's box one and two slices past each end, label empty."""
    from dicom_node.research.finetune import (
        FinetuneSettings,
        find_cases,
        load_training_slices,
        make_sample,
        split_cases,
    )

    settings = FinetuneSettings(val={"fraction": 0})
    entries = find_cases(small_cohort, re.compile("gtv", re.I), settings.data.min_area_px)
    split_cases(entries, 0.0, 0)
    slices = load_training_slices(entries, settings)
    tumour = [s for s in slices if s.box_from is None]
    past = [s for s in slices if s.box_from is not None]
    ks = sorted(s.key[2] for s in tumour)
    assert sorted(s.key[2] for s in past) == [ks[0] - 2, ks[0] - 1, ks[-1] + 1, ks[-1] + 2]
    rng = np.random.default_rng(0)
    for s in past:
        sample = make_sample(s, settings, rng)
        assert not sample.mask.any()
        rows = np.flatnonzero(s.box_from.any(axis=1))
        # the box holds the last tumour slice's extent plus the walk's margin (3 mm), jitter aside
        assert sample.box[0] < rows[0] and sample.box[2] > rows[-1]
    settings = FinetuneSettings(val={"fraction": 0}, data={"beyond_ends": 0})
    assert all(s.box_from is None for s in load_training_slices(entries, settings))
