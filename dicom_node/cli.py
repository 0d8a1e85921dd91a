"""``dicom-node``: the command line of the STARDUST node.

Each sub-command (or group) lives in its own module of :mod:`dicom_node.commands` that
defines ``register(subparsers)``; modules are discovered there, in name order. Heavy imports (torch, SAM2) happen inside the command, so that
``dicom-node --help`` and the light commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from dicom_node import __version__, commands


class CommandError(Exception):
    """A user-facing failure: printed as ``error: <message>`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="STARDUST DICOM node: box or clicks around a tumour in, 3D GTV RTSTRUCT out.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def console_logging(verbosity: int) -> None:
    """Logging of a one-shot command (``-v``: INFO, ``-vv``: DEBUG); ``serve`` sets up its own."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console_logging(args.verbose)
    try:
        rc = args.func(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
