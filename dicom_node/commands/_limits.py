"""The walk's limits and stop rules as command-line options (``segment``, ``study``): one
option per field of :class:`inference.limits.WalkLimits`, with its default and meaning."""

from __future__ import annotations

from dataclasses import fields

from inference.limits import WalkLimits

_HELP = {
    "margin_mm": "margin around the previous mask's box, mm",
    "prompt_margin_mm": "margin added around the planner's box before its slice is segmented, mm (0: as drawn)",
    "min_area_mm2": "a slice smaller than this ends the walk, mm2",
    "min_area_fraction": "a slice smaller than this fraction of the prompted slice ends the walk",
    "max_extent_mm": "farthest slice from a prompt, mm",
    "min_score": "a slice whose predicted IoU is below this ends the walk (0: off)",
    "max_intensity_shift": "a slice whose mean intensity is this many SDs from the prompted slice's ends the walk (0: off)",
    "extend_past_outer_prompts": "walk past the outermost of several prompted slices",
    "ct_rim_mm": "CT: grow each slice's mask by up to this into its partial-volume rim towards lung, mm (0: off)",
}


def add_limit_arguments(group) -> None:
    """``--margin-mm``, ``--min-score``, ... (every limit; unset: the default)."""
    defaults = WalkLimits()
    for f in fields(WalkLimits):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = f"{_HELP.get(f.name, f.name)} (default {default})"
        if isinstance(default, bool):
            group.add_argument(flag, action="store_true", default=None, help=text)
        else:
            group.add_argument(flag, type=float, metavar="X", help=text)


def limit_overrides(args) -> dict:
    """The limits given on the command line (name -> value)."""
    return {f.name: getattr(args, f.name) for f in fields(WalkLimits) if getattr(args, f.name, None) is not None}
