"""Protocol abuse against a running node: garbage bytes, malformed PDUs, half and idle
connections, peers that stop or hang up in the middle of a PDU.

Each abusive connection is made with a raw socket and leaves exactly one WARNING
``connection_dropped`` in the node's log (found by the connection's own port), never an
ERROR or a traceback; the association slots it held come back after the ACSE or network
timeout (short ones here) or at once when it closed; real dcmtk echoscu and storescu
work again afterwards.
"""

from __future__ import annotations

import random
import re
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import NodeProcess, echoscu, require_tool, storescu, wait_for, write_config
from pydicom.dataset import FileMetaDataset
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from test_store import tiny_ct

pytestmark = pytest.mark.network

VERIFICATION = "1.2.840.10008.1.1"
#: the fixed part of an A-ASSOCIATE-RQ (PS3.8 9.3.2): its first item starts here
FIXED_RQ = 74


# --------------------------------------------------------------------------------------
# what the abusers send
# --------------------------------------------------------------------------------------
def association_rq(calling: str = "ECHOSCU", called: str = "STARDUST") -> bytes:
    """A valid A-ASSOCIATE-RQ PDU proposing Verification."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(VERIFICATION)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client (what a TPS set up for DICOM over TLS sends)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="stardust")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def rq_with_item_length_past_the_end() -> bytes:
    pdu = bytearray(association_rq())
    pdu[FIXED_RQ + 2 : FIXED_RQ + 4] = struct.pack(">H", 0xFFF0)  # application context item
    return bytes(pdu)


def rq_with_unknown_item() -> bytes:
    pdu = bytearray(association_rq())
    pdu[FIXED_RQ] = 0x77
    return bytes(pdu)


def rq_with_protocol_version(version: int) -> bytes:
    pdu = bytearray(association_rq())
    pdu[6:8] = struct.pack(">H", version)
    return bytes(pdu)


def p_data(length: int, body: bytes) -> bytes:
    """A P-DATA-TF PDU header announcing ``length`` bytes, followed by ``body``."""
    return b"\x04\x00" + struct.pack(">L", length) + body


class Abuser:
    """One raw TCP connection to the node; ``port`` (its local port) finds its log line."""

    def __init__(self, node_port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", node_port), timeout=10)
        self.port = self.sock.getsockname()[1]

    def send(self, data: bytes) -> Abuser:
        self.sock.sendall(data)
        return self

    def read_pdu_type(self) -> int:
        """Read the node's answer whole; its type (2: A-ASSOCIATE-AC, 3: -RJ, 7: A-ABORT).

        Whole: closing a socket with unread data sends a reset instead of a plain close.
        """
        header = self._read(6)
        if len(header) < 6:
            return 0
        self._read(struct.unpack(">L", header[2:6])[0])
        return header[0]

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def hit(node_port: int, data: bytes, then: Callable[[Abuser], None] | None = None) -> int:
    """Connect, send ``data``, optionally do more, close; the connection's port."""
    abuser = Abuser(node_port)
    try:
        if data:
            abuser.send(data)
        if then is not None:
            then(abuser)
        else:
            time.sleep(0.05)  # let the node read before the connection goes
    finally:
        abuser.close()
    return abuser.port


# --------------------------------------------------------------------------------------
# the node's log
# --------------------------------------------------------------------------------------
def warnings_of(log: str, port: int) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line and f"peer=127.0.0.1:{port} " in line]


def dropped_why(node: NodeProcess, port: int, timeout: float = 15.0) -> str:
    """The ``why`` of the one connection_dropped WARNING of the connection from ``port``."""
    wait_for(lambda: warnings_of(node.log_text(), port), timeout, 0.1, f"the WARNING of connection :{port}")
    time.sleep(0.3)  # a second line would come from the same sweep of the node's watcher
    lines = warnings_of(node.log_text(), port)
    assert len(lines) == 1, "\n".join(lines)
    assert "connection_dropped" in lines[0], lines[0]
    m = re.search(r'why=("(?:[^"\\]|\\.)*"|\S+)', lines[0])
    assert m, lines[0]
    return m.group(1).strip('"')


def assert_clean_log(node: NodeProcess) -> None:
    """No ERROR and no traceback; every WARNING is a dropped connection or a rejected association."""
    log = node.log_text()
    assert "Traceback" not in log, log[-4000:]
    assert not [line for line in log.splitlines() if " ERROR " in line], log[-4000:]
    for line in log.splitlines():
        if " WARNING " in line:
            assert "connection_dropped" in line or "association_rejected" in line, line


def ct_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds = tiny_ct()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    path = folder / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def valid_peers_work(node: NodeProcess, tmp: Path) -> None:
    out = echoscu(node.port)
    assert out.returncode == 0, out.stderr
    out = storescu(ct_file(tmp / "valid"), node.port)
    assert out.returncode == 0 and "Received Store Response (Success)" in out.stderr, out.stderr


def refused_for_the_limit(node: NodeProcess) -> bool:
    out = echoscu(node.port)
    return out.returncode != 0 and "Local Limit Exceeded" in out.stderr


def start_node(tmp: Path, **network) -> NodeProcess:
    config = write_config(tmp / "node", rules=False, network={"bind": "127.0.0.1", **network})
    return NodeProcess(config).start()


# --------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------
def test_garbage_and_malformed_pdus_give_one_warning_each(tmp_path):
    """Connections that send garbage or broken PDUs and close: one WARNING each, and
    their slots are free at once (the ACSE timeout is long here, 20 s: a slot held until
    it expired would refuse the echoscu that follows)."""
    node = start_node(tmp_path, max_associations=2, acse_timeout_seconds=20, network_timeout_seconds=5)
    try:
        expected: dict[int, str] = {}

        def expect(port: int, pattern: str) -> None:
            expected[port] = pattern

        expect(hit(node.port, tls_client_hello()), r"not DICOM: a TLS handshake")
        expect(hit(node.port, b"GET / HTTP/1.1\r\nHost: stardust\r\n\r\n"), r"not DICOM: text starting with 'G'")
        noise = random.Random(11).randbytes(3000)
        assert noise[0] > 7  # seeded: its first byte is no PDU type
        expect(hit(node.port, noise), r"not DICOM")
        expect(hit(node.port, b""), r"closed without sending a PDU")  # a port scan's connect
        expect(hit(node.port, b"\x01\x00\x00"), r"closed without sending a PDU")
        expect(hit(node.port, association_rq()[:40]), r"closed in the middle of a PDU \(40 of \d+ bytes\)")
        expect(hit(node.port, rq_with_item_length_past_the_end()), r"malformed A-ASSOCIATE-RQ")
        expect(hit(node.port, rq_with_unknown_item()), r"malformed A-ASSOCIATE-RQ")
        expect(
            hit(node.port, rq_with_protocol_version(5), lambda a: a.read_pdu_type()),
            r"A-ASSOCIATE-RQ with protocol version 0x0005",
        )
        expect(hit(node.port, p_data(6, b"\x00\x00\x00\x02\x01\x03")), r"P-DATA-TF before any association request")
        expect(hit(node.port, association_rq() + b"GET / HTTP/1.0\r\n\r\n"), r"unknown PDU type 0x47|out of sequence")

        def accepted_then_hang_up(abuser: Abuser) -> None:
            assert abuser.read_pdu_type() == 0x02  # A-ASSOCIATE-AC

        expect(
            hit(node.port, association_rq(), accepted_then_hang_up),
            r"connection closed by the peer without A-RELEASE",
        )

        # all of them closed: both slots are free now, long before the 20 s ACSE timeout
        out = echoscu(node.port)
        assert out.returncode == 0, out.stderr
        for port, pattern in expected.items():
            why = dropped_why(node, port)
            assert re.search(pattern, why), f":{port} {why!r} does not match {pattern!r}"
        assert node.alive()
        valid_peers_work(node, tmp_path)
        assert_clean_log(node)
    finally:
        node.stop()


def test_idle_half_and_stalled_connections_hold_slots_only_until_their_timeout(tmp_path):
    """Connections that stay open and silent fill the association limit ("local limit
    exceeded") and are closed by the ACSE timeout (before an A-ASSOCIATE-RQ, also one
    stopped in the middle of it) or the network timeout (after the association was
    accepted, also one stopped in the middle of a P-DATA-TF)."""
    node = start_node(tmp_path, max_associations=2, acse_timeout_seconds=2, network_timeout_seconds=3)
    abusers: list[tuple[Abuser, str]] = []
    try:

        def fill(make: Callable[[], Abuser], why: str) -> None:
            pair = [make(), make()]
            abusers.extend((a, why) for a in pair)
            wait_for(lambda: refused_for_the_limit(node), 5, 0.1, f"the limit to be full ({why})")
            wait_for(lambda: echoscu(node.port).returncode == 0, 15, 0.2, f"the slots to come back ({why})")

        def idle() -> Abuser:
            return Abuser(node.port)

        def stalled_in_request() -> Abuser:
            return Abuser(node.port).send(association_rq()[:40])

        def half_association() -> Abuser:
            abuser = Abuser(node.port).send(association_rq())
            assert abuser.read_pdu_type() == 0x02
            return abuser

        def stalled_in_p_data() -> Abuser:
            abuser = half_association()
            return abuser.send(p_data(1000, b"\x00" * 10))

        fill(idle, r"sent nothing for 2 s \(ACSE timeout\)")
        fill(stalled_in_request, r"stopped sending in the middle of a PDU for 2 s")
        fill(half_association, r"associated but silent for 3 s \(network timeout\)")
        fill(stalled_in_p_data, r"stopped sending in the middle of a PDU for 3 s|network timeout")

        for abuser, pattern in abusers:
            why = dropped_why(node, abuser.port)
            assert re.search(pattern, why), f":{abuser.port} {why!r} does not match {pattern!r}"
        log = node.log_text()
        assert "association_rejected" in log and "local limit exceeded" in log
        assert node.alive()
        valid_peers_work(node, tmp_path)
        assert_clean_log(node)
    finally:
        for abuser, _ in abusers:
            abuser.close()
        node.stop()


def test_plain_dicom_and_http_on_the_tls_port(tmp_path):
    """On a TLS port, a plain A-ASSOCIATE-RQ, an HTTP request and a TLS client that stops
    in its handshake are one WARNING each; a TLS echoscu works afterwards."""
    pki = tmp_path / "pki"
    pki.mkdir()
    subprocess.run(
        [
            require_tool("openssl"),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "node.key",
            "-out",
            "node.crt",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        cwd=pki,
        check=True,
        capture_output=True,
        timeout=60,
    )
    tls = {"enabled": True, "cert_file": str(pki / "node.crt"), "key_file": str(pki / "node.key")}
    config = write_config(
        tmp_path / "node",
        rules=False,
        network={"bind": "127.0.0.1", "acse_timeout_seconds": 2, "network_timeout_seconds": 3},
        tls=tls,
    )
    node = NodeProcess(config).start()
    stalled = None
    try:
        plain = hit(node.port, association_rq())
        http = hit(node.port, b"GET / HTTP/1.1\r\nHost: stardust\r\n\r\n")
        stalled = Abuser(node.port).send(tls_client_hello())
        assert re.search(r"TLS failed", dropped_why(node, plain))
        assert re.search(r"TLS failed", dropped_why(node, http))
        assert re.search(r"stopped sending .* for 2 s", dropped_why(node, stalled.port))
        out = echoscu(node.port, extra=["+tla", "+cf", str(pki / "node.crt")])
        assert out.returncode == 0, out.stderr
        assert_clean_log(node)
    finally:
        if stalled is not None:
            stalled.close()
        node.stop()
