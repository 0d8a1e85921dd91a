"""Serve the web application with uvicorn in a thread of the receiving process.

The socket is bound here, before the thread starts, so that a port in use or an address
that does not exist stops the node at start with the reason (like the DICOM port). TLS
(``web.tls``) is uvicorn's: certificate and key (an encrypted key's password from the
environment or a file, never the YAML), optional client certificates verified against
``web.tls.ca_file``, and the minimum protocol version of ``web.tls.min_version``. Access
lines are not logged (they would only repeat case numbers); uvicorn's errors go to the
node's log.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

from dicom_node.config import NodeConfig
from dicom_node.logs import event, get_logger

__all__ = ["WebServer", "WebError"]

log = get_logger(__name__)


class WebError(RuntimeError):
    """The web page cannot be served; the message says why."""


class WebServer:
    def __init__(self, cfg: NodeConfig, app) -> None:
        self.cfg = cfg
        self.app = app
        self.server = None
        self.thread: threading.Thread | None = None
        self.port: int | None = None

    def _config(self):
        import uvicorn

        web = self.cfg.web
        kw: dict = {}
        if web.tls.enabled:
            kw.update(
                ssl_certfile=str(web.tls.cert_file),
                ssl_keyfile=str(web.tls.key_file),
                ssl_keyfile_password=web.tls.key_password(),
            )
            if web.tls.ca_file is not None:
                kw.update(
                    ssl_ca_certs=str(web.tls.ca_file),
                    ssl_cert_reqs=ssl.CERT_REQUIRED if web.tls.require_client_cert else ssl.CERT_OPTIONAL,
                )
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            **kw,
        )
        try:
            config.load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise WebError(f"web.tls: cannot load the certificate or key: {exc}") from None
        if config.ssl is not None:
            config.ssl.minimum_version = (
                ssl.TLSVersion.TLSv1_3 if web.tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
            )
        return config

    def start(self, timeout: float = 15.0) -> None:
        import uvicorn

        web = self.cfg.web
        config = self._config()
        family = socket.AF_INET6 if ":" in web.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((web.bind, web.port))
        except OSError as exc:
            sock.close()
            raise WebError(f"web: cannot listen on {web.bind}:{web.port}: {exc.strerror or exc}") from None
        sock.listen(64)
        sock.set_inheritable(False)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(config)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.server.serve(sockets=[sock]))  # type: ignore[union-attr]
            except BaseException as exc:  # reported by start() or logged
                failure.append(exc)
                log.exception("the web server stopped")
            finally:
                sock.close()

        self.thread = threading.Thread(target=run, name="web", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and not failure and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            self.stop()
            raise WebError(f"web: the server did not start ({failure[0] if failure else 'timed out'})")
        scheme = "https" if web.tls.enabled else "http"
        auth = "password" if web.password_file else "client certificate" if web.client_certificates else "none"
        event(log, "web_listening", url=f"{scheme}://{web.bind}:{self.port}/", authentication=auth)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None
