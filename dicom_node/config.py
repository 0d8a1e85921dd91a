"""The node's configuration (``config/node.yaml``): pydantic models, loading, validation.

Every setting is documented in ``config/node.yaml``. Loading validates everything and
raises :class:`ConfigError` whose message names the file and the key (``network.port``,
``destinations.tps.ae_title``). Relative paths are resolved against the directory of the
configuration file, like the paths of ``rules.yaml``. Secrets (TLS private-key passwords)
are never written in the file: they come from an environment variable or a file named in
it (``key_password_env`` / ``key_password_file``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom import uid

from dicom_node.yamlfile import read_yaml

__all__ = [
    "ConfigError",
    "NodeConfig",
    "Destination",
    "TlsServer",
    "TlsClient",
    "Web",
    "DatabaseSettings",
    "Webhook",
    "load_config",
    "config_from_data",
    "default_config_path",
    "SOP_CLASS_NAMES",
]

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "node.yaml"

#: short names accepted in ``network.sop_classes`` (UIDs are accepted too); compared
#: without case, ``_``, ``-`` or spaces, so ``EnhancedCT`` and ``enhanced-ct`` name
#: ENHANCED_CT. LEGACY_CT / LEGACY_MR are the Legacy Converted Enhanced CT / MR classes.
SOP_CLASS_NAMES: dict[str, str] = {
    "CT": uid.CTImageStorage,
    "ENHANCED_CT": uid.EnhancedCTImageStorage,
    "LEGACY_CT": uid.LegacyConvertedEnhancedCTImageStorage,
    "MR": uid.MRImageStorage,
    "ENHANCED_MR": uid.EnhancedMRImageStorage,
    "LEGACY_MR": uid.LegacyConvertedEnhancedMRImageStorage,
    "RTSTRUCT": uid.RTStructureSetStorage,
    "PT": uid.PositronEmissionTomographyImageStorage,
    "RTPLAN": uid.RTPlanStorage,
    "RTDOSE": uid.RTDoseStorage,
    "REG": uid.SpatialRegistrationStorage,
}

#: The image and structure set classes the node segments, negotiated unless
#: ``network.sop_classes`` says otherwise: single-frame CT/MR and the multi-frame Enhanced
#: and Legacy Converted Enhanced CT/MR, which ``rtstruct.series.load_series`` reads frame
#: by frame (a sender with such images is otherwise refused at negotiation, before the
#: node could say anything about them).
DEFAULT_SOP_CLASSES = ("CT", "MR", "ENHANCED_CT", "ENHANCED_MR", "LEGACY_CT", "LEGACY_MR", "RTSTRUCT")


def _sop_name_key(name: str) -> str:
    return re.sub(r"[\s_-]", "", name).upper()


_SOP_CLASS_KEYS = {_sop_name_key(name): value for name, value in SOP_CLASS_NAMES.items()}

_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and the key."""


def default_config_path() -> Path:
    """``$STARDUST_CONFIG`` if set, else ``/etc/stardust/node.yaml`` if present, else the repo's."""
    env = os.environ.get("STARDUST_CONFIG")
    if env:
        return Path(env)
    etc = Path("/etc/stardust/node.yaml")
    if etc.is_file():
        return etc
    return REPO_CONFIG


def _check_aet(value: str | None, allow_none: bool = False) -> str | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError("an AE title is required")
    if not isinstance(value, str):
        raise ValueError(f"an AE title is text, not {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError("an AE title cannot be empty or only spaces")
    if not _AET.match(text):
        raise ValueError(f"AE title {value!r} must be 1-16 printable ASCII characters without backslash")
    return text


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _read_secret(name: str, env: str | None, file: Path | None) -> str | None:
    """A secret set as ``<name>_env`` (an environment variable's name) or ``<name>_file`` (a
    file holding it, without its final line break), read now; ``None`` if neither is set."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{name}_env: environment variable {env} is not set")
        return value
    if file:
        try:
            return file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{name}_file: cannot read {file}: {exc.strerror}") from exc
    return None


class _SecretSource(_Model):
    """Where a TLS private-key password comes from (never the YAML itself)."""

    key_password_env: str | None = None
    key_password_file: Path | None = None

    def key_password(self) -> str | None:
        """The password, read now from the environment or the file; ``None`` if neither is set."""
        return _read_secret("key_password", self.key_password_env, self.key_password_file)


class TlsServer(_SecretSource):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _needs(self) -> TlsServer:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs cert_file and key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs client certificates)")
        return self


class TlsClient(_SecretSource):
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _needs(self) -> TlsClient:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file (client certificate) or neither")
        return self


class Network(_Model):
    bind: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    max_associations: int = Field(default=10, ge=1, le=1000)
    max_pdu_size: int = Field(default=1048576, ge=0)
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=120.0, gt=0)
    poll_interval_ms: float = Field(default=0.2, ge=0.05, le=1.0)
    sop_classes: list[str] = Field(default_factory=lambda: list(DEFAULT_SOP_CLASSES))

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address (use 0.0.0.0 for all interfaces)") from None
        return value

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu(cls, value: int) -> int:
        if value != 0 and not 4096 <= value <= 64 * 1024 * 1024:
            raise ValueError("max_pdu_size must be between 4096 and 67108864 bytes (or 0 for unlimited)")
        return value

    @field_validator("sop_classes")
    @classmethod
    def _sop(cls, value: list[str]) -> list[str]:
        from dicom_node.uids import is_valid_uid

        if not value:
            raise ValueError("list at least one SOP class (CT, MR, RTSTRUCT)")
        out = []
        for item in value:
            key = str(item).strip()
            if _sop_name_key(key) in _SOP_CLASS_KEYS:
                out.append(_SOP_CLASS_KEYS[_sop_name_key(key)])
            elif is_valid_uid(key):
                out.append(key)
            else:
                raise ValueError(f"{item!r} is neither a known name ({', '.join(SOP_CLASS_NAMES)}) nor a SOP Class UID")
        return list(dict.fromkeys(out))


class Access(_Model):
    require_called_aet: bool = True
    allow_any_calling_aet: bool = False
    calling_aets: list[str] = Field(default_factory=list)
    allow_any_network: bool = False
    networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])

    @field_validator("calling_aets")
    @classmethod
    def _aets(cls, value: list[str]) -> list[str]:
        return [_check_aet(v) for v in value]  # type: ignore[misc]

    @field_validator("networks")
    @classmethod
    def _nets(cls, value: list[str]) -> list[str]:
        out = []
        for v in value:
            try:
                out.append(str(ipaddress.ip_network(str(v), strict=False)))
            except ValueError:
                raise ValueError(f"{v!r} is not an IP network (write e.g. 10.1.2.0/24 or 10.1.2.3)") from None
        return out

    @model_validator(mode="after")
    def _some(self) -> Access:
        if not self.allow_any_calling_aet and not self.calling_aets:
            raise ValueError(
                "calling_aets is empty: list the AE titles allowed to send (or set allow_any_calling_aet: true)"
            )
        if not self.allow_any_network and not self.networks:
            raise ValueError("networks is empty: list the allowed source networks (or set allow_any_network: true)")
        return self

    def network_objects(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n) for n in self.networks]


class Storage(_Model):
    fsync: bool = True
    min_free_mb: int = Field(default=2048, ge=0)
    retention_days: float = Field(default=30.0, gt=0)
    cleanup_cron: str = "30 3 * * *"

    @field_validator("cleanup_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a crontab expression (minute hour day month weekday): {exc}") from None
        return value


class Cases(_Model):
    settle_seconds: float = Field(default=2.0, ge=0)
    incomplete_timeout_seconds: float = Field(default=900.0, gt=0)
    stale_reference_wait_seconds: float = Field(default=30.0, ge=0)


class Jobs(_Model):
    lease_seconds: float = Field(default=120.0, ge=5)
    max_attempts: int = Field(default=3, ge=1)


class Workers(_Model):
    devices: list[str] = Field(default_factory=lambda: ["auto"])
    restart_backoff_max_seconds: float = Field(default=60.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str]) -> list[str]:
        # an empty list: no local workers (dicom-node serve with dicom-node worker processes)
        for v in value:
            if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(v)):
                raise ValueError(f"{v!r} is not a device (auto, cpu, cuda, cuda:N, mps)")
        return [str(v) for v in value]


class Destination(_Model):
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str
    calling_ae_title: str | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)
    tls: TlsClient = Field(default_factory=TlsClient)

    @field_validator("ae_title")
    @classmethod
    def _aet(cls, value: str) -> str:
        return _check_aet(value)  # type: ignore[return-value]

    @field_validator("calling_ae_title")
    @classmethod
    def _caet(cls, value: str | None) -> str | None:
        return _check_aet(value, allow_none=True)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value or not value.strip() or any(c.isspace() for c in value.strip()):
            raise ValueError(f"{value!r} is not a host name or address")
        return value.strip()


class Send(_Model):
    max_attempts: int = Field(default=10, ge=1)
    backoff_initial_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=600.0, gt=0)
    threads: int = Field(default=4, ge=1, le=64)


class Watch(_Model):
    enabled: bool = False
    import_dir: Path | None = None
    export_dir: Path | None = None
    stable_seconds: float = Field(default=2.0, ge=0)
    calling_aet: str = "WATCHFOLDER"
    delete_after_import: bool = True

    @model_validator(mode="after")
    def _needs(self) -> Watch:
        if self.enabled and self.import_dir is None:
            raise ValueError("watch.enabled needs import_dir")
        return self

    @field_validator("calling_aet")
    @classmethod
    def _aet(cls, value: str) -> str:
        return _check_aet(value)  # type: ignore[return-value]


class Logging(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    file: Path | None = None

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Audit(_Model):
    file: Path | None = None
    fsync: bool = False


class Web(_Model):
    """The operator's web page and ``/metrics`` (:mod:`dicom_node.web`), off by default."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(default=8104, ge=1, le=65535)
    #: HTTP basic authentication against this file of ``user:bcrypt-hash`` lines (htpasswd -B)
    password_file: Path | None = None
    tls: TlsServer = Field(default_factory=TlsServer)
    show_patient_identity: bool = False
    cases_per_page: int = Field(default=100, ge=10, le=1000)

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address (127.0.0.1: this server only)") from None
        return value

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.bind).is_loopback

    @property
    def client_certificates(self) -> bool:
        return self.tls.enabled and self.tls.require_client_cert

    @property
    def authenticates(self) -> bool:
        """Requests come from a known user (password or client certificate)."""
        return self.password_file is not None or self.client_certificates

    @model_validator(mode="after")
    def _safe(self) -> Web:
        if not self.enabled or self.loopback:
            return self
        if not self.authenticates:
            raise ValueError(
                f"bind {self.bind} is reachable from other hosts and the page has no authentication: set "
                "password_file (HTTP basic, with tls.enabled) or tls.require_client_cert (client certificates), "
                "or keep bind 127.0.0.1 and open it through an SSH tunnel"
            )
        if not self.tls.enabled:
            raise ValueError(
                f"bind {self.bind} with password_file needs tls.enabled: HTTP basic sends the password in clear text"
            )
        return self


class Webhook(_Model):
    """The failure notification: a JSON POST per failed case, failed job or dead letter."""

    url: str | None = None
    timeout_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    backoff_initial_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=600.0, gt=0)
    #: CA bundle for an https URL signed by the hospital's own CA (default: system CAs)
    ca_file: Path | None = None
    #: name of an environment variable whose value is sent as ``Authorization: Bearer ...``
    token_env: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("put no credentials in the URL: use token_env")
        return value.strip()


class DatabaseSettings(_Model):
    """Where the index, the job queue and the delivery log live (``database:``).

    ``url: sqlite`` (the default) is the file ``node.db`` in ``data_dir``, as always. A
    ``postgresql://user@host:port/dbname`` URL shares one PostgreSQL among several hosts;
    the password never goes into the URL: it comes from ``password_env`` or
    ``password_file``. TLS to the server: ``sslmode`` and the certificate files (libpq's
    settings of the same names).
    """

    url: str = "sqlite"
    password_env: str | None = None
    password_file: Path | None = None
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    sslrootcert: Path | None = None
    sslcert: Path | None = None
    sslkey: Path | None = None
    #: seconds to wait for the server when connecting
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    #: PostgreSQL: a delivery or webhook POST claimed by a node that died is attempted again
    #: after this long (longer than one delivery can take)
    delivery_lease_seconds: float = Field(default=900.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        value = value.strip()
        if value == "sqlite":
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise ValueError(f"{value!r} is neither 'sqlite' nor a postgresql://user@host:port/dbname URL")
        if parts.password:
            raise ValueError("put no password in the URL: use password_env or password_file")
        if not parts.path.strip("/"):
            raise ValueError(f"{value!r} names no database (postgresql://user@host:port/dbname)")
        return value

    @property
    def is_postgresql(self) -> bool:
        return self.url != "sqlite"

    def password(self) -> str | None:
        """The password, read now from the environment or the file; ``None`` if neither is set."""
        return _read_secret("password", self.password_env, self.password_file)


class Limits(_Model):
    """How big one case's input may be (:class:`inference.limits.InputLimits`; README "Input sizes")."""

    max_voxels: int = Field(default=2**29, ge=1)
    max_targets: int = Field(default=50, ge=1)
    max_mask_voxels: int = Field(default=2**31, ge=1)
    max_contour_points: int = Field(default=10_000_000, ge=1)

    def input_limits(self):
        from inference.limits import InputLimits

        return InputLimits(**self.model_dump())


class NodeConfig(_Model):
    """The whole node configuration (see ``config/node.yaml`` for every key)."""

    ae_title: str = "STARDUST"
    data_dir: Path = Path("/var/lib/stardust")
    #: the folder every host of a multi-host deployment mounts (store/, results/, prompts/);
    #: null: data_dir. node.lock, run/, cache/ and the SQLite file stay in data_dir.
    shared_dir: Path | None = None
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    rules: Path | None = None
    network: Network = Field(default_factory=Network)
    access: Access  # required: who may send (the allow-lists are on by default)
    tls: TlsServer = Field(default_factory=TlsServer)
    storage: Storage = Field(default_factory=Storage)
    cases: Cases = Field(default_factory=Cases)
    jobs: Jobs = Field(default_factory=Jobs)
    workers: Workers = Field(default_factory=Workers)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    send: Send = Field(default_factory=Send)
    watch: Watch = Field(default_factory=Watch)
    logging: Logging = Field(default_factory=Logging)
    audit: Audit = Field(default_factory=Audit)
    web: Web = Field(default_factory=Web)
    webhook: Webhook = Field(default_factory=Webhook)
    limits: Limits = Field(default_factory=Limits)

    #: where the file was read from (not a YAML key)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("ae_title")
    @classmethod
    def _aet(cls, value: str) -> str:
        return _check_aet(value)  # type: ignore[return-value]

    @field_validator("destinations")
    @classmethod
    def _dest_names(cls, value: dict[str, Destination]) -> dict[str, Destination]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", str(name)):
                raise ValueError(f"destination name {name!r}: use letters, digits, '_', '-', '.'")
        return value

    # -- derived paths -----------------------------------------------------------------
    @property
    def files_dir(self) -> Path:
        """Where instances, results and prompt copies live (``shared_dir``, default ``data_dir``);
        the index's file paths are relative to it."""
        return self.shared_dir or self.data_dir

    @property
    def store_dir(self) -> Path:
        return self.files_dir / "store"

    @property
    def results_dir(self) -> Path:
        return self.files_dir / "results"

    @property
    def prompts_dir(self) -> Path:
        return self.files_dir / "prompts"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "node.db"

    @property
    def cache_dir(self) -> Path:
        """Files derived from model weights (e.g. LiteMedSAM converted for OpenVINO): rebuilt
        when missing, kept across restarts."""
        return self.data_dir / "cache"

    @property
    def audit_path(self) -> Path:
        return self.audit.file or (self.data_dir / "audit.jsonl")

    def resolve_paths(self, base: Path) -> NodeConfig:
        """Make every relative path absolute against ``base`` (in place; returns self)."""

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = Path(os.path.expanduser(str(p)))
            return p if p.is_absolute() else (base / p).resolve()

        self.data_dir = fix(self.data_dir)  # type: ignore[assignment]
        self.shared_dir = fix(self.shared_dir)
        for key in ("password_file", "sslrootcert", "sslcert", "sslkey"):
            setattr(self.database, key, fix(getattr(self.database, key)))
        self.rules = fix(self.rules)
        for obj in (self.tls, self.web.tls, *(d.tls for d in self.destinations.values())):
            for key in ("cert_file", "key_file", "ca_file", "key_password_file"):
                setattr(obj, key, fix(getattr(obj, key)))
        self.watch.import_dir = fix(self.watch.import_dir)
        self.watch.export_dir = fix(self.watch.export_dir)
        self.logging.file = fix(self.logging.file)
        self.audit.file = fix(self.audit.file)
        self.web.password_file = fix(self.web.password_file)
        self.webhook.ca_file = fix(self.webhook.ca_file)
        return self

    def problems(self) -> list[str]:
        """Checks that need the file system or the rules file (``config check`` prints them)."""
        problems: list[str] = []
        for where, tls in [("tls", self.tls), ("web.tls", self.web.tls)] + [
            (f"destinations.{n}.tls", d.tls) for n, d in self.destinations.items()
        ]:
            if where in ("tls", "web.tls") and not tls.enabled:
                continue
            if where == "web.tls" and not self.web.enabled:
                continue
            for key in ("cert_file", "key_file", "ca_file"):
                path = getattr(tls, key)
                if path is not None and not Path(path).is_file():
                    problems.append(f"{where}.{key}: {path} is not a readable file")
            try:
                tls.key_password()
            except ConfigError as exc:
                problems.append(f"{where}.{exc}")
        if self.watch.enabled and self.watch.import_dir is not None and self.watch.import_dir == self.data_dir:
            problems.append("watch.import_dir must not be data_dir")
        if self.web.enabled and self.web.password_file is not None:
            from dicom_node.web.auth import PasswordFileError, read_password_file

            try:
                read_password_file(self.web.password_file)
            except PasswordFileError as exc:
                problems.append(f"web.password_file: {exc}")
        if self.database.is_postgresql:
            try:
                self.database.password()
            except ConfigError as exc:
                problems.append(f"database.{exc}")
            for key in ("sslrootcert", "sslcert", "sslkey"):
                path = getattr(self.database, key)
                if path is not None and not Path(path).is_file():
                    problems.append(f"database.{key}: {path} is not a readable file")
        if self.webhook.ca_file is not None and not Path(self.webhook.ca_file).is_file():
            problems.append(f"webhook.ca_file: {self.webhook.ca_file} is not a readable file")
        if self.rules is not None:
            problems.extend(self._rules_problems())
        return problems

    def _rules_problems(self) -> list[str]:
        try:
            from dicom_node.rules import RulesError, RuleSet
        except ImportError:  # pragma: no cover - rules module not installed
            return []
        try:
            ruleset = RuleSet.load(self.rules)  # type: ignore[arg-type]
        except RulesError as exc:
            return [f"rules: {exc}"]
        out = [f"rules: {p}" for p in ruleset.check_destinations(set(self.destinations))]
        out += [f"rules: {p}" for p in ruleset.check_files()]
        return out


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "missing (required)"
        value = err.get("input")
        shown = ""
        if err["type"] not in ("extra_forbidden", "missing") and isinstance(value, (str, int, float, bool)):
            shown = f" (got {value!r})"
        lines.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return f"{source}: " + "; ".join(lines)


def config_from_data(data: Any, source: str = "config", base: Path | None = None) -> NodeConfig:
    """Validate already-parsed YAML; relative paths are resolved against ``base`` (or CWD)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
    return cfg.resolve_paths(base or Path.cwd())


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> NodeConfig:
    """Read, validate and resolve a node.yaml; :class:`ConfigError` names the key on error.

    ``overrides`` is merged (recursively) over the file's content before validation; the
    demo and the tests use it to change ports and directories.
    """
    path = Path(path) if path is not None else default_config_path()
    data = read_yaml(path, "configuration", ConfigError)
    if overrides:
        data = merge(data or {}, overrides)
    cfg = config_from_data(data, source=str(path), base=path.resolve().parent)
    cfg.source = path.resolve()
    return cfg


def merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge (``extra`` wins); used for overrides."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
