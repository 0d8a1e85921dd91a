"""Who is asking: HTTP basic against a password-hash file, or a client certificate.

* ``web.password_file``: lines ``user:hash`` with bcrypt hashes (``$2y$``, ``$2b$``,
  ``$2a$``), the format of Apache's ``htpasswd -B`` (``htpasswd -B -c FILE USER``) and of
  ``dicom-node web passwd FILE USER``. Blank lines and lines starting with ``#`` are
  ignored. The file is read again when it changes, so users are added or removed without
  a restart. Every page asks for the password (401 with a ``WWW-Authenticate`` challenge
  when it is missing or wrong). A verified password is remembered in memory (a keyed
  hash, not the password) for as long as the file's entry is unchanged, so a page with
  pictures costs one bcrypt check, not one per picture.
* ``web.tls.require_client_cert``: the TLS handshake refuses clients without a
  certificate signed by ``web.tls.ca_file``; every request that gets through comes from an
  authenticated user.
* Neither (only on 127.0.0.1, an SSH tunnel's end): pages are shown, but nobody is
  authenticated, so the actions that change something (retry, resend) are refused.

The actions are POST forms carrying a token bound to the user (:func:`form_token`), so
another web page cannot make the operator's browser submit them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import threading
from pathlib import Path

from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
    SimpleUser,
    UnauthenticatedUser,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse

__all__ = [
    "PasswordFileError",
    "PasswordFile",
    "read_password_file",
    "hash_password",
    "NodeAuthBackend",
    "challenge",
    "form_token",
    "check_form_token",
    "REALM",
]

REALM = "STARDUST DICOM node"
_HASH = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_USER = re.compile(r"^[^:\s]{1,64}$")


class PasswordFileError(ValueError):
    """The password file cannot be used; the message says which line and why."""


def read_password_file(path: Path) -> dict[str, bytes]:
    """``user -> bcrypt hash`` from an htpasswd-style file; :class:`PasswordFileError` otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PasswordFileError(f"{path} does not exist (create it with: dicom-node web passwd {path} USER)") from None
    except OSError as exc:
        raise PasswordFileError(f"{path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PasswordFileError(f"{path} is not UTF-8 text") from None
    users: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not _USER.match(user):
            raise PasswordFileError(f"{path} line {n}: expected USER:HASH")
        if not _HASH.match(hashed):
            raise PasswordFileError(
                f"{path} line {n} (user {user!r}): only bcrypt hashes ($2y$, $2b$) are accepted; "
                "create them with 'htpasswd -B' or 'dicom-node web passwd'"
            )
        if user in users:
            raise PasswordFileError(f"{path} line {n}: user {user!r} is listed twice")
        users[user] = hashed.encode("ascii")
    if not users:
        raise PasswordFileError(f"{path} lists no user (add one with: dicom-node web passwd {path} USER)")
    return users


def hash_password(password: str, rounds: int = 12) -> str:
    """A bcrypt hash in the ``$2b$`` form (what ``htpasswd -B`` makes, with ``$2y$``)."""
    import bcrypt

    if not password:
        raise ValueError("the password is empty")
    if len(password.encode("utf-8")) > 72:
        raise ValueError("bcrypt uses at most 72 bytes of a password: choose a shorter one")
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


class PasswordFile:
    """The users of ``web.password_file``, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, bytes] = {}
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, bytes] = {}  # keyed hash of (user, password) -> the hash it matched
        self._dummy: bytes | None = None  # checked for unknown users, so that they take as long as known ones
        self.users()  # refuse an unusable file at start

    def users(self) -> dict[str, bytes]:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._users = read_password_file(self.path)
                self._stamp = stamp
                self._verified.clear()
            return self._users

    def verify(self, user: str, password: str) -> bool:
        import bcrypt

        try:
            users = self.users()
        except (OSError, PasswordFileError):
            return False  # a broken file lets nobody in (the log of the start said why)
        hashed = users.get(user)
        key = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        with self._lock:
            if hashed is not None and self._verified.get(key) == hashed:
                return True
        if self._dummy is None:
            self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(12))
        candidate = password.encode("utf-8")[:72]
        ok = bcrypt.checkpw(candidate, hashed.replace(b"$2y$", b"$2b$", 1) if hashed else self._dummy)
        if ok and hashed is not None:
            with self._lock:
                if len(self._verified) > 1024:
                    self._verified.clear()
                self._verified[key] = hashed
            return True
        return False


class NodeAuthBackend(AuthenticationBackend):
    """Starlette authentication for the node's pages (see the module docstring)."""

    def __init__(self, passwords: PasswordFile | None, client_certificates: bool) -> None:
        self.passwords = passwords
        self.client_certificates = client_certificates

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        if self.passwords is None:
            if self.client_certificates:
                return AuthCredentials(["authenticated"]), SimpleUser("client certificate")
            return AuthCredentials([]), UnauthenticatedUser()
        header = conn.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            raise AuthenticationError("a user name and password are needed")
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthenticationError("the credentials are not valid HTTP basic credentials") from None
        if not sep or not user:
            raise AuthenticationError("the credentials are not valid HTTP basic credentials")
        if not await run_in_threadpool(self.passwords.verify, user, password):
            raise AuthenticationError("wrong user name or password")
        return AuthCredentials(["authenticated"]), SimpleUser(user)


def challenge(conn: HTTPConnection, exc: Exception) -> PlainTextResponse:
    """The 401 answer: what was wrong and the Basic challenge."""
    return PlainTextResponse(
        f"401 Unauthorized: {exc}\n",
        status_code=401,
        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"', "Cache-Control": "no-store"},
    )


_FORM_KEY = secrets.token_bytes(32)


def form_token(user: str) -> str:
    """The token an action form carries (valid for this user while the node runs)."""
    return hmac.new(_FORM_KEY, f"actions:{user}".encode(), hashlib.sha256).hexdigest()[:40]


def check_form_token(user: str, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(form_token(user), str(token))
