"""``dicom-node finetune --model sam2`` on CPU: a smoke test with a randomly initialised tiny
SAM2.1 model (``sam2.1_hiera_t512``, the real config) and three small MR phantoms.

A few optimiser steps on random weights say nothing about accuracy; what this checks is
the plumbing: the run ends, its loss is finite, its files are there, the split keeps every
case on one side, and the checkpoint it writes loads strictly into the ``sam2`` engine and
segments in 2D (box2d) and 3D (video3d). The weights show what trained: the mask decoder
moved, the prompt encoder never does, the image encoder only with
``freeze_image_encoder=false``. And the trainer's logits are the engine's: training sees
exactly what inference sees.

The walks are kept short (``max_extent_mm``: the prompted slice and one either way) so
that the file runs in about a minute on two idle CPU cores; what is checked does not
depend on how far they go.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dicom_node.cli import main
from dicom_node.phantom import make_phantom, save_phantom
from dicom_node.research.convert import convert
from inference.engine import SegmentOptions, get_engine
from inference.prompts import TargetPrompts

MODEL_CFG = "sam2.1_hiera_t512"
SEED = 2  # the random model of tests/test_sam2_engine.py: a non-empty mask on these phantoms
SHAPE = (12, 128, 128)
SPACING = (5.0, 3.0, 3.0)
PHANTOM_SEEDS = (0, 1, 2)
#: the prompted slice and one slice either way (validation and the engine runs)
EXTENT_MM = 5.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Three MR phantoms as NPZ files (the truth GTV the only label) and the random model's weights."""
    from inference.sam2_models import build_model

    root = tmp_path_factory.mktemp("finetune_sam2")
    for seed in PHANTOM_SEEDS:
        ph = make_phantom("MR", seed, shape=SHAPE, spacing=SPACING)
        paths = save_phantom(ph, root / "dicom" / f"case{seed}")
        Path(paths["prompt"]).unlink()  # the BOX_ prompt is no label: only the truth GTV stays
    summary = convert(root / "dicom", root / "npz", progress=False)
    assert len(summary.converted) == len(PHANTOM_SEEDS)
    model = build_model(MODEL_CFG, device="cpu", seed=SEED)
    init = root / "init.pt"
    torch.save({"model": model.state_dict()}, init)
    return {"root": root, "npz": root / "npz", "init": init}


def finetune(cohort: dict, out: Path, *settings: str) -> int:
    return main(
        [
            "finetune",
            str(cohort["npz"]),
            str(out),
            "--model",  # the documented order: options may follow the folders, among the settings
            "sam2",
            f"init_checkpoint={cohort['init']}",
            f"model_cfg={MODEL_CFG}",
            "device=cpu",
            "progress=false",
            "epochs=1",
            "batch_size=2",
            *settings,
        ]
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def changed(a: dict, b: dict, prefix: str) -> list[str]:
    """The tensors under ``prefix`` that differ between two state dicts."""
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, f"no tensor under {prefix}"
    return [k for k in keys if not torch.equal(a[k], b[k])]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def decoder_run(cohort) -> Path:
    """Two steps with the image encoder frozen (the default), validated in 3D."""
    out = cohort["root"] / "run_decoder"
    rc = finetune(
        cohort, out, "max_steps=2", "val.fraction=0.34", "val.mode=video3d", f"+val.limits.max_extent_mm={EXTENT_MM}"
    )
    assert rc == 0
    return out


def test_run_writes_its_files_and_a_finite_loss(decoder_run):
    out = decoder_run
    for name in ("last.pt", "best.pt", "config.yaml", "split.csv", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert rows[0]["train_loss"] == ""  # epoch 0: the initial weights, before any step
    assert int(rows[1]["steps"]) == 2
    assert math.isfinite(float(rows[1]["train_loss"]))
    assert int(rows[1]["val_targets"]) == 1
    assert 0.0 <= float(rows[1]["val_dice_median"]) <= 1.0
    split = read_csv(out / "split.csv")
    train = {r["patient"] for r in split if r["split"] == "train"}
    val = {r["patient"] for r in split if r["split"] == "val"}
    assert len(train) == 2 and len(val) == 1 and not train & val
    assert len(split) == len(PHANTOM_SEEDS) and not any(r["reason"] for r in split)
    meta = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["finetune"]
    assert meta["model"] == "sam2" and meta["model_cfg"] == MODEL_CFG and meta["epoch"] == 1
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert config["model"] == "sam2" and config["val"]["mode"] == "video3d" and config["max_steps"] == 2


def test_only_the_mask_decoder_trained(cohort, decoder_run):
    init, last = weights(cohort["init"]), weights(decoder_run / "last.pt")
    assert set(init) == set(last)
    assert changed(init, last, "sam_mask_decoder."), "training must move the mask decoder"
    assert changed(init, last, "image_encoder.") == []  # frozen by default
    assert changed(init, last, "sam_prompt_encoder.") == []  # never trains
    # nor does anything else (memory modules, embeddings): only the decoder moved
    assert all(k.startswith("sam_mask_decoder.") for k in changed(init, last, ""))


@pytest.mark.parametrize("mode", ["box2d", "video3d"])
def test_checkpoint_loads_strictly_into_the_engine(decoder_run, mode):
    last = str(decoder_run / "last.pt")
    engine = get_engine("sam2", checkpoint=last, model_cfg=MODEL_CFG, device="cpu")
    assert engine.checkpoint_info is not None and engine.checkpoint_info.format == "model"
    assert not engine.random_weights
    # loaded strictly (load_checkpoint refuses a missing or extra tensor): every weight is the run's
    trained = weights(decoder_run / "last.pt")
    loaded = engine.model.state_dict()
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[k].cpu(), trained[k]) for k in trained)
    ph = make_phantom("MR", 0, shape=SHAPE, spacing=SPACING)
    prompts = TargetPrompts(target="", output_name="GTV_AI", boxes=[ph.box], source_rois=["BOX_"])
    result = engine.segment(ph.volume, prompts, SegmentOptions(mode=mode, max_extent_mm=EXTENT_MM))
    assert result.mask.shape == ph.volume.shape
    assert result.mask.dtype == bool
    # two steps at the default lr leave seed 2's mask non-empty (deterministic on the CPU)
    assert result.mask[ph.box.slice_index].any()
    assert result.mode == mode and result.engine == "sam2"
    assert "RANDOM WEIGHTS" not in result.algorithm_name


def test_unfrozen_image_encoder_trains(cohort):
    out = cohort["root"] / "run_encoder"
    rc = finetune(cohort, out, "max_steps=1", "val.fraction=0", "freeze_image_encoder=false")
    assert rc == 0
    init, last = weights(cohort["init"]), weights(out / "last.pt")
    assert changed(init, last, "image_encoder."), "an unfrozen image encoder must train"
    assert changed(init, last, "sam_mask_decoder.")
    assert changed(init, last, "sam_prompt_encoder.") == []
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1] and math.isfinite(float(rows[1]["train_loss"]))
    assert int(rows[1]["val_targets"]) == 0  # no validation: best.pt is the last epoch's
    assert (out / "best.pt").is_file()


def test_training_sees_what_the_engine_sees(cohort):
    """The trainer's logits for a slice and box are those of the engine's 2D decoder (from
    the engine's own feature cache), before and after the slice's features are kept; a
    kept slice holds its own features only (no positional encodings, no whole batch)."""
    from inference.preprocess import prepare
    from inference.sam2_features import SliceFeatureCache, decode_prompts
    from inference.sam2_models import build_model
    from inference.training import Sam2Trainer, Sample

    model = build_model(MODEL_CFG, device="cpu", seed=SEED)
    trainer = Sam2Trainer(model, torch.device("cpu"), freeze_image_encoder=True, cache_limit=4)
    # frozen encoder: its outputs and the decoder's projections of them (SAM2 applies
    # conv_s0/conv_s1 in forward_image) are kept, so neither trains; the rest of the decoder does
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("sam_mask_decoder.") for n in trainable)
    assert not any(".conv_s0." in n or ".conv_s1." in n for n in trainable)
    assert "sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight" in trainable

    ph = make_phantom("MR", 1, shape=SHAPE, spacing=SPACING)
    gray = prepare(ph.volume, None).gray
    k, b = ph.box.slice_index, ph.box
    box = (b.i0, b.j0, b.i1, b.j1)
    sample = Sample(key=("phantom", k), gray=gray[k], mask=ph.truth[k], box=box)
    trainer.eval()
    with torch.no_grad():
        first = trainer.logits([sample])[0][0, 0].numpy()
        again = trainer.logits([sample])[0][0, 0].numpy()  # from the kept features
    assert trainer.cache.misses == 1 and trainer.cache.hits == 1
    (kept,) = trainer.cache.items.values()
    assert len(kept) == 3  # the three feature levels, nothing else
    for t in kept:
        assert t.shape[0] == 1 and t.untyped_storage().nbytes() == t.numel() * t.element_size()

    with torch.no_grad():
        cache = SliceFeatureCache(model, gray, device="cpu", batch_size=1)
        _, backbone_out = cache.get(k)
        ref = decode_prompts(model, backbone_out, gray.shape[1:], box).logits
    assert first.shape == ref.shape == gray.shape[1:]
    np.testing.assert_allclose(first, ref, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(again, first)
    assert (ref > 0).any()


def test_boxes_with_clicks_train(cohort):
    """``data.points``: positive clicks simulated inside the label go with each box (sam2 only)."""
    out = cohort["root"] / "run_points"
    assert finetune(cohort, out, "max_steps=1", "val.fraction=0", "data.points=2") == 0
    rows = read_csv(out / "metrics.csv")
    assert math.isfinite(float(rows[-1]["train_loss"]))
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["points"] == 2
