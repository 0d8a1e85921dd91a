"""Routing rules (dicom_node.rules): matching, first-match order, validation, file loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
import yaml
from helpers import REPO, shared_path
from pydicom.dataset import Dataset

from dicom_node.rules import Action, RuleContext, RulesError, RuleSet
from inference.engine import SegmentOptions
from rtstruct.prompts import result_roi_names


def image_header(**values) -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription = "Thorax 3mm"
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PID-4711"
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def rt_header(**values) -> Dataset:
    ds = Dataset()
    ds.Modality = "RTSTRUCT"
    ds.StructureSetLabel = "PROMPTS"
    ds.Manufacturer = "Varian Medical Systems"
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def context(**kw) -> RuleContext:
    base = dict(
        calling_aet="ECLIPSE_TPS",
        called_aet="STARDUST",
        modality="CT",
        prompt_roi_names=["BOX_LUNG"],
        roi_names=["BOX_LUNG", "Lung-Left", "Spinal-Cord"],
        image_header=image_header(),
        rtstruct_header=rt_header(),
    )
    base.update(kw)
    return RuleContext(**base)


def ruleset(*rules, defaults=None) -> RuleSet:
    data = {"version": 1, "rules": list(rules)}
    if defaults:
        data["defaults"] = defaults
    return RuleSet.from_data(data)


def rule(name, match=None, **action):
    r = {"name": name, "action": action or {"engine": "classic"}}
    if match is not None:
        r["match"] = match
    return r


# --------------------------------------------------------------------------------------
# order and outcome
# --------------------------------------------------------------------------------------
def test_first_matching_rule_wins_and_later_rules_are_not_evaluated():
    rs = ruleset(
        rule("mr-only", {"modality": "MR"}),
        rule("ct-one", {"modality": "CT"}, output_roi_name="FIRST"),
        rule("ct-two", {"modality": "CT"}, output_roi_name="SECOND"),
        rule("catch-all", output_roi_name="LAST"),
    )
    d = rs.evaluate(context())
    assert d.rule.name == "ct-one" and d.action.output_roi_name == "FIRST"
    assert d.matched and d.reason == "rule 'ct-one' fired"
    assert len(d.explanation) == 4
    assert d.explanation[0].startswith("rule 1 'mr-only': no match: modality CT is not one of MR")
    assert d.explanation[1].startswith("rule 2 'ct-one': MATCH: modality CT is one of CT")
    assert "not evaluated (rule 'ct-one' fired first)" in d.explanation[2]
    assert "not evaluated" in d.explanation[3]

    # swapping the order changes the winner
    rs2 = ruleset(
        rule("ct-two", {"modality": "CT"}, output_roi_name="SECOND"),
        rule("ct-one", {"modality": "CT"}, output_roi_name="FIRST"),
    )
    assert rs2.evaluate(context()).action.output_roi_name == "SECOND"


def test_no_rule_matches_means_not_processed_with_every_reason():
    rs = ruleset(rule("mr", {"modality": "MR"}), rule("raystation", {"calling_aet": "RAYSTATION.*"}))
    d = rs.evaluate(context())
    assert d.rule is None and d.action is None and not d.matched
    assert d.reason == "no rule matched: the case is not processed"
    assert "modality CT is not one of MR" in d.explanation[0]
    assert "calling AE title 'ECLIPSE_TPS' does not match 'RAYSTATION.*'" in d.explanation[1]
    assert d.explanation[-1] == "no rule matched: the case is not processed"


def test_disabled_rule_is_skipped():
    rs = ruleset({"name": "off", "enabled": False, "action": {"output_roi_name": "OFF"}}, rule("on"))
    d = rs.evaluate(context())
    assert d.rule.name == "on"
    assert d.explanation[0] == "rule 1 'off': disabled"


def test_all_conditions_must_hold_and_every_failure_is_listed():
    rs = ruleset(rule("strict", {"modality": "CT", "calling_aet": "ARIA", "roi_names": "GTV.*"}))
    d = rs.evaluate(context())
    assert d.rule is None
    line = d.explanation[0]
    assert "calling AE title 'ECLIPSE_TPS' does not match 'ARIA'" in line
    assert "no ROI name matches 'GTV.*'" in line and "'Spinal-Cord'" in line
    assert "modality" not in line  # the modality condition held


# --------------------------------------------------------------------------------------
# each kind of condition
# --------------------------------------------------------------------------------------
def test_ae_titles_full_match_any_pattern_and_unknown_titles():
    rs = ruleset(rule("eclipse", {"calling_aet": ["ARIA", "ECLIPSE.*"], "called_aet": "STARDUST"}))
    assert rs.evaluate(context()).matched
    assert rs.evaluate(context(calling_aet="ECLIPSE_TPS  ")).matched  # DICOM pads with spaces
    # full match: a prefix of the value is not enough
    assert not ruleset(rule("p", {"calling_aet": "ECLIPSE"})).evaluate(context()).matched
    assert not rs.evaluate(context(called_aet="OTHER_NODE")).matched
    d = rs.evaluate(context(calling_aet=None))
    assert not d.matched and "calling AE title not known" in d.explanation[0]
    # case-sensitive unless (?i)
    assert not ruleset(rule("lc", {"calling_aet": "eclipse.*"})).evaluate(context()).matched
    assert ruleset(rule("ci", {"calling_aet": "(?i)eclipse.*"})).evaluate(context()).matched


def test_modality_is_exact_and_case_insensitive():
    rs = ruleset(rule("mr", {"modality": ["mr", "MR"]}), rule("ct", {"modality": "ct"}))
    assert rs.evaluate(context(modality="MR")).rule.name == "mr"
    assert rs.evaluate(context(modality="CT")).rule.name == "ct"
    assert not rs.evaluate(context(modality="PT")).matched
    d = rs.evaluate(context(modality=None))
    assert "modality not known" in d.explanation[0]


def test_roi_name_patterns_on_all_rois_and_on_prompt_rois():
    rs = ruleset(
        rule("gtv-prompt", {"prompt_roi_names": "(?i)box_gtv.*"}),
        rule("has-cord", {"roi_names": ["Spinal.*"]}),
    )
    d = rs.evaluate(context())
    assert d.rule.name == "has-cord"
    assert "no prompt ROI name matches '(?i)box_gtv.*' (has 'BOX_LUNG')" in d.explanation[0]
    assert "ROI name 'Spinal-Cord' matches 'Spinal.*'" in d.explanation[1]
    assert rs.evaluate(context(prompt_roi_names=["box_GTV1"])).rule.name == "gtv-prompt"
    # the prompt ROI condition does not look at ordinary ROIs
    d = ruleset(rule("p", {"prompt_roi_names": "Spinal.*"})).evaluate(context())
    assert not d.matched
    d = ruleset(rule("p", {"prompt_roi_names": "BOX.*"})).evaluate(context(prompt_roi_names=[]))
    assert "there are no prompt ROI names" in d.explanation[0]


def test_image_tags_by_keyword_and_by_tag_number():
    rs = ruleset(rule("chest", {"image_tags": {"BodyPartExamined": "CHEST|LUNG", "(0008,103E)": "(?i)thorax.*"}}))
    d = rs.evaluate(context())
    assert d.matched
    assert "image tag BodyPartExamined (0018,0015) 'CHEST' matches 'CHEST|LUNG'" in d.explanation[0]
    assert "image tag SeriesDescription (0008,103E) 'Thorax 3mm' matches" in d.explanation[0]
    d = rs.evaluate(context(image_header=image_header(BodyPartExamined="PELVIS")))
    assert not d.matched and "'PELVIS' does not match 'CHEST|LUNG'" in d.explanation[0]
    # other spellings of a tag number
    for key in ("0018,0015", "00180015", "(0018, 0015)"):
        assert ruleset(rule("n", {"image_tags": {key: "CHEST"}})).evaluate(context()).matched


def test_multivalued_absent_and_private_tags():
    assert ruleset(rule("orig", {"image_tags": {"ImageType": r"ORIGINAL\\PRIMARY\\.*"}})).evaluate(context()).matched
    d = ruleset(rule("kvp", {"image_tags": {"KVP": "120"}})).evaluate(context())
    assert not d.matched and "image tag KVP (0018,0060) absent" in d.explanation[0]
    header = image_header()
    header.add_new(0x00091001, "LO", "STARDUST-TEST")  # a private element, by number
    assert (
        ruleset(rule("priv", {"image_tags": {"(0009,1001)": "STARDUST-.*"}}))
        .evaluate(context(image_header=header))
        .matched
    )
    d = ruleset(rule("nohdr", {"image_tags": {"Modality": "CT"}})).evaluate(context(image_header=None))
    assert "no header available" in d.explanation[0]


def test_rtstruct_tags_look_at_the_rtstruct_header_only():
    rs = ruleset(rule("varian", {"rtstruct_tags": {"Manufacturer": "Varian.*", "StructureSetLabel": "PROMPTS"}}))
    assert rs.evaluate(context()).matched
    # the image header has no StructureSetLabel; the RTSTRUCT's is what counts
    d = rs.evaluate(context(rtstruct_header=rt_header(Manufacturer="RaySearch")))
    assert not d.matched and "RTSTRUCT tag Manufacturer (0008,0070) 'RaySearch' does not match" in d.explanation[0]
    d = ruleset(rule("img", {"image_tags": {"StructureSetLabel": "PROMPTS"}})).evaluate(context())
    assert not d.matched and "image tag StructureSetLabel (3006,0002) absent" in d.explanation[0]


def test_identifying_values_never_appear_in_explanations():
    rs = ruleset(rule("pid", {"image_tags": {"PatientID": "OTHER", "PatientName": "DOE.*"}}))
    d = rs.evaluate(context())
    text = "\n".join(d.explanation)
    assert "PID-4711" not in text and "JANE" not in text
    assert "PatientID (0010,0020) <withheld: identifying> does not match 'OTHER'" in text


# --------------------------------------------------------------------------------------
# actions
# --------------------------------------------------------------------------------------
def test_action_gives_segment_options_engine_config_and_names(tmp_path):
    rs = ruleset(
        rule(
            "sam",
            engine="sam2",
            mode="video3d",
            checkpoint=str(tmp_path / "m.pt"),
            model_cfg="configs/sam2.1/sam2.1_hiera_t.yaml",
            window="-600,1600",
            margin_mm=5,
            min_area_mm2=2.5,
            min_area_fraction=0.1,
            max_extent_mm=80,
            output_roi_name="{target}_SAM",
            output_color="#00ff80",
            destinations="tps",
            engine_options={"image_size": 512},
        )
    )
    a = rs.rules[0].action
    assert a.segment_options() == SegmentOptions(
        mode="video3d",
        window=(-600.0, 1600.0),
        margin_mm=5.0,
        min_area_mm2=2.5,
        min_area_fraction=0.1,
        max_extent_mm=80.0,
    )
    assert a.engine_spec().config() == {
        "checkpoint": str(tmp_path / "m.pt"),
        "model_cfg": "configs/sam2.1/sam2.1_hiera_t.yaml",
        "image_size": 512,
    }
    assert a.output_color == (0, 255, 128) and a.destinations == ["tps"]
    names = result_roi_names(["LIVER", "", "AVERYLONGTARGETNAME"], existing=[], template=a.output_roi_name)
    assert names == ["LIVER_SAM", "GTV_AI", "AVERYLONGTARGETN"]  # at most 16 characters
    assert rs.check_files() == [f"rule 'sam': checkpoint {tmp_path / 'm.pt'} is not a file"]
    (tmp_path / "m.pt").write_bytes(b"weights")
    assert rs.check_files() == []
    # defaults of the action are those of the engine contract
    assert Action().segment_options() == SegmentOptions()
    assert Action(window={"level": 40, "width": 400}).window == (40.0, 400.0)


def test_defaults_are_merged_and_rules_override_them():
    rs = ruleset(
        rule("a"),
        rule("b", destinations=["archive"], engine="classic"),
        defaults={"destinations": ["tps"], "margin_mm": 6},
    )
    a, b = (r.action for r in rs.rules)
    assert a.destinations == ["tps"] and a.margin_mm == 6
    assert b.destinations == ["archive"] and b.margin_mm == 6
    assert rs.check_destinations({"tps"}) == [
        "rule 'b': destination 'archive' is not defined in the node configuration (defined: tps)"
    ]
    assert rs.check_destinations({"tps", "archive"}) == []
    nowhere = ruleset(rule("nowhere"))
    assert nowhere.check_destinations(set()) == [
        "rule 'nowhere': no destinations and no export_folder: results would go nowhere"
    ]


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, expected",
    [
        (
            {"rules": [rule("x", {"calling_aet": "ECL(IPSE"})]},
            "rule #1 'x': match.calling_aet: bad regular expression 'ECL(IPSE': missing ), unterminated subpattern",
        ),
        (
            {"rules": [rule("ok"), rule("tags", {"image_tags": {"BodyPart": "CHEST"}})]},
            "rule #2 'tags': match.image_tags: 'BodyPart' is neither a DICOM keyword",
        ),
        (
            {"rules": [rule("tagre", {"rtstruct_tags": {"Manufacturer": "[Varian"}})]},
            "rule #1 'tagre': match.rtstruct_tags: Manufacturer: bad regular expression '[Varian'",
        ),
        (
            {"rules": [rule("seq", {"image_tags": {"ReferencedImageSequence": ".*"}})]},
            "'ReferencedImageSequence' is a sequence",
        ),
        (
            {"rules": [rule("typo", {"modalty": "CT"})]},
            "rule #1 'typo': match.modalty: unknown key (known: calling_aet",
        ),
        ({"rules": [rule("w", window=[40, 0])]}, "rule #1 'w': action.window: window width must be a positive number"),
        ({"rules": [rule("w", window="40")]}, "action.window: window '40': write it as LEVEL,WIDTH"),
        ({"rules": [rule("s", engine="sam2")]}, "rule #1 's': action: engine sam2 needs 'checkpoint'"),
        ({"rules": [rule("c", engine="classic", mode="video3d")]}, "engine classic supports only mode box2d"),
        (
            {"rules": [rule("e", engine="sam3")]},
            "rule #1 'e': action.engine: unknown engine 'sam3' (known: classic, sam2",
        ),
        (
            {"rules": [rule("n", output_roi_name="THIS_NAME_IS_TOO_LONG")]},
            "action.output_roi_name: 'THIS_NAME_IS_TOO_LONG' is longer than 16 characters",
        ),
        ({"rules": [rule("n", output_roi_name="{organ}_AI")]}, "the only placeholder allowed is {target}"),
        (
            {"rules": [rule("col", output_color=[255, 0, 300])]},
            "action.output_color: colour components must be integers 0-255",
        ),
        (
            {"rules": [rule("f", min_area_fraction=1.5)]},
            "rule #1 'f': action.min_area_fraction: Input should be less than or equal to 1",
        ),
        ({"rules": [rule("k", flavour="mild")]}, "rule #1 'k': action.flavour: unknown key"),
        (
            {"rules": [rule("dev", engine="sam2", checkpoint="/m.pt", engine_options={"device": "cuda"})]},
            "action.engine_options: 'device' is not an engine option here: the worker chooses the device",
        ),
        (
            {"rules": [rule("opt", engine="sam2", checkpoint="/m.pt", engine_options={"img_size": 512})]},
            "rule #1 'opt': action: engine_options: unknown option(s) for engine sam2: img_size (known: batch_size",
        ),
        ({"rules": [{"match": {"modality": "CT"}, "action": {}}]}, "rule #1: name: missing"),
        ({"rules": [{"name": "noaction"}]}, "rule #1 'noaction': action: missing"),
        ({"rules": [rule("d"), rule("d")]}, "rule names must be unique; repeated: d"),
        ({"rules": []}, "'rules' must be a non-empty list"),
        ({"rules": [rule("a")], "version": 2}, "version: this node reads rules version 1, not 2"),
        ({"rules": [rule("a")], "default": {}}, "unknown top-level key(s) default"),
        ({"rules": [rule("a")], "defaults": {"windw": [1, 2]}}, "defaults: unknown action field(s) windw"),
        (
            {"rules": [rule("a")], "defaults": {"window": [1, -2]}},
            "rule #1 'a': action.window: window width must be a positive number",
        ),
    ],
)
def test_validation_errors_name_the_rule_and_the_key(bad, expected):
    with pytest.raises(RulesError) as info:
        RuleSet.from_data(bad, source="rules.yaml")
    assert expected in str(info.value)
    assert str(info.value).startswith("rules.yaml: ")


def test_load_from_file_resolves_relative_paths_and_reports_yaml_errors(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        yaml.safe_dump({"rules": [rule("s", engine="sam2", checkpoint="models/t.pt", export_folder="out")]})
    )
    rs = RuleSet.load(path)
    assert rs.rules[0].action.checkpoint == tmp_path / "models" / "t.pt"
    assert rs.rules[0].action.export_folder == tmp_path / "out"
    assert rs.source == path

    path.write_text("rules:\n  - name: a\n    action: {engine: classic\n")
    with pytest.raises(RulesError, match=r"rules.yaml: not valid YAML"):
        RuleSet.load(path)
    with pytest.raises(RulesError, match=r"cannot read the rules file"):
        RuleSet.load(tmp_path / "missing.yaml")


def test_the_default_rules_file_is_valid_and_ends_with_a_catch_all():
    rs = RuleSet.load(REPO / "config" / "rules.yaml")
    assert rs.rules[-1].match.is_catch_all() and rs.rules[-1].enabled
    assert rs.check_destinations({"tps"}) == []
    assert rs.check_files() == []  # the SAM2 example ships disabled
    assert any(r.action.engine == "sam2" and not r.enabled for r in rs.rules)
    # an MR case gets the MR rule (no CT window), a CT case the catch-all (40/400)
    assert rs.evaluate(context(modality="MR")).action.window is None
    d = rs.evaluate(context(modality="CT"))
    assert d.rule.name == "default" and d.action.window == (40.0, 400.0)
    # even with Eclipse and a chest CT the disabled SAM2 rule never fires
    assert d.explanation[0].endswith("disabled")


# --------------------------------------------------------------------------------------
# contexts from real files
# --------------------------------------------------------------------------------------
def test_context_from_real_files_reads_headers():
    root = shared_path("lung1-001-ct")
    rt = next((root / "RTSTRUCT").glob("*.dcm"))
    ctx = RuleContext.from_files(root / "CT", rt, calling_aet="ECLIPSE", called_aet="STARDUST")
    assert ctx.modality == "CT"
    assert ctx.roi_names == ["GTV-1", "Spinal-Cord", "Lung-Left", "Lung-Right"]
    assert ctx.prompt_roi_names == []  # no BOX_/POS_/NEG_ ROIs in the clinical structure set
    assert "PixelData" not in ctx.image_header
    rs = ruleset(
        rule(
            "lung",
            {
                "roi_names": "GTV-.*",
                "image_tags": {"Modality": "CT"},
                "rtstruct_tags": {"Modality": "RTSTRUCT"},
                "calling_aet": "ECLIPSE",
            },
        )
    )
    assert rs.evaluate(ctx).matched


def test_context_from_files_with_prompt_rois_and_a_bad_rtstruct(tmp_path):
    root = shared_path("lung1-001-ct")
    rt = pydicom.dcmread(next((root / "RTSTRUCT").glob("*.dcm")))
    rt.StructureSetROISequence[0].ROIName = "BOX_GTV1"
    rt.save_as(tmp_path / "prompt.dcm")
    ctx = RuleContext.from_files(sorted((root / "CT").glob("*.dcm"))[:3], tmp_path / "prompt.dcm")
    assert ctx.prompt_roi_names == ["BOX_GTV1"] and ctx.modality == "CT"

    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(RulesError, match="junk.dcm: cannot read the RTSTRUCT"):
        RuleContext.from_files(root / "CT", tmp_path / "junk.dcm")
    ct = next((root / "CT").glob("*.dcm"))
    shutil.copy(ct, tmp_path / "ct.dcm")
    with pytest.raises(RulesError, match="not an RT Structure Set"):
        RuleContext.from_files(root / "CT", tmp_path / "ct.dcm")


def test_engine_config_keys_are_parameters_of_the_sam2_engine():
    import inspect

    from inference.engine import ENGINES
    from inference.engines.sam2 import Sam2Engine

    params = set(inspect.signature(Sam2Engine.__init__).parameters)
    action = Action(
        engine="sam2",
        checkpoint=Path("/m.pt"),
        model_cfg="configs/sam2.1/sam2.1_hiera_t.yaml",
        engine_options={k: 1 for k in ENGINES["sam2"].rule_options},
    )
    assert set(action.engine_spec().for_worker("cuda:0", "/var/cache").config()) <= params


def test_backslash_in_a_single_quoted_yaml_regex_matches_a_multivalued_element(tmp_path):
    # exactly as the comment in config/rules.yaml tells users to write it
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n  - name: orig\n    match:\n      image_tags:\n"
        "        ImageType: 'ORIGINAL\\\\PRIMARY\\\\.*'\n    action: {engine: classic}\n"
    )
    rs = RuleSet.load(path)
    assert rs.evaluate(context()).matched
    assert not rs.evaluate(context(image_header=image_header(ImageType=["DERIVED", "SECONDARY"]))).matched


def test_action_survives_the_json_round_trip_the_job_queue_uses(tmp_path):
    # the node stores decision.action.model_dump(mode="json") with the job and the worker
    # re-validates it with Action.model_validate
    import json

    rs = ruleset(
        rule(
            "full",
            engine="sam2",
            mode="video3d",
            checkpoint=str(tmp_path / "m.pt"),
            model_cfg="sam2.1_hiera_t512",
            engine_options={"image_size": 512, "precision": "fp32"},
            window=[-600, 1600],
            output_roi_name="{target}_AI",
            output_color=[0, 255, 0],
            destinations=["tps", "pacs"],
            export_folder=str(tmp_path / "out"),
            margin_mm=2.5,
        )
    )
    for action in (rs.rules[0].action, Action()):
        again = Action.model_validate(json.loads(json.dumps(action.model_dump(mode="json"))))
        assert again == action
        assert again.segment_options() == action.segment_options()
        assert again.engine_spec() == action.engine_spec()


def test_every_litemedsam_option_that_rules_yaml_documents_is_accepted_by_a_rule():
    # config/rules.yaml lists the litemedsam engine_options a rule may set; each must pass
    # the rule's validation and reach a parameter of the engine's constructor
    import inspect
    import re

    from inference.engine import ENGINES
    from inference.engines.litemedsam import LiteMedSamEngine

    text = (Path(__file__).resolve().parents[1] / "config" / "rules.yaml").read_text()
    block = text[text.index("litemedsam: runtime") : text.index("The\n#                      device comes")]
    # every word of that comment that names a parameter of the engine's constructor
    documented = set(re.findall(r"[a-z_]+", block)) & set(inspect.signature(LiteMedSamEngine.__init__).parameters)
    assert {"runtime", "precision", "threads", "cache_slices", "batch_size", "point_method"} <= documented
    assert documented <= ENGINES["litemedsam"].rule_options
    action = Action(engine="litemedsam", engine_options={"point_method": "margins", "threads": 2})
    assert dict(action.engine_spec().options) == {"point_method": "margins", "threads": 2}
    params = set(inspect.signature(LiteMedSamEngine.__init__).parameters)
    assert set(action.engine_spec().for_worker("cpu", "/var/cache").config()) <= params
