"""What every engine with weights needs of a checkpoint file: its hash, the state dict inside
it, and the ways a state dict can fail to fit a model (one helper for ``sam2`` and
``litemedsam``; each wraps the problems in its own error with its own advice)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["file_sha256", "is_state_dict", "listing", "state_dict_problems"]


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def listing(keys: Iterable[str], limit: int = 10) -> str:
    """``"<n>: a, b, c, ... and <m> more"``."""
    keys = sorted(keys)
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)}: {', '.join(keys[:limit])}{more}"


def state_dict_problems(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], set, set]:
    """Why ``sd`` does not fit ``model`` exactly (missing keys, unexpected keys, shapes), one
    phrase each; empty when it fits. Also returns the missing and unexpected key sets."""
    expected = model.state_dict()
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(sd))
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys ({listing(missing)})")
    if unexpected:
        parts.append(f"unexpected keys ({listing(unexpected)})")
    if shapes:
        parts.append(f"shape mismatches ({listing(shapes, 5)})")
    return parts, missing, unexpected
