"""``dicom-node web passwd FILE USER``: add or change a user of ``web.password_file``."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from dicom_node.cli import CommandError


def register(sub) -> None:
    p = sub.add_parser("web", help="the operator's web page: manage its password file")
    wsub = p.add_subparsers(dest="web_command", metavar="ACTION")
    wsub.required = True
    pw = wsub.add_parser(
        "passwd",
        help="add a user to a password file (bcrypt), or change the password of one",
        description="Reads the new password twice from the terminal, or once from standard input with --stdin. "
        "The file is created with mode 0640; point web.password_file at it.",
    )
    pw.add_argument("file", help="the password file (web.password_file)")
    pw.add_argument("user", help="user name (no ':' or spaces)")
    pw.add_argument("--stdin", action="store_true", help="read the password from standard input (one line)")
    pw.add_argument("--delete", action="store_true", help="remove the user instead")
    pw.set_defaults(func=run_passwd)


def _password(args) -> str:
    if args.stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"new password for {args.user}: ")
    if getpass.getpass("again: ") != first:
        raise CommandError("the two passwords differ; nothing was changed")
    return first


def run_passwd(args) -> int:
    import re

    from dicom_node.web.auth import PasswordFileError, hash_password, read_password_file

    path = Path(args.file)
    if not re.fullmatch(r"[^:\s]{1,64}", args.user):
        raise CommandError(f"user name {args.user!r}: 1-64 characters, no ':' and no spaces")
    lines: list[str] = []
    if path.exists():
        try:
            read_password_file(path)
        except PasswordFileError as exc:
            if "lists no user" not in str(exc):
                raise CommandError(str(exc)) from None
        lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.split(":", 1)[0].strip() != args.user]
    if args.delete:
        if len(kept) == len(lines):
            raise CommandError(f"{path} has no user {args.user!r}")
        entry = None
    else:
        try:
            entry = f"{args.user}:{hash_password(_password(args))}"
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    new = kept + ([entry] if entry else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(new) + "\n")
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    os.replace(tmp, path)
    verb = "removed from" if args.delete else ("changed in" if len(kept) < len(lines) else "added to")
    print(f"user {args.user} {verb} {path}")
    return 0
