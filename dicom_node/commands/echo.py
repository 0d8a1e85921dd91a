"""``dicom-node echo HOST PORT [--aec AET]``: C-ECHO a DICOM node (e.g. the TPS import)."""

from __future__ import annotations

import time

from dicom_node.cli import CommandError


def register(sub) -> None:
    p = sub.add_parser("echo", help="C-ECHO (DICOM ping) a DICOM node")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aec", default="ANY-SCP", help="called AE title (the peer's)")
    p.add_argument("--aet", default="STARDUST", help="calling AE title (ours)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--tls", action="store_true", help="use TLS")
    p.add_argument("--ca-file", help="CA bundle for the peer's certificate (with --tls)")
    p.add_argument("--no-check-hostname", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.config import TlsClient
    from dicom_node.sender import DeliveryError, c_echo

    tls = TlsClient(enabled=True, ca_file=args.ca_file, check_hostname=not args.no_check_hostname) if args.tls else None
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
