"""SAM2 models: config names, the 512-pixel MedSAM2 variant, checkpoint formats, hydra isolation.

No weights exist here: models are built randomly initialised from the package's real
configs, and checkpoints are saved from such models in the formats users bring.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.sam2_models import (
    CheckpointError,
    Sam2ModelError,
    build_model,
    compose_model_config,
    load_checkpoint,
    make_image_predictor,
    resolve_model_config,
)

REPO = Path(__file__).resolve().parents[1]


# -- config names ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, name, folder, size",
    [
        ("sam2.1_hiera_t", "sam2.1_hiera_t", "sam2.1", 0),
        ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_t", "sam2.1", 0),
        ("sam2.1_hiera_tiny", "sam2.1_hiera_t", "sam2.1", 0),
        ("sam2_hiera_s", "sam2_hiera_s", "sam2", 0),
        ("configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_b+", "sam2", 0),
        ("sam2.1_hiera_base_plus", "sam2.1_hiera_b+", "sam2.1", 0),
        ("sam2.1_hiera_l", "sam2.1_hiera_l", "sam2.1", 0),
        ("sam2.1_hiera_t512", "sam2.1_hiera_t512", "sam2.1", 512),
        ("configs/sam2.1/sam2.1_hiera_t512.yaml", "sam2.1_hiera_t512", "sam2.1", 512),
        ("MedSAM2", "sam2.1_hiera_t512", "sam2.1", 512),
    ],
)
def test_config_names(text, name, folder, size):
    spec = resolve_model_config(text)
    assert spec.name == name
    assert spec.yaml_path.is_file()
    assert spec.yaml_path.parent.name == folder
    assert spec.image_size == size


def test_512_variant_overrides_are_exact():
    spec = resolve_model_config("sam2.1_hiera_t512")
    assert spec.yaml_path.name == "sam2.1_hiera_t.yaml"
    assert spec.override_dict() == {
        "image_size": 512,
        "memory_attention.layer.self_attention.feat_sizes": [32, 32],
        "memory_attention.layer.cross_attention.feat_sizes": [32, 32],
    }
    cfg = compose_model_config(spec)
    assert cfg.image_size == 512
    assert list(cfg.memory_attention.layer.self_attention.feat_sizes) == [32, 32]
    assert list(cfg.memory_attention.layer.cross_attention.feat_sizes) == [32, 32]
    # the rest is SAM2.1 tiny, untouched
    assert cfg.image_encoder.trunk.embed_dim == 96
    assert list(cfg.image_encoder.trunk.stages) == [1, 2, 7, 2]
    # any model at another size: RoPE sizes follow
    other = resolve_model_config("sam2.1_hiera_s", image_size=768)
    assert other.override_dict()["memory_attention.layer.cross_attention.feat_sizes"] == [48, 48]
    assert other.name == "sam2.1_hiera_s@768"


def test_unknown_and_bad_configs(tmp_path):
    with pytest.raises(Sam2ModelError, match="unknown SAM2 model config 'vit_h'.*sam2.1_hiera_t512"):
        resolve_model_config("vit_h")
    with pytest.raises(Sam2ModelError, match="multiple of 32"):
        resolve_model_config("sam2.1_hiera_t", image_size=500)
    training = tmp_path / "train.yaml"
    training.write_text("trainer:\n  model:\n    _target_: training.model.sam2.SAM2Train\n")
    with pytest.raises(Sam2ModelError, match="no top-level 'model' section.*training config"):
        build_model(str(training))
    evil = tmp_path / "evil.yaml"
    evil.write_text("model:\n  _target_: sam2.modeling.sam2_base.SAM2Base\n  image_encoder:\n    _target_: os.system\n")
    with pytest.raises(Sam2ModelError, match=r"model.image_encoder._target_ = 'os.system'"):
        build_model(str(evil))


def test_yaml_path_with_model_section_builds(tmp_path):
    """A user's YAML (like MedSAM2's sam2.1_hiera_t512.yaml) with a top-level model section."""
    import importlib.util

    src = Path(next(iter(importlib.util.find_spec("sam2").submodule_search_locations)))
    text = (src / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml").read_text()
    text = text.replace("image_size: 1024", "image_size: 512").replace("feat_sizes: [64, 64]", "feat_sizes: [32, 32]")
    path = tmp_path / "sam2.1_hiera_t512.yaml"
    path.write_text(text)
    spec = resolve_model_config(str(path))
    assert spec.yaml_path == path.resolve()
    model = build_model(spec, seed=0)
    assert model.image_size == 512


# -- the 512 variant -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny512():
    return build_model("sam2.1_hiera_t512", seed=1)


def test_512_variant_has_the_sam21_tiny_schema(tiny512):
    """MedSAM2 checkpoints are SAM2.1-tiny state dicts: same keys and shapes at 512."""
    tiny1024 = build_model("sam2.1_hiera_t", seed=1)
    a, b = tiny512.state_dict(), tiny1024.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert tiny512.image_size == 512 and tiny1024.image_size == 1024
    assert tiny512.sam_image_embedding_size == 32
    layer = tiny512.memory_attention.layers[0]
    assert layer.self_attn.freqs_cis.shape[0] == 32 * 32
    assert layer.cross_attn_image.freqs_cis.shape[0] == 32 * 32
    # seeded: same seed, same weights; the caller's RNG is untouched
    state = torch.random.get_rng_state()
    again = build_model("sam2.1_hiera_t512", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in a.items())


def test_image_predictor_at_512_matches_our_decoder(tiny512):
    """SAM2ImagePredictor hard-codes 1024-pixel feature sizes; with the fix it runs at 512,
    and our batched encoder + decoder give exactly its logits (same preprocessing, and
    the box in SAM2's (x, y) order)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from inference.sam2_features import SliceFeatureCache, decode_prompts

    rng = np.random.default_rng(0)
    gray = (rng.random((1, 96, 128)) * 60).astype(np.uint8)
    gray[0, 30:60, 70:110] = 200
    box = (28.0, 68.0, 62.0, 112.0)  # (i0, j0, i1, j1): not square, not symmetric
    rgb = np.repeat(gray[0][..., None], 3, axis=2)
    with torch.inference_mode():
        broken = SAM2ImagePredictor(tiny512)
        with pytest.raises(RuntimeError):
            broken.set_image(rgb)  # SAM2 1.1.0's 1024-based sizes do not fit a 512 model
        predictor = make_image_predictor(tiny512)
        predictor.set_image(rgb)
        theirs, their_iou, _ = predictor.predict(
            box=np.array([box[1], box[0], box[3], box[2]]), multimask_output=False, return_logits=True
        )
        swapped, _, _ = predictor.predict(box=np.array(box), multimask_output=False, return_logits=True)
        cache = SliceFeatureCache(tiny512, gray, device="cpu")
        ours = decode_prompts(tiny512, cache.get(0)[1], (96, 128), box)
        pt_theirs, pt_ious, _ = predictor.predict(
            point_coords=np.array([[90.0, 45.0]]),
            point_labels=np.array([1]),
            multimask_output=True,
            return_logits=True,
        )
        pt_ours = decode_prompts(tiny512, cache.get(0)[1], (96, 128), None, [(45.0, 90.0, True)])
    assert ours.logits.shape == (96, 128)
    np.testing.assert_allclose(ours.logits, theirs[0], atol=1e-4)
    assert ours.iou == pytest.approx(float(their_iou[0]), abs=1e-5)
    assert np.abs(swapped[0] - theirs[0]).max() > 1e-3  # the test can tell x from y
    best = int(np.argmax(pt_ious))
    np.testing.assert_allclose(pt_ours.logits, pt_theirs[best], atol=1e-4)
    assert pt_ours.iou == pytest.approx(float(pt_ious[best]), abs=1e-5)


# -- checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tiny512, tmp_path_factory):
    """The same random weights saved in every format users bring."""
    d = tmp_path_factory.mktemp("ckpt")
    sd = {k: v.clone() for k, v in tiny512.state_dict().items()}
    paths = {
        "model": d / "sam2.1_hiera_tiny.pt",
        "model_state_dict": d / "stardust_finetune.pth",
        "bare": d / "bare_state_dict.pt",
        "ddp": d / "ddp.pt",
    }
    torch.save({"model": sd}, paths["model"])
    torch.save(
        {
            "epoch": 12,
            "model_state_dict": {"sam2_model." + k: v for k, v in sd.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-5}]},
            "best_dice": 0.81,
        },
        paths["model_state_dict"],
    )
    torch.save(sd, paths["bare"])
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, paths["ddp"])
    return sd, paths


@pytest.mark.parametrize("fmt", ["model", "model_state_dict", "bare", "ddp"])
def test_checkpoint_formats_load_identical_weights(checkpoints, fmt):
    sd, paths = checkpoints
    target = build_model("sam2.1_hiera_t512", seed=2)
    assert not torch.equal(target.state_dict()["no_mem_embed"], sd["no_mem_embed"])
    info = load_checkpoint(target, paths[fmt], "sam2.1_hiera_t512")
    loaded = target.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    assert info.format == ("model" if fmt == "ddp" else fmt)
    assert info.tensors == len(sd)
    assert len(info.sha256) == 64
    assert info.short.startswith(paths[fmt].name + " sha256:")
    if fmt == "model_state_dict":
        assert info.stripped_prefixes == ["sam2_model."]


def test_wrong_keys_fail_with_the_key_list(checkpoints, tmp_path):
    sd, _ = checkpoints
    bad = dict(sd)
    del bad["no_mem_embed"]
    bad["sam_mask_decoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.pt"
    torch.save({"model": bad}, path)
    model = build_model("sam2.1_hiera_t512", seed=2)
    before = model.state_dict()["sam_mask_decoder.iou_token.weight"].clone()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path, "sam2.1_hiera_t512")
    msg = str(err.value)
    assert "wrong.pt does not fit model sam2.1_hiera_t512" in msg
    assert "missing keys (1: no_mem_embed)" in msg
    assert "unexpected keys (1: sam_mask_decoder.extra_head.weight)" in msg
    # nothing was loaded
    assert torch.equal(model.state_dict()["sam_mask_decoder.iou_token.weight"], before)


def test_long_key_lists_are_truncated_with_counts(checkpoints, tmp_path):
    sd, _ = checkpoints
    # an image-encoder-only checkpoint: hundreds of missing keys
    partial = {k: v for k, v in sd.items() if k.startswith("image_encoder.")}
    path = tmp_path / "encoder_only.pt"
    torch.save(partial, path)
    n_missing = len(sd) - len(partial)
    with pytest.raises(CheckpointError, match=rf"missing keys \({n_missing}: .*, \.\.\. and {n_missing - 10} more\)"):
        load_checkpoint(build_model("sam2.1_hiera_t512", seed=2), path)


def test_shape_mismatch_and_mixed_prefix(checkpoints, tmp_path):
    sd, _ = checkpoints
    bad = dict(sd)
    bad["no_mem_embed"] = torch.zeros(1, 1, 128)
    path = tmp_path / "shape.pt"
    torch.save({"model": bad}, path)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1: no_mem_embed \(1, 1, 128\) vs \(1, 1, 256\)\)"):
        load_checkpoint(build_model("sam2.1_hiera_t512", seed=2), path)
    mixed = {("sam2_model." + k if k.startswith("image_encoder.") else k): v for k, v in sd.items()}
    path = tmp_path / "mixed.pt"
    torch.save({"model_state_dict": mixed}, path)
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys.*sam2_model.image_encoder"):
        load_checkpoint(build_model("sam2.1_hiera_t512", seed=2), path)


class _NotATensor:  # a pickled Python object: torch.load(weights_only=True) refuses it
    pass


def test_unsafe_and_foreign_files_are_refused(checkpoints, tmp_path):
    sd, _ = checkpoints
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": {"no_mem_embed": sd["no_mem_embed"]}, "config": _NotATensor()}, pickled)
    model = build_model("sam2.1_hiera_t512", seed=2)
    with pytest.raises(CheckpointError, match="Python objects besides tensors.*weights_only=True.*Re-save"):
        load_checkpoint(model, pickled)
    other = tmp_path / "optimizer_only.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(1e-4)}}, other)
    with pytest.raises(CheckpointError, match=r"no model weights found.*got a dict with keys \['epoch', 'optimizer'\]"):
        load_checkpoint(model, other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(model, garbage)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(model, tmp_path / "absent.pt")


# -- hydra ----------------------------------------------------------------------------------
def _run_hydra_scenario(scenario: str, conf_dir: Path) -> str:
    script = textwrap.dedent(
        f"""
        import sys
        import hydra
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        gh = GlobalHydra.instance()
        def app_compose():
            cfg = compose(config_name="app")
            assert cfg.node.name == "test-node", cfg
        if {scenario!r} == "app-first":
            initialize_config_dir(config_dir={str(conf_dir)!r}, version_base="1.3")
            app_compose()
        before = gh.is_initialized()
        from inference.sam2_models import build_model
        assert gh.is_initialized() == before, "importing sam2 changed GlobalHydra"
        m1 = build_model("sam2.1_hiera_t512", seed=0)
        m2 = build_model("sam2.1_hiera_t", seed=0)
        assert gh.is_initialized() == before, "building changed GlobalHydra"
        if before:
            app_compose()  # the application's config search path is intact
        else:
            # the application can still initialise hydra after the node built models
            initialize_config_dir(config_dir={str(conf_dir)!r}, version_base="1.3")
            app_compose()
            m3 = build_model("sam2.1_hiera_t512", seed=0)
            app_compose()
        print("OK", before, m1.image_size, m2.image_size)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=str(conf_dir), env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("scenario, initialised", [("fresh", False), ("app-first", True)])
def test_hydra_state_is_left_as_found(tmp_path, scenario, initialised):
    """``import sam2`` initialises hydra globally; our import undoes that, and building
    twice (or after the application initialised hydra) works and changes nothing."""
    (tmp_path / "app.yaml").write_text("node:\n  name: test-node\n")
    assert _run_hydra_scenario(scenario, tmp_path) == f"OK {initialised} 512 1024"
