"""Options shared by the commands that talk to a DICOM peer (``echo``, ``send``)."""

from __future__ import annotations


def add_peer_arguments(p, timeout: float) -> None:
    """``host port [--aec] [--aet] [--timeout] [--tls] [--ca-file] [--no-check-hostname]``."""
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aec", default="ANY-SCP", help="called AE title (the peer's)")
    p.add_argument("--aet", default="STARDUST", help="calling AE title (ours)")
    p.add_argument("--timeout", type=float, default=timeout)
    p.add_argument("--tls", action="store_true", help="use TLS")
    p.add_argument("--ca-file", help="CA bundle for the peer's certificate (with --tls)")
    p.add_argument("--no-check-hostname", action="store_true")


def tls_client(args):
    """The TLS settings the options ask for, or None without ``--tls``."""
    from dicom_node.config import TlsClient

    if not args.tls:
        return None
    return TlsClient(enabled=True, ca_file=args.ca_file, check_hostname=not args.no_check_hostname)
