"""``dicom-node send PATH HOST PORT [--aec AET]``: C-STORE files (a folder, recursively)."""

from __future__ import annotations

from pathlib import Path

from dicom_node.cli import CommandError
from dicom_node.commands._peer import add_peer_arguments, tls_client
from inference.files import files_under


def register(sub) -> None:
    p = sub.add_parser("send", help="send DICOM files (a file or a folder, recursively) by C-STORE")
    p.add_argument("path")
    add_peer_arguments(p, timeout=30.0)
    p.set_defaults(func=run)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return files_under(path, skip_hidden=True)
    raise CommandError(f"{path}: no such file or folder")


def run(args) -> int:
    from tqdm import tqdm

    from dicom_node.sender import DeliveryError, c_store_files

    files = _files(Path(args.path))
    if not files:
        raise CommandError(f"{args.path}: no files to send")
    tls = tls_client(args)
    with tqdm(total=len(files), unit="file", desc=f"-> {args.aec}", disable=None) as bar:
        try:
            results = c_store_files(files, args.host, args.port, args.aec, args.aet, args.timeout, tls, progress=bar)
        except DeliveryError as exc:
            raise CommandError(str(exc)) from None
    failed = [(p, s, m) for p, s, m in results if s is None or s not in (0x0000, 0xB000, 0xB006, 0xB007)]
    for p, s, m in failed:
        status = "no status" if s is None else f"0x{s:04X}"
        print(f"failed: {p}: {status} {m}".rstrip())
    ok = len(results) - len(failed)
    print(f"sent {ok} of {len(files)} file(s) to {args.aec}@{args.host}:{args.port}")
    if failed:
        raise CommandError(f"{len(failed)} file(s) not stored")
    return 0
