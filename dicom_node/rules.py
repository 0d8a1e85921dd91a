"""Routing rules: which engine, model and destinations a case gets (``config/rules.yaml``).

A rules file is an ordered list of rules; the **first matching rule wins**. A rule's
``match`` holds conditions that must *all* hold (a missing condition matches anything);
its ``action`` says how to segment and where the result goes. When no rule matches, the
case is not processed and :class:`Decision` says why, rule by rule (the default file ends
with a catch-all rule so that, out of the box, every prompt case is processed).

File format (see ``config/rules.yaml`` for the documented default)::

    version: 1
    defaults:                 # optional: action fields shared by every rule
      destinations: [tps]
    rules:
      - name: mr-sarcoma
        match:
          modality: MR                      # one value or a list, exact (case-insensitive)
          calling_aet: ["RAYSTATION.*"]     # regexes, full match, any of them
          called_aet: STARDUST
          roi_names: ["(?i)gtv.*"]          # any ROI of the RTSTRUCT full-matches any pattern
          prompt_roi_names: ["BOX_.*"]      # same, only the prompt ROIs (BOX_/POS_/NEG_)
          image_tags:                       # every entry must match (regex, full match)
            BodyPartExamined: "(?i)leg|thigh"
            "(0008,103E)": "(?i).*t1.*"
          rtstruct_tags:
            StructureSetLabel: "AI.*"
        action:
          engine: sam2
          mode: video3d
          checkpoint: /opt/stardust/models/medsam2.pt
          model_cfg: configs/sam2.1/sam2.1_hiera_t512.yaml
          window: null
          output_roi_name: "{target}_AI"
          output_color: [255, 0, 0]
          destinations: [tps, archive]

The node's worker builds a :class:`RuleContext` per case (or :meth:`RuleContext.from_files`),
calls :meth:`RuleSet.evaluate` and uses ``decision.action`` (``None``: do not process;
``decision.explanation`` says why).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from dicom_node.yamlfile import read_yaml
from inference.engine import SegmentOptions
from inference.files import files_under

__all__ = [
    "Action",
    "Decision",
    "Match",
    "Rule",
    "RuleContext",
    "RuleSet",
    "RulesError",
]

MAX_ROI_NAME = 16
_DEFAULT_OPTIONS = SegmentOptions()
# Header values never echoed into explanations (they end up in logs).
_IDENTIFYING = {
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "IssuerOfPatientID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionAddress",
}


class RulesError(ValueError):
    """The rules file cannot be used; the message names the file, the rule and the key."""


# --------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------
def _compile(pattern: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ValueError(f"a pattern must be a string, not {type(pattern).__name__} ({pattern!r})")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None


def _as_list(value: Any) -> Any:
    """Let a single value stand for a one-element list."""
    if value is None:
        return value
    if isinstance(value, (str, int, float)):
        return [value]
    return value


@dataclass(frozen=True)
class TagCondition:
    """A regex (full match) on one element of a header, named by keyword or tag number."""

    key: str  # as written in the rules file
    tag: BaseTag
    keyword: str | None
    pattern: re.Pattern[str]

    @property
    def label(self) -> str:
        number = f"({self.tag.group:04X},{self.tag.element:04X})"
        return f"{self.keyword} {number}" if self.keyword else number


_TAG_NUMBER = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")


def _tag_condition(key: str, pattern: Any) -> TagCondition:
    key = str(key).strip()
    m = _TAG_NUMBER.match(key)
    if m:
        tag = Tag(int(m.group(1), 16), int(m.group(2), 16))
        keyword = keyword_for_tag(tag) or None
    else:
        number = tag_for_keyword(key)
        if number is None:
            raise ValueError(
                f"{key!r} is neither a DICOM keyword (e.g. BodyPartExamined) nor a tag number like (0018,0015)"
            )
        tag, keyword = Tag(number), key
    try:
        vr = dictionary_VR(tag)
    except KeyError:  # private or unknown tag: allowed, matched on its value
        vr = None
    if vr == "SQ":
        raise ValueError(f"{key!r} is a sequence; only elements with a value can be matched")
    try:
        compiled = _compile(pattern)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return TagCondition(key=key, tag=tag, keyword=keyword, pattern=compiled)


def _element_text(ds: pydicom.Dataset | None, cond: TagCondition) -> tuple[str | None, str]:
    """(value as text or None, why it is None)."""
    if ds is None:
        return None, "no header available"
    elem = ds.get(cond.tag)
    if elem is None:
        return None, "absent"
    value = elem.value
    if elem.VR == "SQ":
        return None, "is a sequence"
    if isinstance(value, (bytes, bytearray)):
        return None, "has a binary value"
    if value is None:
        return "", ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value), ""
    return str(value), ""


def _shown(cond: TagCondition, ds: pydicom.Dataset | None, text: str) -> str:
    """The value as it may appear in an explanation (identifying values are withheld)."""
    elem = ds.get(cond.tag) if ds is not None else None
    if (cond.keyword in _IDENTIFYING) or (elem is not None and elem.VR == "PN"):
        return "<withheld: identifying>"
    return repr(text if len(text) <= 64 else text[:61] + "...")


class Match(BaseModel):
    """Conditions of a rule; all given ones must hold. Patterns are regexes, full match."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    calling_aet: list[re.Pattern[str]] | None = None
    called_aet: list[re.Pattern[str]] | None = None
    modality: list[str] | None = None
    roi_names: list[re.Pattern[str]] | None = None
    prompt_roi_names: list[re.Pattern[str]] | None = None
    image_tags: list[TagCondition] | None = None
    rtstruct_tags: list[TagCondition] | None = None

    @field_validator("calling_aet", "called_aet", "roi_names", "prompt_roi_names", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        value = _as_list(value)
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise ValueError("give a pattern or a non-empty list of patterns")
        return [v if isinstance(v, re.Pattern) else _compile(v) for v in value]

    @field_validator("modality", mode="before")
    @classmethod
    def _modality(cls, value: Any) -> Any:
        value = _as_list(value)
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise ValueError("give a modality (CT, MR, ...) or a non-empty list of them")
        out = []
        for v in value:
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"a modality must be a code such as CT or MR, not {v!r}")
            out.append(v.strip().upper())
        return out

    @field_validator("image_tags", "rtstruct_tags", mode="before")
    @classmethod
    def _tags(cls, value: Any) -> Any:
        if value is None or isinstance(value, list):
            return value
        if not isinstance(value, dict) or not value:
            raise ValueError("give a mapping of keyword or (gggg,eeee) to a regex, e.g. {BodyPartExamined: 'CHEST'}")
        return [_tag_condition(k, v) for k, v in value.items()]

    def is_catch_all(self) -> bool:
        return all(getattr(self, name) is None for name in type(self).model_fields)

    # -- evaluation ---------------------------------------------------------------
    def check(self, ctx: RuleContext) -> tuple[list[str], list[str]]:
        """Evaluate every condition: (what held, what failed), one phrase each."""
        held: list[str] = []
        failed: list[str] = []

        def aet(what: str, value: str | None, patterns: list[re.Pattern[str]] | None, hint: str) -> None:
            if patterns is None:
                return
            wanted = _patterns_text(patterns)
            if value is None:
                failed.append(f"{what} not known ({hint}); wanted {wanted}")
                return
            value = value.strip()
            if any(p.fullmatch(value) for p in patterns):
                held.append(f"{what} {value!r} matches {wanted}")
            else:
                failed.append(f"{what} {value!r} does not match {wanted}")

        aet("calling AE title", ctx.calling_aet, self.calling_aet, "not given")
        aet("called AE title", ctx.called_aet, self.called_aet, "not given")

        if self.modality is not None:
            wanted = ", ".join(self.modality)
            if ctx.modality is None:
                failed.append(f"modality not known (no image header); wanted {wanted}")
            elif ctx.modality.strip().upper() in self.modality:
                held.append(f"modality {ctx.modality} is one of {wanted}")
            else:
                failed.append(f"modality {ctx.modality} is not one of {wanted}")

        def names(what: str, values: list[str], patterns: list[re.Pattern[str]] | None) -> None:
            if patterns is None:
                return
            wanted = _patterns_text(patterns)
            hits = [n for n in values if any(p.fullmatch(n) for p in patterns)]
            if hits:
                verb = (
                    f"{what}s {', '.join(repr(h) for h in hits)} match"
                    if len(hits) > 1
                    else f"{what} {hits[0]!r} matches"
                )
                held.append(f"{verb} {wanted}")
            elif values:
                failed.append(f"no {what} matches {wanted} (has {', '.join(repr(v) for v in values)})")
            else:
                failed.append(f"there are no {what}s; wanted one matching {wanted}")

        names("ROI name", ctx.roi_names, self.roi_names)
        names("prompt ROI name", ctx.prompt_roi_names, self.prompt_roi_names)

        for where, ds, conds in (
            ("image", ctx.image_header, self.image_tags),
            ("RTSTRUCT", ctx.rtstruct_header, self.rtstruct_tags),
        ):
            for cond in conds or []:
                text, why = _element_text(ds, cond)
                head = f"{where} tag {cond.label}"
                if text is None:
                    failed.append(f"{head} {why}; wanted {cond.pattern.pattern!r}")
                elif cond.pattern.fullmatch(text):
                    held.append(f"{head} {_shown(cond, ds, text)} matches {cond.pattern.pattern!r}")
                else:
                    failed.append(f"{head} {_shown(cond, ds, text)} does not match {cond.pattern.pattern!r}")
        return held, failed


def _patterns_text(patterns: list[re.Pattern[str]]) -> str:
    return " or ".join(repr(p.pattern) for p in patterns)


# --------------------------------------------------------------------------------------
# Action
# --------------------------------------------------------------------------------------
#: options of :class:`inference.engines.sam2.Sam2Engine` a rule may set
SAM2_ENGINE_OPTIONS = {"image_size", "batch_size", "precision", "object_score_stop"}
_RESERVED_ENGINE_OPTIONS = {
    "checkpoint": "use the action field 'checkpoint'",
    "model_cfg": "use the action field 'model_cfg'",
    "device": "the worker chooses the device (node.yaml workers.devices)",
    "allow_random_weights": "the node never runs a model without its weights",
}


class Action(BaseModel):
    """What to do with a matching case. Unset fields take the engine's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["classic", "sam2"] = "classic"
    mode: Literal["box2d", "video3d"] = "box2d"
    checkpoint: Path | None = None
    model_cfg: str | None = None
    engine_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    window: tuple[float, float] | None = None
    output_roi_name: str | None = None
    output_color: tuple[int, int, int] | None = None
    destinations: list[str] = Field(default_factory=list)
    export_folder: Path | None = None
    margin_mm: float = Field(default=_DEFAULT_OPTIONS.margin_mm, ge=0)
    min_area_mm2: float = Field(default=_DEFAULT_OPTIONS.min_area_mm2, ge=0)
    min_area_fraction: float = Field(default=_DEFAULT_OPTIONS.min_area_fraction, ge=0, le=1)
    max_extent_mm: float = Field(default=_DEFAULT_OPTIONS.max_extent_mm, gt=0)

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            parts = re.split(r"[,/\s]+", value.strip())
            if len(parts) != 2:
                raise ValueError(f"window {value!r}: write it as 'LEVEL,WIDTH', e.g. '40,400'")
            value = parts
        elif isinstance(value, dict):
            extra = set(value) - {"level", "width"}
            if extra or "level" not in value or "width" not in value:
                raise ValueError("window as a mapping needs exactly 'level' and 'width'")
            value = [value["level"], value["width"]]
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"window must be [level, width] in HU, e.g. [40, 400], not {value!r}")
        try:
            level, width = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            raise ValueError(f"window values must be numbers, not {value!r}") from None
        if not width > 0:
            raise ValueError(f"window width must be > 0 (got {width:g})")
        return (level, width)

    @field_validator("output_color", mode="before")
    @classmethod
    def _color(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            m = re.fullmatch(r"#?([0-9A-Fa-f]{2})([0-9A-Fa-f]{2})([0-9A-Fa-f]{2})", value.strip())
            if not m:
                raise ValueError(f"colour {value!r}: write [R, G, B] (0-255) or '#rrggbb'")
            return tuple(int(g, 16) for g in m.groups())
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ValueError(f"colour must be [R, G, B] with values 0-255, not {value!r}")
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 255:
                raise ValueError(f"colour components must be integers 0-255, not {v!r}")
        return tuple(value)

    @field_validator("output_roi_name")
    @classmethod
    def _roi_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("output ROI name is empty")
        if "\\" in value:
            raise ValueError("an ROI name cannot contain a backslash")
        try:
            literal = value.format(target="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{value!r}: the only placeholder allowed is {{target}} ({exc})") from None
        if len(literal) > MAX_ROI_NAME:
            raise ValueError(f"{value!r} is longer than {MAX_ROI_NAME} characters (the DICOM limit for ROI names)")
        return value

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, value: Any) -> Any:
        value = _as_list(value)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError("give a destination name or a list of names defined in node.yaml")
        for v in value:
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"a destination is a name defined in node.yaml, not {v!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"a destination is listed twice: {value}")
        return [v.strip() for v in value]

    @field_validator("engine_options")
    @classmethod
    def _engine_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in _RESERVED_ENGINE_OPTIONS:
                raise ValueError(f"{key!r} is not an engine option here: {_RESERVED_ENGINE_OPTIONS[key]}")
        return value

    @model_validator(mode="after")
    def _engine_needs(self) -> Action:
        if self.engine == "sam2":
            unknown = sorted(set(self.engine_options) - SAM2_ENGINE_OPTIONS)
            if unknown:
                raise ValueError(
                    f"engine_options: unknown option(s) for sam2: {', '.join(unknown)} "
                    f"(known: {', '.join(sorted(SAM2_ENGINE_OPTIONS))})"
                )
        if self.engine == "sam2" and self.checkpoint is None:
            raise ValueError("engine sam2 needs 'checkpoint' (the path of the model weights)")
        if self.engine == "classic" and (self.checkpoint is not None or self.model_cfg is not None):
            raise ValueError("engine classic uses no model: remove 'checkpoint' and 'model_cfg' (or set engine: sam2)")
        if self.engine == "classic" and self.mode != "box2d":
            raise ValueError("engine classic supports only mode box2d")
        return self

    # -- what the worker uses ----------------------------------------------------
    def segment_options(self) -> SegmentOptions:
        """The per-call settings for :meth:`inference.engine.Engine.segment`."""
        return SegmentOptions(
            mode=self.mode,
            window=self.window,
            margin_mm=self.margin_mm,
            min_area_mm2=self.min_area_mm2,
            min_area_fraction=self.min_area_fraction,
            max_extent_mm=self.max_extent_mm,
        )

    def engine_config(self) -> dict[str, str | int | float | bool]:
        """Keyword arguments for :func:`inference.engine.get_engine` (hashable values).

        ``checkpoint`` (as a string) and ``model_cfg`` when set, plus ``engine_options``.
        """
        config: dict[str, str | int | float | bool] = dict(self.engine_options)
        if self.checkpoint is not None:
            config["checkpoint"] = str(self.checkpoint)
        if self.model_cfg is not None:
            config["model_cfg"] = self.model_cfg
        return config

    def roi_name_for(self, target: str, default: str) -> str:
        """The output ROI name for prompt target ``target``.

        ``default`` is the convention's name (``GTV_AI`` or ``<target>_AI``) and is used
        when the rule sets none, and also when the rule's name has a ``{target}``
        placeholder but the prompt has no target (``BOX_`` alone). Never longer than
        16 characters.
        """
        if self.output_roi_name is None:
            name = default
        elif "{target}" in self.output_roi_name:
            name = self.output_roi_name.format(target=target) if target else default
        else:
            name = self.output_roi_name
        return name[:MAX_ROI_NAME]

    def summary(self) -> str:
        """One line for logs and the dry run."""
        parts = [f"engine {self.engine}", f"mode {self.mode}"]
        if self.checkpoint is not None:
            parts.append(f"checkpoint {self.checkpoint}")
        if self.model_cfg:
            parts.append(f"model_cfg {self.model_cfg}")
        parts.append("window " + (f"{self.window[0]:g}/{self.window[1]:g}" if self.window else "default"))
        parts.append(f"output {self.output_roi_name or 'default name'}")
        parts.append("destinations " + (", ".join(self.destinations) if self.destinations else "none"))
        if self.export_folder is not None:
            parts.append(f"export folder {self.export_folder}")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------
class Rule(BaseModel):
    """One rule: a name, conditions and an action. ``enabled: false`` skips it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    enabled: bool = True
    match: Match = Field(default_factory=Match)
    action: Action


@dataclass
class Decision:
    """The outcome of :meth:`RuleSet.evaluate`.

    ``rule``/``action`` are ``None`` when no rule matched (the case is not processed).
    ``explanation`` has one line per rule, in order: matched, or which conditions failed.
    """

    rule: Rule | None
    action: Action | None
    explanation: list[str] = field(default_factory=list)

    @property
    def matched(self) -> bool:
        return self.rule is not None

    @property
    def reason(self) -> str:
        if self.rule is None:
            return "no rule matched: the case is not processed"
        return f"rule {self.rule.name!r} fired"


@dataclass
class RuleContext:
    """What the rules can see of a case (headers only; no pixel data, no inference)."""

    calling_aet: str | None = None
    called_aet: str | None = None
    modality: str | None = None
    prompt_roi_names: list[str] = field(default_factory=list)
    roi_names: list[str] = field(default_factory=list)
    image_header: pydicom.Dataset | None = None
    rtstruct_header: pydicom.Dataset | None = None

    @classmethod
    def from_files(
        cls,
        images: list[Path] | Path,
        rtstruct: Path,
        calling_aet: str | None = None,
        called_aet: str | None = None,
        prompt_roi_names: list[str] | None = None,
        conventions: Any = None,
    ) -> RuleContext:
        """Read the headers of the first readable image and of the RTSTRUCT.

        ``images`` is a list of files or a folder (searched recursively; the first DICOM
        file that is not an RTSTRUCT serves). ``prompt_roi_names`` overrides the prompt
        ROIs found by :func:`rtstruct.prompts.find_prompt_rois` with ``conventions``
        (a :class:`rtstruct.prompts.PromptConventions`; pass the node's when its prompt
        patterns are configured differently). Raises :class:`RulesError` when the
        RTSTRUCT cannot be read.
        """
        image_header = _first_image_header(images)
        rt_path = Path(rtstruct)
        try:
            rt = pydicom.dcmread(rt_path, stop_before_pixels=True)
        except Exception as exc:  # InvalidDicomError, truncated files, OSError
            raise RulesError(f"{rt_path}: cannot read the RTSTRUCT ({type(exc).__name__}: {exc})") from exc
        roi_names = [str(item.get("ROIName", "") or "") for item in rt.get("StructureSetROISequence") or []]
        if prompt_roi_names is None:
            try:
                prompt_roi_names = prompt_rois_of(rt, conventions)
            except ValueError as exc:  # RTStructError: content that cannot be used
                raise RulesError(f"{rt_path}: {exc}") from exc
        modality = None
        if image_header is not None:
            modality = str(image_header.get("Modality", "") or "").strip() or None
        return cls(
            calling_aet=calling_aet,
            called_aet=called_aet,
            modality=modality,
            prompt_roi_names=list(prompt_roi_names),
            roi_names=roi_names,
            image_header=image_header,
            rtstruct_header=rt,
        )


def prompt_rois_of(rtstruct: pydicom.Dataset | Path, conventions: Any = None) -> list[str]:
    """Names of the prompt ROIs (``BOX_*``, ``POS_*``, ``NEG_*``) of an RTSTRUCT.

    ``conventions`` is a :class:`rtstruct.prompts.PromptConventions` (default: the
    standard names). Raises :class:`rtstruct.reader.RTStructError` for an unusable file.
    """
    from rtstruct.prompts import DEFAULT_CONVENTIONS, find_prompt_rois
    from rtstruct.reader import read_rtstruct

    structure_set = read_rtstruct(rtstruct)
    return [roi.name for roi in find_prompt_rois(structure_set, conventions or DEFAULT_CONVENTIONS)]


def _first_image_header(images: list[Path] | Path) -> pydicom.Dataset | None:
    if isinstance(images, (str, Path)):
        root = Path(images)
        candidates = files_under(root) if root.is_dir() else [root]
    else:
        candidates = [Path(p) for p in images]
    for path in candidates:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if str(ds.get("Modality", "")) == "RTSTRUCT":
            continue
        return ds
    return None


class RuleSet:
    """An ordered list of rules, loaded and validated from YAML."""

    def __init__(self, rules: list[Rule], source: Path | None = None) -> None:
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RulesError(f"{source or 'rules'}: rule names must be unique; repeated: {', '.join(dupes)}")
        self.rules = list(rules)
        self.source = source

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):
        return iter(self.rules)

    @classmethod
    def load(cls, path: str | Path) -> RuleSet:
        """Read and validate a rules file; :class:`RulesError` names the rule and key."""
        path = Path(path)
        data = read_yaml(path, "rules file", RulesError)
        return cls.from_data(data, source=path, base_dir=path.parent)

    @classmethod
    def from_data(cls, data: Any, source: Path | str | None = None, base_dir: Path | None = None) -> RuleSet:
        """Validate already-parsed YAML (a mapping with ``rules``, or a bare list)."""
        where = str(source or "rules")
        if isinstance(data, list):
            data = {"rules": data}
        if not isinstance(data, dict):
            raise RulesError(f"{where}: expected a mapping with a 'rules' list (got {type(data).__name__})")
        unknown = set(data) - {"version", "defaults", "rules"}
        if unknown:
            raise RulesError(
                f"{where}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))} "
                "(allowed: version, defaults, rules)"
            )
        version = data.get("version", 1)
        if version != 1:
            raise RulesError(f"{where}: version: this node reads rules version 1, not {version!r}")
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise RulesError(f"{where}: defaults: expected a mapping of action fields")
        bad_defaults = set(defaults) - set(Action.model_fields)
        if bad_defaults:
            raise RulesError(
                f"{where}: defaults: unknown action field(s) {', '.join(sorted(map(str, bad_defaults)))} "
                f"(known: {', '.join(Action.model_fields)})"
            )
        raw_rules = data.get("rules")
        if not isinstance(raw_rules, list) or not raw_rules:
            raise RulesError(f"{where}: 'rules' must be a non-empty list of rules")

        rules: list[Rule] = []
        for index, raw in enumerate(raw_rules, start=1):
            label = f"rule #{index}"
            if isinstance(raw, dict) and isinstance(raw.get("name"), str):
                label = f"rule #{index} {raw['name']!r}"
            if not isinstance(raw, dict):
                raise RulesError(f"{where}: {label}: expected a mapping with name, match and action")
            raw = dict(raw)
            action = raw.get("action")
            if action is None:
                raise RulesError(
                    f"{where}: {label}: action: missing (say at least which engine, e.g. 'engine: classic')"
                )
            if not isinstance(action, dict):
                raise RulesError(f"{where}: {label}: action: expected a mapping of action fields")
            action = {**defaults, **action}
            for key in ("checkpoint", "export_folder"):
                if base_dir is not None and isinstance(action.get(key), str):
                    p = Path(action[key]).expanduser()
                    action[key] = str(p if p.is_absolute() else (base_dir / p))
            raw["action"] = action
            if raw.get("match") is None:
                raw.pop("match", None)
            try:
                rules.append(Rule.model_validate(raw))
            except ValidationError as exc:
                raise RulesError(f"{where}: {label}: {_format_errors(exc)}") from None
        return cls(rules, source=Path(source) if source else None)

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, ctx: RuleContext) -> Decision:
        """The first enabled rule whose conditions all hold, with an explanation per rule."""
        explanation: list[str] = []
        winner: Rule | None = None
        for index, rule in enumerate(self.rules, start=1):
            head = f"rule {index} {rule.name!r}"
            if winner is not None:
                explanation.append(f"{head}: not evaluated (rule {winner.name!r} fired first)")
                continue
            if not rule.enabled:
                explanation.append(f"{head}: disabled")
                continue
            held, failed = rule.match.check(ctx)
            if failed:
                explanation.append(f"{head}: no match: " + "; ".join(failed))
            else:
                why = "; ".join(held) if held else "catch-all (no conditions)"
                explanation.append(f"{head}: MATCH: {why}")
                winner = rule
        if winner is None:
            explanation.append("no rule matched: the case is not processed")
        return Decision(rule=winner, action=winner.action if winner else None, explanation=explanation)

    # -- consistency with the node configuration --------------------------------------
    def check_destinations(self, known: set[str]) -> list[str]:
        """Problems: destinations named by rules that the node configuration does not define."""
        problems = []
        for rule in self.rules:
            for name in rule.action.destinations:
                if name not in known:
                    have = ", ".join(sorted(known)) or "none defined"
                    problems.append(
                        f"rule {rule.name!r}: destination {name!r} is not defined in the node "
                        f"configuration (defined: {have})"
                    )
            if rule.enabled and not rule.action.destinations and rule.action.export_folder is None:
                problems.append(f"rule {rule.name!r}: no destinations and no export_folder: results would go nowhere")
        return problems

    def check_files(self) -> list[str]:
        """Problems: model checkpoints of enabled rules that are not readable files."""
        problems = []
        for rule in self.rules:
            ckpt = rule.action.checkpoint
            if rule.enabled and ckpt is not None and not ckpt.is_file():
                problems.append(f"rule {rule.name!r}: checkpoint {ckpt} is not a file")
        return problems


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or len(err["loc"]) == 1)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = err["loc"][0] if err["loc"] else None
            model = {"match": Match, "action": Action}.get(parent, Rule)
            msg += f" (known: {', '.join(model.model_fields)})"
        elif err["type"] == "missing":
            msg = "missing"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
