"""What a rule does with a matching case: :class:`Action` (engine, model, options, window,
output naming and colour, outputs, destinations)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dicom_node.rules.conditions import as_list
from inference.engine import DEFAULT_ENGINE, ENGINES, EngineSpec, Mode, SegmentOptions
from inference.limits import WalkLimits
from inference.preprocess import parse_window
from rtstruct.prompts import MAX_ROI_NAME_LENGTH

_LIMITS = WalkLimits()


_RESERVED_ENGINE_OPTIONS = {
    "checkpoint": "use the action field 'checkpoint'",
    "model_cfg": "use the action field 'model_cfg'",
    "device": "the worker chooses the device (node.yaml workers.devices)",
    "allow_random_weights": "the node never runs a model without its weights",
}


class Action(BaseModel):
    """What to do with a matching case. Unset fields take the engine's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str = DEFAULT_ENGINE
    mode: Mode = "box2d"
    checkpoint: Path | None = None
    model_cfg: str | None = None
    engine_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    window: tuple[float, float] | None = None
    output_roi_name: str | None = None
    output_color: tuple[int, int, int] | None = None
    destinations: list[str] = Field(default_factory=list)
    #: what is delivered: the RTSTRUCT, a DICOM SEG of the same masks, the QA pictures as Secondary Capture
    outputs: list[Literal["rtstruct", "seg", "overlay"]] = Field(default_factory=lambda: ["rtstruct"])
    export_folder: Path | None = None
    margin_mm: float = Field(default=_LIMITS.margin_mm, ge=0)
    prompt_margin_mm: float = Field(default=_LIMITS.prompt_margin_mm, ge=0)
    min_area_mm2: float = Field(default=_LIMITS.min_area_mm2, ge=0)
    min_area_fraction: float = Field(default=_LIMITS.min_area_fraction, ge=0, le=1)
    max_extent_mm: float = Field(default=_LIMITS.max_extent_mm, gt=0)
    min_score: float = Field(default=_LIMITS.min_score, ge=0, le=1)
    max_intensity_shift: float = Field(default=_LIMITS.max_intensity_shift, ge=0)
    extend_past_outer_prompts: bool = _LIMITS.extend_past_outer_prompts
    ct_rim_mm: float = Field(default=_LIMITS.ct_rim_mm, ge=0)

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> Any:
        return None if value is None else parse_window(value)

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
        if len(literal) > MAX_ROI_NAME_LENGTH:
            raise ValueError(
                f"{value!r} is longer than {MAX_ROI_NAME_LENGTH} characters (the DICOM limit for ROI names)"
            )
        return value

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, value: Any) -> Any:
        value = as_list(value)
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

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, value: Any) -> Any:
        value = as_list(value)
        if not isinstance(value, list) or not value:
            raise ValueError("outputs: list at least one of rtstruct, seg, overlay")
        if len(set(map(str, value))) != len(value):
            raise ValueError(f"an output is listed twice: {value}")
        return value

    @field_validator("engine_options")
    @classmethod
    def _engine_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in _RESERVED_ENGINE_OPTIONS:
                raise ValueError(f"{key!r} is not an engine option here: {_RESERVED_ENGINE_OPTIONS[key]}")
        return value

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        if value not in ENGINES:
            raise ValueError(f"unknown engine {value!r} (known: {', '.join(ENGINES)})")
        return value

    @model_validator(mode="after")
    def _engine_needs(self) -> Action:
        info = ENGINES[self.engine]
        if info.needs_checkpoint and self.checkpoint is None:
            raise ValueError(f"engine {self.engine} needs 'checkpoint' (the path of the model weights)")
        if not info.takes_checkpoint and (self.checkpoint is not None or self.model_cfg is not None):
            raise ValueError(
                f"engine {self.engine} uses no model: remove 'checkpoint' and 'model_cfg' (or choose another engine)"
            )
        if self.mode not in info.modes:
            raise ValueError(f"engine {self.engine} supports only mode {' or '.join(info.modes)}")
        try:
            self.engine_spec()
        except ValueError as exc:
            raise ValueError(f"engine_options: {exc}") from None
        return self

    # -- what the worker uses ----------------------------------------------------
    def segment_options(self) -> SegmentOptions:
        """The per-call settings for :meth:`inference.engine.Engine.segment`."""
        limits = {name: getattr(self, name) for name in WalkLimits.names()}
        return SegmentOptions(mode=self.mode, window=self.window, **limits)

    def engine_spec(self) -> EngineSpec:
        """The engine, its weights and options (the worker adds its device)."""
        return EngineSpec(
            name=self.engine,
            checkpoint=None if self.checkpoint is None else str(self.checkpoint),
            model_cfg=self.model_cfg,
            options=tuple(sorted(self.engine_options.items())),
        )

    def summary(self) -> str:
        """One line for logs and the dry run."""
        parts = [f"engine {self.engine}", f"mode {self.mode}"]
        if self.checkpoint is not None:
            parts.append(f"checkpoint {self.checkpoint}")
        if self.model_cfg:
            parts.append(f"model_cfg {self.model_cfg}")
        parts.append("window " + (f"{self.window[0]:g}/{self.window[1]:g}" if self.window else "default"))
        parts.append(f"output {self.output_roi_name or 'default name'}")
        parts.append("outputs " + ", ".join(self.outputs))
        parts.append("destinations " + (", ".join(self.destinations) if self.destinations else "none"))
        if self.export_folder is not None:
            parts.append(f"export folder {self.export_folder}")
        return "; ".join(parts)
