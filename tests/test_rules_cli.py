"""``dicom-node rules test``: the dry run on real files (a phantom and LUNG1-001)."""

from __future__ import annotations

import shutil
from pathlib import Path

import helpers
import pydicom
import pytest
import yaml
from helpers import REPO, shared_path

from dicom_node.cli import main

DEFAULT_RULES = str(REPO / "config" / "rules.yaml")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["rules", "test", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def phantom() -> dict[str, Path]:
    return helpers.phantom(3, "CT")


def write_rules(path: Path, rules: list[dict], **top) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "rules": rules, **top}, sort_keys=False))
    return path


def test_phantom_prompt_case_with_the_default_rules(capsys, phantom):
    rc, out, err = run_cli(
        capsys, phantom["images"], phantom["prompt"], "--rules", DEFAULT_RULES, "--calling-aet", "ECLIPSE"
    )
    assert rc == 0, out + err
    n_images = len(list(phantom["images"].iterdir()))
    assert f"images: {n_images} in referenced series" in out
    assert f"({n_images} of {n_images} referenced images present)" in out
    assert "modality: CT" in out
    assert "prompt ROIs: BOX_" in out
    assert "rule 1 'lung-ct-sam2': disabled" in out
    assert "rule 2 'mr': no match: modality CT is not one of MR" in out
    assert "rule 3 'default': MATCH: catch-all (no conditions)" in out
    assert "=> rule 'default' fires: engine litemedsam; mode box2d; window 40/400" in out
    assert "output ROI(s): " in out and "_AI" in out
    assert "1 RTSTRUCT(s): 1 processed by a rule, 0 matching no rule" in out


def test_phantom_folder_with_truth_and_rules_on_ae_titles_and_tags(capsys, phantom, tmp_path):
    rules = write_rules(
        tmp_path / "rules.yaml",
        [
            {"name": "from-aria", "match": {"calling_aet": "ARIA.*"}, "action": {"destinations": ["tps"]}},
            {
                "name": "prompt-ct",
                "match": {
                    "calling_aet": "ECLIPSE",
                    "called_aet": "STARDUST",
                    "prompt_roi_names": "BOX_.*",
                    "image_tags": {"(0008,0060)": "CT"},
                    "rtstruct_tags": {"Modality": "RTSTRUCT"},
                },
                "action": {"destinations": ["tps"], "margin_mm": 4},
            },
        ],
    )
    # the whole folder: prompt.dcm is a case; truth.dcm (GTV only) matches no rule
    rc, out, _ = run_cli(
        capsys, phantom["prompt"].parent, "--rules", rules, "--calling-aet", "ECLIPSE", "--called-aet", "STARDUST"
    )
    assert rc == 1
    cases = out.split("\ncase ")[1:]
    assert len(cases) == 2
    prompt_case = next(c for c in cases if "prompt.dcm" in c.splitlines()[0])
    truth_case = next(c for c in cases if "truth.dcm" in c.splitlines()[0])
    assert "rule 1 'from-aria': no match: calling AE title 'ECLIPSE' does not match 'ARIA.*'" in prompt_case
    assert "rule 2 'prompt-ct': MATCH: calling AE title 'ECLIPSE' matches 'ECLIPSE'" in prompt_case
    assert "image tag Modality (0008,0060) 'CT' matches 'CT'" in prompt_case
    assert "=> rule 'prompt-ct' fires" in prompt_case
    assert "there are no prompt ROI names; wanted one matching 'BOX_.*'" in truth_case
    assert "=> no rule fires: the node would not process this case" in truth_case
    assert "2 RTSTRUCT(s): 1 processed by a rule, 1 matching no rule" in out

    # without the AE titles the dry run says they are unknown
    rc, out, _ = run_cli(capsys, phantom["images"], phantom["prompt"], "--rules", rules)
    assert rc == 1
    assert "calling AE title not known (not given)" in out


def test_without_options_the_default_node_configuration_is_used(capsys, phantom, monkeypatch):
    monkeypatch.setenv("STARDUST_CONFIG", str(REPO / "config" / "node.yaml"))
    rc, out, _ = run_cli(capsys, phantom["images"], phantom["prompt"])
    assert rc == 0
    assert f"rules: {REPO / 'config' / 'rules.yaml'} (3 rule(s))" in out
    assert "called AE title: STARDUST (the node's AE title)" in out
    assert "warning" not in out  # the default rules name only destinations node.yaml defines


def test_node_config_names_the_rules_file_and_destinations(capsys, phantom, tmp_path):
    write_rules(
        tmp_path / "my-rules.yaml",
        [
            {"name": "all", "action": {"destinations": ["tps", "archive"]}},
        ],
    )
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "ae_title": "STARDUST_T",
                "rules": "my-rules.yaml",
                "data_dir": "data",
                "access": {"calling_aets": ["ECLIPSE"]},
                "destinations": {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 104}},
            }
        )
    )
    rc, out, _ = run_cli(capsys, phantom["images"], phantom["prompt"], "-c", config)
    assert rc == 0
    assert f"rules: {tmp_path / 'my-rules.yaml'} (1 rule(s))" in out
    assert "warning: rule 'all': destination 'archive' is not defined in the node configuration (defined: tps)" in out
    assert "called AE title: STARDUST_T (the node's AE title)" in out


def test_lung1_with_a_prompt_copy_of_its_rtstruct(capsys, tmp_path):
    root = shared_path("lung1-001-ct")
    original = next((root / "RTSTRUCT").glob("*.dcm"))
    ds = pydicom.dcmread(original)
    names = {item.ROINumber: item for item in ds.StructureSetROISequence}
    gtv = next(item for item in names.values() if item.ROIName == "GTV-1")
    gtv.ROIName = "BOX_GTV1"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "prompt.dcm")

    rules = write_rules(
        tmp_path / "rules.yaml",
        [
            {
                "name": "thorax-sam",
                "match": {"modality": "CT", "image_tags": {"BodyPartExamined": "(?i)abdomen"}},
                "action": {"engine": "classic", "destinations": ["tps"]},
            },
            {
                "name": "lung-gtv",
                "match": {
                    "prompt_roi_names": "BOX_GTV.*",
                    "roi_names": "Spinal-Cord",
                    "rtstruct_tags": {"Manufacturer": "(?i)varian.*"},
                },
                "action": {
                    "engine": "classic",
                    "output_roi_name": "{target}_AI",
                    "window": [-600, 1600],
                    "destinations": ["tps"],
                },
            },
        ],
    )
    rc, out, _ = run_cli(capsys, root, tmp_path / "prompt.dcm", "--rules", rules, "--calling-aet", "ECLIPSE")
    # two RTSTRUCTs: the original (no prompts) and the prompt copy
    assert rc == 1
    assert "note: skipped 1 file(s) that are not usable DICOM: LICENSE_TCIA.txt" in out
    cases = {c.splitlines()[0]: c for c in out.split("\ncase ")[1:]}
    prompt_case = next(v for k, v in cases.items() if k.endswith("prompt.dcm"))
    original_case = next(v for k, v in cases.items() if k.endswith(original.name))
    for case in (prompt_case, original_case):
        assert "images: 134 in referenced series" in case
        assert "(134 of 134 referenced images present)" in case
        assert "modality: CT" in case
    assert "prompt ROIs: BOX_GTV1" in prompt_case
    assert "rule 1 'thorax-sam': no match: image tag BodyPartExamined (0018,0015)" in prompt_case
    assert "rule 2 'lung-gtv': MATCH: ROI name 'Spinal-Cord' matches 'Spinal-Cord'" in prompt_case
    assert "RTSTRUCT tag Manufacturer (0008,0070)" in prompt_case
    assert "=> rule 'lung-gtv' fires: engine classic; mode box2d; window -600/1600" in prompt_case
    assert "output ROI(s): GTV1_AI (target 'GTV1')" in prompt_case
    assert "prompt ROIs: none: the node does not treat this RTSTRUCT as a case" in original_case
    assert "there are no prompt ROI names; wanted one matching 'BOX_GTV.*'" in original_case
    assert "2 RTSTRUCT(s): 1 processed by a rule, 1 matching no rule" in out


def test_stale_references_fall_back_to_the_frame_of_reference_and_missing_images_are_counted(capsys, tmp_path):
    root = shared_path("ge-phantom-ct")
    rc, out, _ = run_cli(capsys, root, "--rules", DEFAULT_RULES)
    assert "found by frame of reference (the RTSTRUCT references no series)" in out
    breast = shared_path("eclipse-breast")
    rc, out, _ = run_cli(capsys, breast, "--rules", DEFAULT_RULES)
    assert "(1 of 98 referenced images present; 97 missing: the node would wait for them" in out


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------
def test_no_rtstruct_is_a_clear_error(capsys, tmp_path):
    ct = shared_path("lung1-001-ct", "CT")
    folder = tmp_path / "ct"
    folder.mkdir()
    for p in sorted(ct.glob("*.dcm"))[:3]:
        shutil.copy(p, folder / p.name)
    rc, out, err = run_cli(capsys, folder, "--rules", DEFAULT_RULES)
    assert rc == 2
    assert f"error: no RTSTRUCT found under {folder} (3 image file(s), 0 unreadable or non-DICOM file(s))" in err


def test_unreadable_file_missing_path_and_bad_rules_are_clear_errors(capsys, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    rc, _, err = run_cli(capsys, junk, "--rules", DEFAULT_RULES)
    assert rc == 2 and f"error: {junk}: cannot be read as DICOM" in err

    rc, _, err = run_cli(capsys, tmp_path / "nope", "--rules", DEFAULT_RULES)
    assert rc == 2 and f"error: {tmp_path / 'nope'}: no such file or folder" in err

    bad = write_rules(tmp_path / "bad.yaml", [{"name": "oops", "match": {"calling_aet": "(("}, "action": {}}])
    rc, _, err = run_cli(capsys, tmp_path, "--rules", bad)
    assert rc == 2 and "rule #1 'oops': match.calling_aet: bad regular expression '(('" in err

    config = tmp_path / "node.yaml"
    config.write_text("ae_title: X\naccess: {calling_aets: [ECLIPSE]}\n")
    rc, _, err = run_cli(capsys, tmp_path, "-c", config)
    assert rc == 2 and "names no rules file (key 'rules')" in err
    config.write_text("ae_title: X\nrules: rules.yaml\n")
    rc, _, err = run_cli(capsys, tmp_path, "-c", config)
    assert rc == 2 and f"error: {config}: access: missing" in err


def test_an_rtstruct_that_cannot_be_used_is_reported_and_the_rest_go_on(capsys, tmp_path):
    root = shared_path("lung1-001-ct")
    ds = pydicom.dcmread(next((root / "RTSTRUCT").glob("*.dcm")))
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [1.0, 2.0]  # not x/y/z triplets
    ds.save_as(tmp_path / "broken.dcm")
    rc, out, _ = run_cli(capsys, root, tmp_path / "broken.dcm", "--rules", DEFAULT_RULES)
    assert rc == 1
    assert "cannot be read: ROI" in out and "not a whole number of x/y/z triplets" in out
    assert "2 RTSTRUCT(s): 0 processed by a rule, 0 matching no rule, 1 without prompt ROIs, 1 unreadable" in out
