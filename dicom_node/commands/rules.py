"""``dicom-node rules test PATH...``: which rule fires for these files, and why (dry run).

The files under PATH (folders are searched recursively) are grouped into cases the way
the node does it: each RTSTRUCT with the image series it references (falling back to
its frame of reference when the series is not there). For every case the command prints
what the rules can see (modality, ROI names, AE titles) and every rule's verdict. Nothing
is segmented and nothing is sent.

Exit status: 0 when every RTSTRUCT found is a prompt case for which a rule fires; 1 when
some RTSTRUCT would not be processed (no rule matches, no prompt ROIs, or it cannot be
read); 2 for bad input (no RTSTRUCT at all, an unreadable file named on the command line,
a bad rules or node configuration file).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.cli import CommandError
from inference.files import files_under


def register(sub) -> None:
    p = sub.add_parser("rules", help="routing rules (config/rules.yaml): dry run")
    rsub = p.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")
    rsub.required = True
    t = rsub.add_parser(
        "test",
        help="show which rule fires for the cases in PATH and why, without running anything",
        description=(
            "Group the DICOM files under PATH into cases (each prompt RTSTRUCT with the images it "
            "references) and print, for each case, every rule's verdict and the rule that fires. "
            "Exit status 0: a rule fires for every RTSTRUCT; 1: some RTSTRUCT would not be processed "
            "(no rule matches, no prompt ROIs, unreadable); 2: bad input."
        ),
    )
    t.add_argument("paths", nargs="+", metavar="PATH", help="folders (searched recursively) or DICOM files")
    t.add_argument(
        "-c",
        "--config",
        help="node configuration (node.yaml) whose 'rules' file, AE title and destinations are used "
        "(default: $STARDUST_CONFIG, /etc/stardust/node.yaml, or the repository's config/node.yaml)",
    )
    t.add_argument("--rules", help="rules file to test (overrides the one named in the node configuration)")
    t.add_argument("--calling-aet", help="calling AE title to assume (the TPS's AE title)")
    t.add_argument("--called-aet", help="called AE title to assume (default: the node's AE title from -c CONFIG)")
    t.set_defaults(func=run_test)


# --------------------------------------------------------------------------------------
@dataclass
class _Scan:
    images: list[tuple[Path, object]] = field(default_factory=list)  # (path, header)
    rtstructs: list[tuple[Path, object]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _scan(paths: list[str]) -> _Scan:
    from rtstruct.headers import DicomFileError, FileKind, kind_of, read_header

    scan = _Scan()
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise CommandError(f"{root}: no such file or folder")
        explicit = root.is_file()
        files = [root] if explicit else files_under(root, skip_hidden=True)
        for path in files:
            try:
                ds = read_header(path)
            except DicomFileError as exc:
                if explicit:
                    raise CommandError(f"{path}: cannot be read as DICOM ({exc})") from exc
                scan.skipped.append((path, exc.reason))
                continue
            kind = kind_of(ds.get("SOPClassUID"), ds.get("Modality"))
            if kind is FileKind.RTSTRUCT:
                scan.rtstructs.append((path, None))  # read in full later
            elif kind is FileKind.IMAGE and "SeriesInstanceUID" in ds:
                scan.images.append((path, ds))
            else:
                what = "an image without a SeriesInstanceUID" if kind is FileKind.IMAGE else "not a CT/MR image"
                scan.skipped.append((path, f"{what}: {ds.get('Modality', '') or 'no modality'}"))
    return scan


def _node_settings(config_path: Path) -> tuple[Path | None, str | None, set[str] | None]:
    """(rules file, the node's AE title, destination names) from a node configuration."""
    from dicom_node.config import ConfigError, load_config

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    return cfg.rules, cfg.ae_title, set(cfg.destinations)


def run_test(args) -> int:
    from dicom_node.rules import RulesError, RuleSet

    rules_path: Path | None = Path(args.rules) if args.rules else None
    called_aet = args.called_aet
    called_note = ""
    destinations: set[str] | None = None
    if rules_path is None or args.config:
        from dicom_node.config import default_config_path

        config_path = Path(args.config) if args.config else default_config_path()
        cfg_rules, node_aet, destinations = _node_settings(config_path)
        if rules_path is None:
            if cfg_rules is None:
                raise CommandError(f"{config_path}: names no rules file (key 'rules'); give --rules FILE")
            rules_path = cfg_rules
        if called_aet is None and node_aet:
            called_aet, called_note = node_aet, " (the node's AE title)"
    try:
        ruleset = RuleSet.load(rules_path)
    except RulesError as exc:
        raise CommandError(str(exc)) from exc

    scan = _scan(args.paths)
    where = ", ".join(args.paths)
    if not scan.rtstructs:
        raise CommandError(
            f"no RTSTRUCT found under {where} ({len(scan.images)} image file(s), "
            f"{len(scan.skipped)} unreadable or non-DICOM file(s)): a case needs a prompt RTSTRUCT"
        )

    print(f"rules: {rules_path} ({len(ruleset)} rule(s))")
    if destinations is not None:
        for problem in ruleset.check_destinations(destinations):
            print(f"warning: {problem}")
    for problem in ruleset.check_files():
        print(f"warning: {problem}")
    if scan.skipped:
        shown = ", ".join(f"{p.name} ({why.split(' (')[0].split(':')[0]})" for p, why in scan.skipped[:3])
        more = f" and {len(scan.skipped) - 3} more" if len(scan.skipped) > 3 else ""
        print(f"note: skipped {len(scan.skipped)} file(s) that are not usable DICOM: {shown}{more}")

    by_series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for path, ds in scan.images:
        by_series[str(ds.SeriesInstanceUID)].append((path, ds))

    unmatched = failed = no_prompts = 0
    for number, (rt_path, _) in enumerate(scan.rtstructs, start=1):
        print()
        print(f"case {number}: RTSTRUCT {rt_path}")
        try:
            ctx, lines = _case_context(rt_path, by_series, args.calling_aet, called_aet, called_note)
        except (RulesError, ValueError) as exc:
            print(f"  cannot be read: {exc}")
            failed += 1
            continue
        for line in lines:
            print(f"  {line}")
        decision = ruleset.evaluate(ctx)
        for line in decision.explanation:
            print(f"  {line}")
        if decision.action is None:
            unmatched += 1
            print("  => no rule fires: the node would not process this case")
            continue
        print(f"  => rule {decision.rule.name!r} fires: {decision.action.summary()}")
        if ctx.prompt_roi_names:
            print("  output ROI(s): " + ", ".join(_output_names(decision.action, ctx.prompt_roi_names, ctx.roi_names)))
        else:
            no_prompts += 1

    n = len(scan.rtstructs)
    fired = n - unmatched - failed - no_prompts
    print()
    print(
        f"{n} RTSTRUCT(s): {fired} processed by a rule, {unmatched} matching no rule, "
        f"{no_prompts} without prompt ROIs, {failed} unreadable"
    )
    return 0 if fired == n else 1


def _output_names(action, prompt_names: list[str], existing: list[str]) -> list[str]:
    """The result ROI names, one per prompt target, as the node would choose them."""
    from rtstruct.prompts import DEFAULT_CONVENTIONS, result_roi_names

    targets: dict[str, str] = {}
    for name in prompt_names:
        found = DEFAULT_CONVENTIONS.classify(name)
        if found is not None:
            targets.setdefault(found[1].casefold(), found[1])
    names = result_roi_names(list(targets.values()), existing, action.output_roi_name)
    return [f"{name} (target {target!r})" if target else name for target, name in zip(targets.values(), names)]


def _case_context(rt_path: Path, by_series, calling_aet, called_aet, called_note):
    """The RuleContext of one RTSTRUCT and lines describing the case."""
    from dicom_node.rules import RuleContext, RulesError, prompt_rois_of
    from rtstruct.headers import DicomFileError, read_header
    from rtstruct.reader import read_rtstruct

    try:
        ds = read_header(rt_path, stop_before_pixels=False)
    except DicomFileError as exc:
        raise RulesError(str(exc)) from exc
    ss = read_rtstruct(ds)  # RTStructError (a ValueError) says what is wrong
    lines = [
        f"structure set {ss.label or '(no label)'!r}, frame of reference "
        f"{', '.join(ss.frame_of_reference_uids) or 'none'}"
    ]

    images: list[tuple[Path, object]] = []
    series = [s for s in ss.referenced_series_uids if s in by_series]
    if series:
        images = by_series[series[0]]
        wanted = set(ss.referenced_images_by_series.get(series[0], [])) | set(ss.referenced_image_uids)
        have = {str(h.SOPInstanceUID) for _, h in images}
        present = len(wanted & have) if wanted else len(images)
        detail = f"{present} of {len(wanted)} referenced images present" if wanted else "no per-image references"
        if wanted and present < len(wanted):
            detail += (
                f"; {len(wanted) - present} missing: the node would wait for them and fail the case "
                "if they do not arrive"
            )
        lines.append(f"images: {len(images)} in referenced series {series[0]} ({detail})")
    else:
        same_for = [
            uid
            for uid, files in by_series.items()
            if str(files[0][1].get("FrameOfReferenceUID", "")) in ss.frame_of_reference_uids
        ]
        if same_for:
            best = max(same_for, key=lambda uid: len(by_series[uid]))
            images = by_series[best]
            what = (
                f"referenced series {', '.join(ss.referenced_series_uids)} not found"
                if ss.referenced_series_uids
                else "the RTSTRUCT references no series"
            )
            lines.append(f"images: {len(images)} in series {best}, found by frame of reference ({what})")
            if len(same_for) > 1:
                lines.append(f"note: {len(same_for)} series share this frame of reference; the largest is used")
        else:
            lines.append(
                "images: none of the referenced images are under PATH (modality unknown; the node would wait for them)"
            )

    image_header = images[0][1] if images else None
    modality = str(image_header.get("Modality", "")).strip() or None if image_header is not None else None
    prompt_names = prompt_rois_of(ds)
    ctx = RuleContext(
        calling_aet=calling_aet,
        called_aet=called_aet,
        modality=modality,
        prompt_roi_names=prompt_names,
        roi_names=ss.roi_names,
        image_header=image_header,
        rtstruct_header=ds,
    )
    lines.append(f"modality: {modality or 'unknown'}")
    lines.append("ROIs: " + (", ".join(ss.roi_names) or "none"))
    if prompt_names:
        lines.append("prompt ROIs: " + ", ".join(prompt_names))
    else:
        lines.append("prompt ROIs: none: the node does not treat this RTSTRUCT as a case (rules shown anyway)")
    lines.append(
        f"calling AE title: {calling_aet or '(not given: --calling-aet)'}; "
        f"called AE title: {called_aet or '(not given: --called-aet)'}{called_note if called_aet else ''}"
    )
    return ctx, lines
