"""``dicom-node echo HOST PORT [--aec AET]``: C-ECHO a DICOM node (e.g. the TPS import)."""

from __future__ import annotations

import time

from dicom_node.cli import CommandError
from dicom_node.commands._peer import add_peer_arguments, tls_client


def register(sub) -> None:
    p = sub.add_parser("echo", help="C-ECHO (DICOM ping) a DICOM node")
    add_peer_arguments(p, timeout=10.0)
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.sender import DeliveryError, c_echo

    tls = tls_client(args)
    start = time.perf_counter()
    try:
        status = c_echo(args.host, args.port, args.aec, args.aet, args.timeout, tls)
    except DeliveryError as exc:
        raise CommandError(str(exc)) from None
    ms = (time.perf_counter() - start) * 1000
    if status != 0:
        raise CommandError(f"{args.aec}@{args.host}:{args.port} answered C-ECHO with status 0x{status:04X}")
    print(f"{args.aec}@{args.host}:{args.port}: C-ECHO success ({ms:.0f} ms)")
    return 0
