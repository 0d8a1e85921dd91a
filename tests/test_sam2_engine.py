"""The sam2 engine on CPU with randomly initialised tiny models (seeded), on small phantoms.

Random weights give meaningless but deterministic masks: these tests check what does not
depend on the weights (shapes, slices reached, batching, limits, the RTSTRUCT, errors) and
that our 2D decoder and 3D driver compute exactly what SAM2's own predictors compute.
Seed 2 is used because its random model gives a non-empty, non-full mask for the phantom's
box at both sizes (and a positive object score).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import dciodvfy_errors

from dicom_node.phantom import make_phantom
from inference.engine import SegmentationError, SegmentOptions, get_engine
from inference.prompts import BoxPrompt, PointPrompt, TargetPrompts

SEED = 2
SHAPE = (12, 128, 128)
SPACING = (5.0, 3.0, 3.0)  # the phantom's tumour needs ~50 mm along the slices


def box_prompts(ph, name: str = "GTV_AI") -> TargetPrompts:
    return TargetPrompts(target="", output_name=name, boxes=[ph.box], source_rois=["BOX_"])


def engine(size: str):
    return get_engine("sam2", model_cfg=size, device="cpu", allow_random_weights=True, random_seed=SEED, batch_size=4)


def check_result_and_rtstruct(ph, prompts, result, mode, tmp_path):
    """Shape, scores, identity of the result; then a valid RTSTRUCT that reads back exactly."""
    from rtstruct.rasterize import rasterize_roi
    from rtstruct.reader import read_rtstruct
    from rtstruct.writer import RoiMask, write_rtstruct

    vol = ph.volume
    assert result.mask.shape == vol.shape
    assert result.mask.dtype == bool
    k = ph.box.slice_index
    assert result.mask[k].any(), "the prompted slice must be segmented"
    kept = set(np.flatnonzero(result.mask.any(axis=(1, 2))).tolist())
    assert k in kept
    assert set(result.slice_scores) == kept
    assert all(s is not None and 0.0 <= s <= 1.0 for s in result.slice_scores.values())
    # the 3D result is one component (slices contiguous) connected to the prompt
    assert kept == set(range(min(kept), max(kept) + 1))
    assert result.engine == "sam2" and result.mode == mode
    assert result.engine_version.startswith("sam2 ")
    assert "RANDOM WEIGHTS" in result.algorithm_name and len(result.algorithm_name) <= 64
    assert any("RANDOMLY INITIALISED" in w for w in result.warnings)
    assert any("CPU" in w for w in result.warnings)
    assert result.seconds > 0

    ds = write_rtstruct(
        vol,
        [
            RoiMask(
                name=prompts.output_name,
                mask=result.mask,
                algorithm_name=result.algorithm_name,
                algorithm_version=result.engine_version,
            )
        ],
    )
    path = tmp_path / f"sam2_{mode}.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = read_rtstruct(path)
    roi = back.roi(prompts.output_name)
    assert np.array_equal(rasterize_roi(roi, vol.geometry), result.mask)
    assert set(back.referenced_image_uids) <= set(vol.sop_instance_uids)
    import pydicom

    raw = pydicom.dcmread(path)
    obs = raw.RTROIObservationsSequence[0]
    assert obs.RTROIInterpretedType == "GTV"
    roi_item = raw.StructureSetROISequence[0]
    assert roi_item.ROIGenerationAlgorithm == "AUTOMATIC"
    assert result.algorithm_name in roi_item.ROIGenerationDescription
    assert dciodvfy_errors(path) == []


# -- full runs ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, modality", [("box2d", "CT"), ("video3d", "MR")])
def test_full_run_512(mode, modality, tmp_path):
    ph = make_phantom(modality, 0, shape=SHAPE, spacing=SPACING)
    prompts = box_prompts(ph)
    result = engine("sam2.1_hiera_t512").segment(ph.volume, prompts, SegmentOptions(mode=mode))
    check_result_and_rtstruct(ph, prompts, result, mode, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode, modality", [("box2d", "MR"), ("video3d", "CT")])
def test_full_run_1024(mode, modality, tmp_path):
    ph = make_phantom(modality, 0, shape=SHAPE, spacing=SPACING)
    prompts = box_prompts(ph)
    eng = engine("sam2.1_hiera_t")
    assert eng.image_size == 1024
    result = eng.segment(ph.volume, prompts, SegmentOptions(mode=mode))
    check_result_and_rtstruct(ph, prompts, result, mode, tmp_path)


def test_engine_is_built_once_and_reused():
    a = engine("sam2.1_hiera_t512")
    b = engine("sam2.1_hiera_t512")
    assert a is b and a.model is b.model
    assert a.image_size == 512


# -- limits and batching ---------------------------------------------------------------------
def test_3d_respects_max_extent():
    ph = make_phantom("CT", 0, shape=SHAPE, spacing=SPACING)
    k = ph.box.slice_index
    opts = SegmentOptions(mode="video3d", max_extent_mm=5.0)  # one 5 mm slice each way
    result = engine("sam2.1_hiera_t512").segment(ph.volume, box_prompts(ph), opts)
    kept = np.flatnonzero(result.mask.any(axis=(1, 2)))
    assert kept.min() >= k - 1 and kept.max() <= k + 1


def test_2d_encodes_only_reached_slices_in_batches():
    """prefetch() encodes a batch ahead of the front, only within the walk's reach, and
    drops the slices behind it."""
    from inference import preprocess
    from inference.propagation import PropagationParams, propagate_2d
    from inference.sam2_features import Sam2SliceSegmenter, SliceFeatureCache

    ph = make_phantom("CT", 0, shape=SHAPE, spacing=SPACING)
    k = ph.box.slice_index
    gray = preprocess.prepare(ph.volume).gray
    model = engine("sam2.1_hiera_t512").model
    cache = SliceFeatureCache(model, gray, device="cpu", batch_size=2)
    seg = Sam2SliceSegmenter(cache, [k], object_score_stop=False)
    params = PropagationParams(max_extent_mm=10.0, min_area_mm2=0.0, min_area_fraction=0.0, prefetch_batch=2)
    with torch.inference_mode():
        res = propagate_2d(seg, gray.shape, SPACING, box_prompts(ph), params)
    reachable = set(range(k - 2, k + 3))
    assert seg.decoded <= reachable
    assert cache.stats.encoded == len(seg.decoded | set(cache.entries))  # nothing encoded twice
    assert cache.stats.encoded <= len(reachable)
    # anchor alone, then one batch of 2 up and one down
    assert cache.stats.batches <= 3
    assert cache.stats.peak_cached <= 1 + 2 + 2
    assert set(res.slice_scores) <= seg.decoded


# -- errors ----------------------------------------------------------------------------------
def test_bad_prompts_and_modes_are_clear_errors():
    ph = make_phantom("CT", 0, shape=SHAPE, spacing=SPACING)
    eng = engine("sam2.1_hiera_t512")
    outside = TargetPrompts("", "GTV_AI", boxes=[BoxPrompt(40, 1, 1, 5, 5)])
    with pytest.raises(SegmentationError, match=r"slices \[40\] outside 0..11"):
        eng.segment(ph.volume, outside, SegmentOptions())
    negative_only = TargetPrompts("", "GTV_AI", points=[PointPrompt(6, 60, 60, positive=False)])
    with pytest.raises(SegmentationError, match="no box and no positive point"):
        eng.segment(ph.volume, negative_only, SegmentOptions(mode="video3d"))
    with pytest.raises(SegmentationError, match="unknown mode 'video2d'"):
        eng.segment(ph.volume, box_prompts(ph), SegmentOptions(mode="video2d"))  # type: ignore[arg-type]


def test_engine_refuses_random_weights_and_bad_config(tmp_path):
    from inference.engines.sam2 import Sam2Engine
    from inference.sam2_models import Sam2ModelError

    with pytest.raises(Sam2ModelError, match="needs a checkpoint.*refusing to run with randomly initialised"):
        Sam2Engine(model_cfg="sam2.1_hiera_t512", device="cpu")
    with pytest.raises(Sam2ModelError, match="checkpoint not found"):
        Sam2Engine(checkpoint=str(tmp_path / "absent.pt"), device="cpu")
    with pytest.raises(Sam2ModelError, match="unknown SAM2 model config"):
        Sam2Engine(model_cfg="sam3_hiera_t", allow_random_weights=True, device="cpu")
    with pytest.raises(Sam2ModelError, match="unknown sam2 engine option.*bach_size.*known: checkpoint"):
        Sam2Engine(allow_random_weights=True, device="cpu", bach_size=4)
    with pytest.raises(Sam2ModelError, match="precision"):
        Sam2Engine(allow_random_weights=True, precision="fp8", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(Sam2ModelError, match="CUDA is not available"):
            Sam2Engine(allow_random_weights=True, device="cuda")
    assert issubclass(Sam2ModelError, SegmentationError)  # callers catch one error type


@pytest.fixture(scope="module")
def blind_checkpoint(tmp_path_factory):
    """A real checkpoint whose mask head outputs zero logits: every mask is empty."""
    model = engine("sam2.1_hiera_t512").model
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    zeroed = [k for k in sd if k.startswith("sam_mask_decoder.output_hypernetworks_mlps.") and ".layers.2." in k]
    assert len(zeroed) == 8
    for k in zeroed:
        sd[k].zero_()
    path = tmp_path_factory.mktemp("blind") / "MedSAM2_blind_finetune_with_a_rather_long_file_name.pt"
    torch.save({"model": sd}, path)
    return path


@pytest.mark.parametrize("mode", ["box2d", "video3d"])
def test_empty_result_is_a_segmentation_error(blind_checkpoint, mode):
    ph = make_phantom("CT", 0, shape=SHAPE, spacing=SPACING)
    eng = get_engine("sam2", checkpoint=str(blind_checkpoint), model_cfg="sam2.1_hiera_t512", device="cpu")
    with pytest.raises(SegmentationError, match=r"produced an empty mask for target '' on prompted slice\(s\) \[6\]"):
        eng.segment(ph.volume, box_prompts(ph), SegmentOptions(mode=mode, max_extent_mm=5.0))


def test_algorithm_name_names_model_and_weights(blind_checkpoint):
    from inference.sam2_models import file_sha256

    eng = get_engine("sam2", checkpoint=str(blind_checkpoint), model_cfg="sam2.1_hiera_t512", device="cpu")
    name = eng.algorithm_name
    assert len(name) <= 64
    assert name.startswith("SAM2 sam2.1_hiera_t512 MedSAM2_blind")
    assert name.endswith(f" sha256:{file_sha256(blind_checkpoint)[:12]}")
    assert "~" in name  # the long file name was shortened to fit AlgorithmName (LO, 64)
    assert eng.checkpoint_info is not None and eng.checkpoint_info.format == "model"
    assert not any("RANDOM" in w for w in eng.warnings)


def test_wrong_checkpoint_fails_at_engine_build(tmp_path):
    from inference.engines.sam2 import Sam2Engine
    from inference.sam2_models import CheckpointError

    sd = engine("sam2.1_hiera_t512").model.state_dict()
    path = tmp_path / "sam2_image_only.pt"
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("memory_")}}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+: memory_attention\..*\.\.\. and \d+ more\)"):
        Sam2Engine(checkpoint=str(path), model_cfg="sam2.1_hiera_t512", device="cpu")


# -- 3D: our driver computes what SAM2's propagate_in_video computes ------------------------
@pytest.mark.slow
def test_3d_driver_matches_sam2_propagate_in_video():
    """Batched encoding, our frame loop and the in-memory state give exactly the masks of
    SAM2's own forward + reverse propagate_in_video (MedSAM2's recipe) on the same frames."""
    from inference.sam2_features import SliceFeatureCache
    from inference.sam2_video import VideoParams, _LazyFrames, _new_state, propagate_3d

    model = engine("sam2.1_hiera_t512").model
    rng = np.random.default_rng(0)
    gray = (rng.random((5, 64, 80)) * 60).astype(np.uint8)
    gray[1:4, 20:40, 30:55] = 200
    prompts = TargetPrompts("", "GTV_AI", boxes=[BoxPrompt(2, 18, 28, 42, 57)])
    params = VideoParams(min_area_mm2=0, min_area_fraction=0, fill_holes=False, keep_connected=False, batch_size=3)
    with torch.inference_mode():
        ours = propagate_3d(model, gray, (2.5, 1.0, 1.0), prompts, params)
        cache = SliceFeatureCache(model, gray, device="cpu")
        state = _new_state(model, _LazyFrames(gray, model.image_size, torch.device("cpu")), cache, 64, 80)
        state["cached_features"] = {}  # SAM2's own one-frame cache, frames encoded one by one
        ref = np.zeros(gray.shape, dtype=bool)
        for reverse in (False, True):
            model.reset_state(state)
            model.add_new_points_or_box(state, frame_idx=2, obj_id=1, box=[28, 18, 57, 42])
            for f, _, masks in model.propagate_in_video(state, reverse=reverse):
                ref[f] |= (masks[0, 0] > 0).cpu().numpy()
    assert ref.any()
    kept = np.flatnonzero(ours.mask.any(axis=(1, 2)))
    # where our pass did not stop early, the masks are identical
    assert np.array_equal(ours.mask[kept], ref[kept])
    assert ours.slices_encoded == 5


def test_group_objects():
    from inference.sam2_video import group_objects

    prompts = TargetPrompts(
        "",
        "GTV_AI",
        boxes=[BoxPrompt(5, 50, 50, 60, 60), BoxPrompt(5, 10, 10, 20, 20), BoxPrompt(8, 11, 11, 21, 21)],
        points=[
            PointPrompt(5, 55, 55, True),
            PointPrompt(5, 90, 90, False),
            PointPrompt(9, 30, 40, True),
            PointPrompt(3, 30, 30, False),
        ],
    )
    objects, warnings = group_objects(prompts, lo=2)
    # object 0: the upper-left box on each slice (+ the stray negative point on slice 5)
    assert objects[0] == {
        3: ([10, 10, 20, 20], [[90, 90]], [0]),
        6: ([11, 11, 21, 21], [], []),
        7: (None, [[40, 30]], [1]),
    }
    # object 1: the second box on slice 5 with the point inside it
    assert objects[1] == {3: ([50, 50, 60, 60], [[55, 55]], [1])}
    assert warnings == ["slice 3: only negative points and no box; ignored as a prompt"]
