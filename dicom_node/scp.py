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
* Protocol abuse (port scans, TLS or HTTP clients on the DICOM port, malformed PDUs,
  half-open or idle connections, peers that stop or hang up in the middle of a PDU) is
  accounted per TCP connection (:class:`ConnectionInfo`): pynetdicom's events give the
  bytes and the state machine's events, its log records (routed here by
  :func:`~dicom_node.logs.route_pynetdicom_records`, and the exceptions of its threads
  through ``threading.excepthook``) what went wrong; when the connection's threads are
  over it gets exactly one WARNING ``connection_dropped`` with the peer, the cause in a
  few words and the bytes seen, never pynetdicom's ERROR lines or tracebacks.
* Nothing holds an association slot for long: ``network.max_associations`` counts open
  connections (one closed by the peer frees its slot at once), a connection that sends no
  A-ASSOCIATE-RQ is closed after ``acse_timeout_seconds``, an idle association is aborted
  after ``network_timeout_seconds``, and every accepted socket gets a timeout (the ACSE
  timeout until the association is accepted, then the network timeout) so that a peer
  that stops in the middle of a PDU cannot block pynetdicom's reader forever.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import NodeConfig, TlsServer
from dicom_node.logs import event, get_logger, route_pynetdicom_records
from dicom_node.metrics import metrics
from dicom_node.states import InstanceSource
from dicom_node.store import Origin, Store, StoreError
from dicom_node.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = [
    "StorageSCP",
    "build_server_ssl_context",
    "AssociationInfo",
    "ConnectionInfo",
    "describe_connection",
    "ACCEPTED_TRANSFER_SYNTAXES",
]

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


#: PDU types (the first byte of every PDU, PS3.8 9.3) by name
_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
#: state machine events that are "PDU received" (PS3.8 9.2.1), by PDU type
_PDU_EVENTS = {"Evt3": 0x02, "Evt4": 0x03, "Evt6": 0x01, "Evt10": 0x04, "Evt12": 0x05, "Evt13": 0x06, "Evt16": 0x07}
#: states in which an association is established or being released
_ASSOCIATED_STATES = frozenset({"Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11", "Sta12"})
#: pynetdicom messages that are followed by a record carrying the exception
_PAIRED_MESSAGES = (
    "Connection closed before the entire PDU",
    "Unable to decode the received PDU",
    "Exception in DUL.run()",
    "State Machine received an exception",
    "Received an invalid DIMSE message",
)
#: pynetdicom's own limit, on its association threads, is set this far above the node's
#: (StorageSCP._on_requested, on open connections): the thread of a connection that closed
#: before its A-ASSOCIATE-RQ waits out the ACSE timeout (blocked, without socket or CPU),
#: and a burst of port scans must not make pynetdicom refuse valid peers meanwhile
_LINGERING_THREADS = 1000


@dataclass
class ConnectionInfo:
    """One inbound TCP connection, from its accept to the end of pynetdicom's threads for it.

    Filled from pynetdicom's events (``EVT_DATA_RECV``: every PDU read; ``EVT_FSM_TRANSITION``:
    timer expiry, transport closed) and its log records about the connection (``problems``:
    ``(kind, why)`` in the order they happened; the first is the cause, the rest follow
    from it). :func:`describe_connection` turns it into the one WARNING it may deserve.
    """

    peer: str
    assoc: Any = field(repr=False)
    opened_at: float = field(default_factory=time.time)
    closed_at: float | None = None  # the TCP connection closed (pynetdicom's threads may linger)
    # bytes pynetdicom read from the peer: whole PDUs and the headers of those it dropped
    # (a read that timed out in the middle of a PDU is not counted)
    bytes: int = 0
    pdus: int = 0
    first_pdu: int | None = None  # PDU type of the first PDU read
    last_pdu: int | None = None
    requested: bool = False  # an A-ASSOCIATE-RQ PDU arrived
    request_dropped: bool = False  # ... and pynetdicom dropped it (undecodable, wrong protocol version)
    handed_over: bool = False  # ... and was handed to the node (EVT_REQUESTED)
    established: bool = False
    released: bool = False
    peer_aborted: bool = False  # the peer sent A-ABORT
    lost: bool = False  # the transport closed while associated (no release, no abort)
    idle_expired: bool = False  # no A-ASSOCIATE-RQ within the ACSE timeout (ARTIM)
    rejected: bool = False
    reported: bool = False  # already logged as a WARNING (a rejection)
    connected: bool = True  # the TCP connection is open
    calling: str = ""
    problems: list[tuple[str, str]] = field(default_factory=list)
    pending: str = ""  # a pynetdicom message whose exception record comes next

    @property
    def seconds(self) -> float:
        """How long the connection was open."""
        return (self.closed_at or time.time()) - self.opened_at

    @property
    def stage(self) -> str:
        if self.established:
            return "associated"
        return "negotiating" if self.requested else "before_request"

    def problem(self, kind: str, why: str) -> None:
        if len(self.problems) < 20:
            self.problems.append((kind, why))


def _exc_text(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return (f"{name} {text}" if text else name)[:120]


def _not_dicom(pdu_type: int) -> str:
    """What a connection sent when its first byte is no PDU type (1..7)."""
    if pdu_type == 0x16:
        return "not DICOM: a TLS handshake (the peer uses TLS, this port does not)"
    if 0x20 < pdu_type < 0x7F:
        char = chr(pdu_type)
        hint = ", perhaps an HTTP request" if char in "GPHDOCT" else ""
        return f"not DICOM: text starting with {char!r}{hint}"
    return f"not DICOM (unknown PDU type 0x{pdu_type:02X})"


def _message_problem(conn: ConnectionInfo, msg: str, network_timeout: float) -> tuple[str, str]:
    """The (kind, why) of a pynetdicom message without an exception."""
    if m := re.match(r"Unknown PDU type received '0x([0-9A-Fa-f]{2})'", msg):
        conn.bytes += 6  # pynetdicom read a PDU header and dropped it
        pdu_type = int(m.group(1), 16)
        if not conn.requested:
            return "not_dicom", _not_dicom(pdu_type)
        return "protocol", f"an unknown PDU type 0x{pdu_type:02X} after the association request"
    if m := re.match(r"The received PDU is shorter than expected \((\d+) of (\d+) bytes", msg):
        got, whole = int(m.group(1)), int(m.group(2))
        conn.bytes += got
        return "cut", f"closed in the middle of a PDU ({got} of {whole} bytes)"
    if m := re.match(r"A-ASSOCIATE-RQ: Unsupported protocol version '(0x[0-9A-Fa-f]+)'", msg):
        conn.request_dropped = True
        return "malformed", f"A-ASSOCIATE-RQ with protocol version {m.group(1)} (rejected)"
    if m := re.match(r"Invalid event '(Evt\d+)' for the current state '(Sta\d+)'", msg):
        what = _PDU_NAMES.get(_PDU_EVENTS.get(m.group(1), 0), m.group(1))
        return "protocol", f"{what} out of sequence (state machine {m.group(2)})"
    if msg.startswith("Network timeout reached"):
        return "network_timeout", f"associated but silent for {network_timeout:g} s (network timeout)"
    return "protocol", msg.splitlines()[0][:120] if msg else "pynetdicom reported an error"


def _exception_problem(
    conn: ConnectionInfo, pending: str, exc: BaseException, acse_timeout: float, network_timeout: float
) -> tuple[str, str]:
    """The (kind, why) of a pynetdicom record carrying an exception, after message ``pending``."""
    if pending.startswith("Connection closed before") or isinstance(exc, OSError):
        if isinstance(exc, TimeoutError):
            waited = network_timeout if conn.established else acse_timeout
            return "stalled", f"stopped sending in the middle of a PDU for {waited:g} s"
        if isinstance(exc, ssl.SSLError):
            reason = getattr(exc, "reason", None) or _exc_text(exc)
            return "tls", f"TLS failed: {reason}"
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return "reset", "connection reset by the peer"
        return "reset", f"connection error: {_exc_text(exc)}"
    if pending.startswith("Unable to decode"):
        name = _PDU_NAMES.get(conn.last_pdu or 0, "PDU")
        if conn.last_pdu == 0x01:
            conn.request_dropped = True
        return "malformed", f"malformed {name} (it does not decode: {_exc_text(exc)})"
    if pending.startswith("Received an invalid DIMSE"):
        return "malformed", f"an invalid DIMSE message ({_exc_text(exc)})"
    return "protocol", f"pynetdicom gave up on the connection ({_exc_text(exc)})"


def note_record(
    conn: ConnectionInfo, msg: str, exc: BaseException | None, acse_timeout: float, network_timeout: float
) -> None:
    """Account one pynetdicom record (its message and exception, if any) to ``conn``."""
    if exc is None:
        if msg.startswith(_PAIRED_MESSAGES):
            conn.pending = msg
            return
        conn.problem(*_message_problem(conn, msg, network_timeout))
        return
    conn.problem(*_exception_problem(conn, conn.pending, exc, acse_timeout, network_timeout))
    conn.pending = ""


def describe_connection(conn: ConnectionInfo, acse_timeout: float) -> tuple[str, str] | None:
    """``(kind, why)`` for a connection that misbehaved, None for one that did nothing wrong.

    ``kind`` is a small fixed vocabulary (the metric's label), ``why`` a few words for
    the operator. A rejected association was logged when it was rejected; an association
    that was released, or aborted by the peer, is an ordinary end.
    """
    if conn.reported:
        return None
    if conn.problems:
        return conn.problems[0]
    if not conn.requested:
        if conn.first_pdu is not None:
            name = _PDU_NAMES.get(conn.first_pdu, f"PDU type 0x{conn.first_pdu:02X}")
            return "protocol", f"{name} before any association request"
        if conn.idle_expired or conn.seconds >= 0.9 * acse_timeout:
            if conn.bytes:
                return "idle", f"no association request within {acse_timeout:g} s (ACSE timeout)"
            return "idle", f"sent nothing for {acse_timeout:g} s (ACSE timeout)"
        return "no_request", "closed without sending a PDU"
    if conn.rejected:
        return "rejected", "association rejected by pynetdicom (local limit of association threads)"
    if not conn.established:
        return "protocol", "closed during association negotiation"
    if conn.released or conn.peer_aborted:
        return None
    if conn.lost:
        return "lost", "connection closed by the peer without A-RELEASE or A-ABORT"
    return None


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
        # inbound connections by their Association; the threads of each (association, DUL)
        self._conns: dict[Any, ConnectionInfo] = {}
        self._threads: dict[threading.Thread, ConnectionInfo] = {}
        self._unroute: Callable[[], None] | None = None
        self._previous_excepthook: Callable[[threading.ExceptHookArgs], Any] | None = None
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._networks = cfg.access.network_objects()
        self._calling = {a.strip() for a in cfg.access.calling_aets}

        ae = AE(ae_title=cfg.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        # the node's own limit counts open connections (_on_requested); pynetdicom's, on its
        # threads, also counts those of connections already gone (they end at the ACSE timeout)
        ae.maximum_associations = cfg.network.max_associations + _LINGERING_THREADS
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
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_FSM_TRANSITION, self._on_fsm),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        self._unroute = route_pynetdicom_records(self._take_record)
        self._previous_excepthook = threading.excepthook
        threading.excepthook = self._excepthook
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="stardust-connections", daemon=True)
        self._watcher.start()
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
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
            self._watcher = None
        self._sweep()
        if self._unroute is not None:
            self._unroute()
            self._unroute = None
        if threading.excepthook == self._excepthook and self._previous_excepthook is not None:
            threading.excepthook = self._previous_excepthook

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
        conn = getattr(assoc, "stardust_conn", None)
        if conn is not None:
            conn.calling = calling
            conn.handed_over = True
        reason = None
        rsd = None
        label = ""
        if self.cfg.access.require_called_aet and called != self.cfg.ae_title:
            reason, rsd = f"called AE title {called!r} is not {self.cfg.ae_title!r}", (0x01, 0x01, 0x07)
            label = "called_aet"
        elif not self.cfg.access.allow_any_calling_aet and calling not in self._calling:
            reason, rsd = f"calling AE title {calling!r} is not allowed", (0x01, 0x01, 0x03)
            label = "calling_aet"
        elif not self.cfg.access.allow_any_network and not self._address_allowed(address):
            reason, rsd = f"source address {address} is not in an allowed network", (0x01, 0x01, 0x01)
            label = "network"
        elif (others := self._open_connections(besides=assoc)) >= self.cfg.network.max_associations:
            reason = f"local limit exceeded: {others} connections open (network.max_associations)"
            rsd, label = (0x02, 0x03, 0x02), "limit"
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
        metrics().associations.labels("rejected", label).inc()
        if conn is not None:
            conn.reported = True
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

    def _open_connections(self, besides: Any) -> int:
        """Inbound connections still open, other than ``besides`` (the node's association limit)."""
        with self._lock:
            return sum(1 for a, c in self._conns.items() if a is not besides and c.connected and a.dul.is_alive())

    @staticmethod
    def _set_socket_timeout(assoc, seconds: float) -> None:
        """Bound every read and write on the association's socket (pynetdicom leaves it blocking).

        pynetdicom reads a whole PDU once its first byte is there; without a timeout a peer
        that stops in the middle of one blocks the reader, and with it the association's
        slot, until the peer goes away.
        """
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            try:
                sock.settimeout(seconds)
            except OSError:  # already closed
                pass

    def _on_conn_open(self, ev) -> None:
        assoc = ev.assoc
        address = ev.address
        conn = ConnectionInfo(peer=f"{address[0]}:{address[1]}", assoc=assoc)
        assoc.stardust_conn = conn
        with self._lock:
            self._conns[assoc] = conn
            self._threads[assoc] = conn
            self._threads[assoc.dul] = conn
        self._set_socket_timeout(assoc, self.cfg.network.acse_timeout_seconds)

    def _on_data(self, ev) -> None:
        conn = getattr(ev.assoc, "stardust_conn", None)
        if conn is None or not ev.data:
            return
        conn.bytes += len(ev.data)
        conn.pdus += 1
        conn.last_pdu = ev.data[0]
        if conn.first_pdu is None:
            conn.first_pdu = conn.last_pdu
        if conn.last_pdu == 0x01:
            conn.requested = True

    def _on_fsm(self, ev) -> None:
        conn = getattr(ev.assoc, "stardust_conn", None)
        if conn is None:
            return
        fsm_event, state = ev.fsm_event, ev.current_state
        if fsm_event == "Evt18" and state == "Sta2":  # ARTIM: no A-ASSOCIATE-RQ in time
            conn.idle_expired = True
        elif fsm_event == "Evt16":  # A-ABORT PDU from the peer
            conn.peer_aborted = True
        elif fsm_event == "Evt17" and state in _ASSOCIATED_STATES:
            conn.lost = True

    def _on_accepted(self, ev) -> None:
        conn = getattr(ev.assoc, "stardust_conn", None)
        if conn is not None:
            conn.established = True
        self._set_socket_timeout(ev.assoc, self.cfg.network.network_timeout_seconds)
        ev.assoc.dul._run_loop_delay = self.cfg.network.poll_interval_ms / 1000.0

    def _on_rejected(self, ev) -> None:
        conn = getattr(ev.assoc, "stardust_conn", None)
        if conn is not None:
            conn.rejected = True

    def _on_conn_close(self, ev) -> None:
        conn = getattr(ev.assoc, "stardust_conn", None)
        if conn is not None:
            conn.connected = False
            conn.closed_at = conn.closed_at or time.time()
        self._on_closed(ev, "closed")

    # -- protocol problems ---------------------------------------------------------------
    def _take_record(self, record: logging.LogRecord) -> bool:
        """Account a pynetdicom WARNING/ERROR to its connection (True: not to be logged as such).

        Records from the threads of an inbound connection are about that connection (a
        malformed PDU, a timeout, a peer gone), except those saying that one of the node's
        own event handlers raised: those are bugs here and stay ERRORs.
        """
        conn = self._threads.get(threading.current_thread())
        if conn is None or record.name == "pynetdicom.events":
            return False
        msg = record.getMessage()
        if msg.startswith("Exception in the handler bound to"):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        note_record(
            conn,
            msg,
            exc,
            self.cfg.network.acse_timeout_seconds,
            self.cfg.network.network_timeout_seconds,
        )
        return True

    def _excepthook(self, args: threading.ExceptHookArgs) -> Any:
        """An exception that ends one of pynetdicom's threads of a connection is that connection's problem.

        pynetdicom's state machine raises out of its reader thread on some sequences of
        garbage (``InvalidEventError``); Python would print the traceback to stderr.
        """
        conn = self._threads.get(args.thread) if args.thread is not None else None
        if conn is None:
            previous = self._previous_excepthook or threading.__excepthook__
            return previous(args)
        if args.exc_value is not None:
            conn.problem("protocol", f"pynetdicom gave up on the connection ({_exc_text(args.exc_value)})")
        log.debug("pynetdicom thread failed", exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        return None

    def _watch(self) -> None:
        while not self._watch_stop.wait(0.2):
            try:
                self._sweep()
            except Exception:
                log.exception("connection watch failed")

    def _sweep(self) -> None:
        """Finish the connections that are over.

        A connection is over when pynetdicom's threads for it are, or, for one closed
        without an A-ASSOCIATE-RQ for the node (none, or one pynetdicom dropped), as soon
        as its reader (DUL) thread is: its association thread only waits out the ACSE
        timeout then, and nothing more can happen on it.
        """
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            assoc, dul = conn.assoc, conn.assoc.dul
            if assoc.ident is None:
                continue  # not started yet
            reader_over = dul.ident is not None and not dul.is_alive()
            if not assoc.is_alive() and not dul.is_alive():
                self._finish(conn)
            elif reader_over and not conn.connected and (conn.request_dropped or not conn.requested):
                self._finish(conn)

    def _finish(self, conn: ConnectionInfo) -> None:
        """The one WARNING of a connection that misbehaved (nothing for one that did not)."""
        with self._lock:
            if self._conns.pop(conn.assoc, None) is None:
                return
            self._threads.pop(conn.assoc, None)
            self._threads.pop(conn.assoc.dul, None)
        conn.connected = False
        conn.closed_at = conn.closed_at or time.time()
        info = getattr(conn.assoc, "stardust_info", None)
        if info is not None:  # an association that ended without any close event
            self._report_close(info, "lost")
        verdict = describe_connection(conn, self.cfg.network.acse_timeout_seconds)
        if verdict is None:
            return
        kind, why = verdict
        metrics().connections_dropped.labels(kind).inc()
        fields: dict[str, Any] = {"peer": conn.peer}
        if conn.calling:
            fields["calling"] = conn.calling
        fields.update(why=why, stage=conn.stage, bytes=conn.bytes, seconds=round(conn.seconds, 1))
        event(log, "connection_dropped", level=logging.WARNING, **fields)

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
        conn = getattr(ev.assoc, "stardust_conn", None)
        if conn is not None and how == "released":
            conn.released = True
        info = getattr(ev.assoc, "stardust_info", None)
        if info is None:
            return
        self._report_close(info, how)

    def _report_close(self, info: AssociationInfo, how: str) -> None:
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
