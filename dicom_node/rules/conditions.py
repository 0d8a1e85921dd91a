"""What a rule matches on: :class:`Match` and its conditions (AE titles, modality, ROI
names, header tags), each evaluated against a :class:`~dicom_node.rules.context.RuleContext`
with one phrase per condition saying why it held or failed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydicom
from pydantic import BaseModel, ConfigDict, field_validator
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

if TYPE_CHECKING:  # pragma: no cover
    from dicom_node.rules.context import RuleContext

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


def _compile(pattern: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ValueError(f"a pattern must be a string, not {type(pattern).__name__} ({pattern!r})")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None


def as_list(value: Any) -> Any:
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
        value = as_list(value)
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise ValueError("give a pattern or a non-empty list of patterns")
        return [v if isinstance(v, re.Pattern) else _compile(v) for v in value]

    @field_validator("modality", mode="before")
    @classmethod
    def _modality(cls, value: Any) -> Any:
        value = as_list(value)
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
