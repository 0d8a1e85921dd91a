"""``--engine-option KEY=VALUE`` (``segment``, ``study``): the engine options a rule sets
under ``engine_options``, on the command line."""

from __future__ import annotations

import yaml

#: Set by their own command-line options, not by ``--engine-option``.
_OWN_FLAGS = {"checkpoint": "--checkpoint", "model_cfg": "--model-cfg", "device": "--device"}


def add_engine_option_argument(group) -> None:
    group.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an engine option, as a rule's engine_options sets it (for example point_method=grow or "
        "precision=bf16); repeat for several. VALUE is read as YAML: 0.5 a number, true a boolean",
    )


def parse_engine_options(items: list[str]) -> tuple[tuple[str, str | int | float | bool], ...]:
    """``["key=value", ...]`` to the sorted (key, value) pairs of an :class:`~inference.engine.EngineSpec`.
    Raises ValueError, one sentence per cause."""
    options: dict[str, str | int | float | bool] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--engine-option {item!r}: write KEY=VALUE, for example point_method=grow")
        if key in _OWN_FLAGS:
            raise ValueError(f"--engine-option {key}: use {_OWN_FLAGS[key]} instead")
        if key in options:
            raise ValueError(f"--engine-option {key} is given twice")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if not isinstance(value, str | int | float | bool):
            raise ValueError(f"--engine-option {key}: the value must be one number, word or boolean, got {text!r}")
        options[key] = value
    return tuple(sorted(options.items()))
