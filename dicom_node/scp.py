"""The receiving side: a pynetdicom Application Entity with Verification and Storage SCP.

* Access control happens when the A-ASSOCIATE-RQ arrives (``EVT_REQUESTED``), before any
  negotiation: the called AE title must be the node's (reject: permanent, service user,
  "called AE title not recognised"), the calling AE title must be allow-listed
  ("calling AE title not recognised") and the peer's address must be in an allowed
  network ("no reason given": DICOM has no code for addresses). Limits on concurrent
  associations (transient, "local limit exceeded") and PDU size come from pynetdicom.
* Only the configured SOP classes (CT, MR, RTSTRUCT by default) are negotiated; any other
  presentation context is refused ("abstract syntax not supported").
* The C-STORE handler hands the raw received bytes to :meth:`Store.put` (durable write,
  then index) and answers Success only after it returns; errors map to 0xA700 (out of
  space), 0xC210 (undecodable), 0xC211 (invalid UID), 0xA900 (SOP class mismatch).
* Association closes (release, abort, connection loss) are reported to listeners: the
  case assembler uses them to know that "the association that brought the last piece" is
  over.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import NodeConfig, TlsServer
from dicom_node.logs import event, get_logger
from dicom_node.metrics import metrics
from dicom_node.states import InstanceSource
from dicom_node.store import Origin, Store, StoreError
from dicom_node.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = ["StorageSCP", "build_server_ssl_context", "AssociationInfo", "ACCEPTED_TRANSFER_SYNTAXES"]

log = get_logger(__name__)


#: modalities counted by name in the metrics (any other value, which the peer chooses, is "other")
_MODALITY_LABELS = frozenset({"CT", "MR", "RTSTRUCT", "PT", "RTPLAN", "RTDOSE", "REG", "SEG"})


class _LazyHandshakeContext(ssl.SSLContext):
    """Server context whose sockets do the TLS handshake in the association's thread.

    pynetdicom wraps accepted sockets in its accept loop; with the default eager
    handshake one silent client would block every other connection.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):  # type: ignore[override]
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def build_server_ssl_context(tls: TlsServer) -> ssl.SSLContext:
    """Server-side TLS: certificate and key, optional client-certificate verification."""
    ctx = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=tls.key_password())
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class AssociationInfo:
    id: str
    peer: str
    calling_aet: str
    called_aet: str
    opened_at: float
    closed_at: float | None = None
    instances: int = 0
    bytes: int = 0
    failures: int = 0
    how: str = ""  # released | aborted | closed
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _aet_text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    # ErrorComment is LO: at most 64 characters, no backslash
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds


def tune_pynetdicom_polling(interval_s: float) -> None:
    """Shorten pynetdicom's polling delays to ``interval_s`` (at most its own 1 ms).

    pynetdicom moves every message between two polling loops: the DUL reactor sleeps
    ``dul._run_loop_delay`` (1 ms) when idle, the association reactor ``time.sleep(0.001)``
    per turn. A C-STORE request and its response each wait for them, about 2 ms per
    instance, a third of the receive time of a CT. The DUL delay is an attribute set per
    association (:meth:`StorageSCP._on_conn_open`); the association reactor's constant
    is reached through the ``time`` name of ``pynetdicom.association``, replaced here by
    a copy of the module whose ``sleep`` shortens exactly that 1 ms wait and nothing else.
    """
    import types

    import pynetdicom.association as assoc_module

    current = assoc_module.time
    real_sleep = getattr(current, "_stardust_real_sleep", current.sleep)
    interval = min(float(interval_s), 0.001)

    def sleep(seconds: float) -> None:
        real_sleep(interval if seconds == 0.001 else seconds)

    shim = types.ModuleType("time")
    shim.__dict__.update(time.__dict__)
    shim.sleep = sleep
    shim._stardust_real_sleep = real_sleep
    assoc_module.time = shim


class StorageSCP:
    """Owns the pynetdicom AE and server; feeds :class:`Store`; reports association closes."""

    def __init__(self, cfg: NodeConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.server = None
        self._counter = itertools.count(1)
        self._prefix = f"{int(time.time()):x}"
        self.open: dict[str, AssociationInfo] = {}
        self._closed: dict[str, float] = {}  # association id -> when it closed (the most recent ones)
        self._lock = threading.Lock()
        self.close_listeners: list[Callable[[AssociationInfo], None]] = []
        self._networks = cfg.access.network_objects()
        self._calling = {a.strip() for a in cfg.access.calling_aets}

        ae = AE(ae_title=cfg.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = cfg.network.max_associations
        ae.maximum_pdu_size = cfg.network.max_pdu_size
        ae.acse_timeout = cfg.network.acse_timeout_seconds
        ae.dimse_timeout = cfg.network.dimse_timeout_seconds
        ae.network_timeout = cfg.network.network_timeout_seconds
        ae.require_called_aet = cfg.access.require_called_aet
        ae.add_supported_context(Verification)
        for uid in cfg.network.sop_classes:
            ae.add_supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES)
        self.ae = ae

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        ssl_context = build_server_ssl_context(self.cfg.tls) if self.cfg.tls.enabled else None
        tune_pynetdicom_polling(self.cfg.network.poll_interval_ms / 1000.0)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_closed, ["closed"]),
        ]
        self.server = self.ae.start_server(
            (self.cfg.network.bind, self.cfg.network.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=ssl_context,
        )
        event(
            log,
            "listening",
            ae_title=self.cfg.ae_title,
            bind=self.cfg.network.bind,
            port=self.port,
            tls=self.cfg.tls.enabled,
            sop_classes=",".join(self.cfg.network.sop_classes),
        )

    @property
    def port(self) -> int:
        if self.server is None:
            return self.cfg.network.port
        return self.server.server_address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()

    # -- helpers -------------------------------------------------------------------------
    def _info(self, assoc) -> AssociationInfo:
        info = getattr(assoc, "stardust_info", None)
        if info is None:
            rq = assoc.requestor
            primitive = rq.primitive
            info = AssociationInfo(
                id=f"{self._prefix}-{next(self._counter)}",
                peer=f"{rq.address}:{rq.port}",
                calling_aet=_aet_text(primitive.calling_ae_title if primitive else rq.ae_title),
                called_aet=_aet_text(primitive.called_ae_title if primitive else assoc.acceptor.ae_title),
                opened_at=time.time(),
            )
            assoc.stardust_info = info
        return info

    def is_open(self, assoc_id: str | None) -> bool:
        if assoc_id is None:
            return False
        with self._lock:
            return assoc_id in self.open

    def closed_at(self, assoc_id: str | None) -> float | None:
        """When a recent association of this process closed (None: unknown or still open)."""
        if assoc_id is None:
            return None
        with self._lock:
            return self._closed.get(assoc_id)

    @property
    def listening(self) -> bool:
        return self.server is not None

    # -- handlers ------------------------------------------------------------------------
    def _on_requested(self, ev) -> None:
        assoc = ev.assoc
        rq = assoc.requestor.primitive
        calling = _aet_text(rq.calling_ae_title)
        called = _aet_text(rq.called_ae_title)
        address = assoc.requestor.address
        reason = None
        rsd = None
        if self.cfg.access.require_called_aet and called != self.cfg.ae_title:
            reason, rsd = f"called AE title {called!r} is not {self.cfg.ae_title!r}", (0x01, 0x01, 0x07)
        elif not self.cfg.access.allow_any_calling_aet and calling not in self._calling:
            reason, rsd = f"calling AE title {calling!r} is not allowed", (0x01, 0x01, 0x03)
        elif not self.cfg.access.allow_any_network and not self._address_allowed(address):
            reason, rsd = f"source address {address} is not in an allowed network", (0x01, 0x01, 0x01)
        if rsd is None:
            info = self._info(assoc)
            with self._lock:
                self.open[info.id] = info
            event(log, "association_requested", level=logging.DEBUG, assoc=info.id, calling=calling, peer=info.peer)
            return
        event(
            log,
            "association_rejected",
            level=logging.WARNING,
            calling=calling,
            called=called,
            peer=f"{address}:{assoc.requestor.port}",
            reason=reason,
        )
        metrics().associations.labels("rejected", {1: "network", 3: "calling_aet", 7: "called_aet"}[rsd[2]]).inc()
        assoc.acse.send_reject(*rsd)
        assoc.is_rejected = True
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self._networks)

    def _on_conn_open(self, ev) -> None:
        ev.assoc.dul._run_loop_delay = self.cfg.network.poll_interval_ms / 1000.0

    def _on_echo(self, ev) -> int:
        return 0x0000

    def _on_store(self, ev) -> int | Dataset:
        info = self._info(ev.assoc)
        req = ev.request
        data = req.DataSet.getbuffer() if hasattr(req.DataSet, "getbuffer") else req.DataSet
        try:
            origin = Origin(
                source=InstanceSource.DICOM,
                assoc_id=info.id,
                calling_aet=info.calling_aet,
                called_aet=info.called_aet,
                peer=info.peer,
            )
            stored = self.store.put(
                data,
                ev.context.transfer_syntax,
                origin,
                expected_sop_class=req.AffectedSOPClassUID,
                expected_sop_instance=req.AffectedSOPInstanceUID,
            )
        except StoreError as exc:
            metrics().instances_refused.labels(f"0x{exc.status:04X}").inc()
            with info.lock:
                info.failures += 1
            event(
                log,
                "store_refused",
                level=logging.WARNING,
                assoc=info.id,
                calling=info.calling_aet,
                status=f"0x{exc.status:04X}",
                why=str(exc),
            )
            return _status(exc.status, str(exc))
        except Exception as exc:  # never let a bug take the association down silently
            metrics().instances_refused.labels("0xC001").inc()
            with info.lock:
                info.failures += 1
            event(log, "store_failed", level=logging.ERROR, assoc=info.id, why=repr(exc), exc_info=True)
            return _status(0xC001, f"internal error: {type(exc).__name__}")
        finally:
            if isinstance(data, memoryview):
                data.release()
        with info.lock:
            info.instances += 1
            info.bytes += stored.size
        counted = metrics()
        modality = stored.header.modality if stored.header.modality in _MODALITY_LABELS else "other"
        counted.instances_received.labels(modality).inc()
        counted.bytes_received.inc(stored.size)
        event(
            log,
            "stored",
            level=logging.DEBUG,
            assoc=info.id,
            sop=stored.header.sop_instance_uid,
            modality=stored.header.modality,
            bytes=stored.size,
        )
        return 0x0000

    def _on_closed(self, ev, how: str) -> None:
        info = getattr(ev.assoc, "stardust_info", None)
        if info is None:
            return
        with self._lock:
            if self.open.pop(info.id, None) is None:
                return  # already reported
            info.closed_at = time.time()
            self._closed[info.id] = info.closed_at
            while len(self._closed) > 1000:
                self._closed.pop(next(iter(self._closed)))
        metrics().associations.labels(how, "").inc()
        info.how = how
        event(
            log,
            "association_closed",
            assoc=info.id,
            calling=info.calling_aet,
            peer=info.peer,
            how=how,
            instances=info.instances,
            failures=info.failures,
            mbytes=round(info.bytes / 2**20, 1),
            seconds=round(info.closed_at - info.opened_at, 2),
        )
        for listener in self.close_listeners:
            try:
                listener(info)
            except Exception:
                log.exception("association close listener failed")
