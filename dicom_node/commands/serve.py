"""``dicom-node serve [-c CONFIG]``: run the node (receiver, workers, sender, watch folder)."""

from __future__ import annotations

from dicom_node.cli import CommandError


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the DICOM node until stopped (SIGTERM/Ctrl-C)")
    p.add_argument(
        "-c",
        "--config",
        help="node.yaml (default: $STARDUST_CONFIG, /etc/stardust/node.yaml, or the repository's config/node.yaml)",
    )
    p.add_argument("--port", type=int, help="override network.port")
    p.add_argument("--data-dir", help="override data_dir")
    p.add_argument(
        "--no-workers",
        action="store_true",
        help="run no inference workers here (workers.devices: []): dicom-node worker processes take the jobs",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.config import ConfigError, load_config
    from dicom_node.logs import setup_logging
    from dicom_node.service import Node, NodeError

    overrides: dict = {}
    if args.port is not None:
        overrides.setdefault("network", {})["port"] = args.port
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.no_workers:
        overrides["workers"] = {"devices": []}
    try:
        cfg = load_config(args.config, overrides=overrides or None)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    level = cfg.logging.level if args.verbose == 0 else ("DEBUG" if args.verbose > 1 else "INFO")
    setup_logging(level, cfg.logging.format, cfg.logging.file)
    node = Node(cfg)
    try:
        node.serve_forever()
    except NodeError as exc:
        raise CommandError(str(exc)) from None
    return 0
