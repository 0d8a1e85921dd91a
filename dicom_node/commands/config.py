"""``dicom-node config check CONFIG``: validate a node.yaml (and its rules file)."""

from __future__ import annotations

import sys

from dicom_node.cli import CommandError


def register(sub) -> None:
    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    check = csub.add_parser("check", help="validate a node.yaml: keys, values, files, rules, destinations")
    check.add_argument("config", help="path of node.yaml")
    check.add_argument("--show", action="store_true", help="print the effective configuration (JSON)")
    check.set_defaults(func=run_check)


def run_check(args) -> int:
    from dicom_node.config import ConfigError, load_config
    from dicom_node.service import effective_config_dump

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    problems = cfg.problems()
    if args.show:
        print(effective_config_dump(cfg))
    if problems:
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        raise CommandError(f"{args.config}: {len(problems)} problem(s)")
    dests = ", ".join(f"{n}={d.ae_title}@{d.host}:{d.port}" for n, d in cfg.destinations.items()) or "none"
    print(
        f"{args.config}: OK (AE {cfg.ae_title} on {cfg.network.bind}:{cfg.network.port}, "
        f"data in {cfg.data_dir}, rules {cfg.rules or 'none'}, destinations {dests})"
    )
    return 0
