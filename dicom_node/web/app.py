"""The operator's web page and ``/metrics``: a Starlette application (Jinja2 templates).

Pages:

* ``/`` health: the DICOM listener, each worker with its device and loaded models, free
  disk against the floor, the queue, deliveries waiting or dead-lettered, the last errors;
* ``/cases`` newest first (``?state=failed`` filters, ``?before=ID`` pages back): state,
  rule, engine, timings, and why a case has no result;
* ``/cases/ID`` one case: its QA pictures, per-slice scores and areas, where the walk
  stopped and why, every delivery with its attempts; the actions retry (a failed job) and
  resend (a done job) for an authenticated user;
* ``/metrics`` the Prometheus text format (:mod:`dicom_node.metrics`).

URLs hold case numbers only, never a patient, study or UID. Every answer carries headers
that keep it out of caches and frames, and a content security policy that allows this
site's own pictures and style sheet and nothing else (no scripts at all).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.metrics import CONTENT_TYPE, StateCollector, exposition
from dicom_node.web import views
from dicom_node.web.auth import NodeAuthBackend, PasswordFile, challenge, check_form_token, form_token

__all__ = ["create_app", "Actions"]

HERE = Path(__file__).resolve().parent
_SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; frame-ancestors 'none'",
    ),
]
_MAX_FORM = 4096


class _SecurityHeaders:
    """Adds :data:`_SECURITY_HEADERS` to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in message.get("headers", [])}
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [h for h in _SECURITY_HEADERS if h[0] not in names]
            await send(message)

        await self.app(scope, receive, with_headers)


class Actions:
    """What the actions call in the running node after changing the database."""

    def __init__(self, wake_workers: Callable[[], None] | None = None, wake_sender: Callable[[], None] | None = None):
        self.wake_workers = wake_workers
        self.wake_sender = wake_sender


def create_app(
    cfg: NodeConfig,
    db: Database,
    status: Callable[[], views.NodeStatus] | None = None,
    actions: Actions | None = None,
    state: StateCollector | None = None,
) -> Starlette:
    """The application for ``cfg.web`` over the node's database.

    ``status`` gives what only the running node knows (listener, workers); ``actions``
    wakes its workers and sender; ``state`` adds the state gauges to ``/metrics``.
    """
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["node_title"] = cfg.ae_title
    status = status or views.NodeStatus
    actions = actions or Actions()
    state = state or StateCollector(cfg, db)
    passwords = PasswordFile(cfg.web.password_file) if cfg.web.password_file is not None else None

    def user_of(request: Request) -> str | None:
        return request.user.display_name if request.user.is_authenticated else None

    def render(request: Request, name: str, context: dict, status_code: int = 200) -> Response:
        user = user_of(request)
        context = {
            **context,
            "user": user,
            "token": form_token(user) if user else None,
            "can_act": user is not None,
            "auth_hint": None if user else "log in to retry or resend (web.password_file or client certificates)",
        }
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def health(request: Request) -> Response:
        return render(request, "health.html", views.health(cfg, db, status()))

    def case_list(request: Request) -> Response:
        state_arg = request.query_params.get("state") or None
        if state_arg is not None and state_arg not in views.CASE_STATES:
            return PlainTextResponse(
                f"400 Bad Request: state must be one of {', '.join(views.CASE_STATES)}\n", status_code=400
            )
        before = request.query_params.get("before")
        if before is not None and not before.isdigit():
            return PlainTextResponse("400 Bad Request: before must be a case number\n", status_code=400)
        return render(request, "cases.html", views.cases(cfg, db, state_arg, int(before) if before else None))

    def one_case(request: Request) -> Response:
        case_id = request.path_params["case_id"]
        page = views.case_page(cfg, db, case_id)
        if page is None:
            return render(request, "missing.html", {"what": f"case {case_id}"}, status_code=404)
        page["message"] = {"retried": "The job was queued again.", "resent": "The deliveries were queued again."}.get(
            request.query_params.get("done", "")
        )
        return render(request, "case.html", page)

    def qa_picture(request: Request) -> Response:
        path = views.qa_file(db, request.path_params["case_id"], request.path_params["name"])
        if path is None:
            return PlainTextResponse("404 Not Found: no such picture\n", status_code=404)
        return FileResponse(path, media_type="image/png")

    async def act(request: Request) -> Response:
        from dicom_node.jobs import JobError, resend_job, retry_job

        user = user_of(request)
        if user is None:
            return PlainTextResponse(
                "403 Forbidden: actions need an authenticated user (set web.password_file or client certificates)\n",
                status_code=403,
            )
        body = await request.body()
        if len(body) > _MAX_FORM:
            return PlainTextResponse("413 Content Too Large\n", status_code=413)
        form = {k: v[0] for k, v in parse_qs(body.decode("latin-1")).items()}
        if not check_form_token(user, form.get("token")):
            return PlainTextResponse("403 Forbidden: the form is stale or not from this page; reload it\n", 403)
        case_id = request.path_params["case_id"]
        action = request.path_params["action"]
        if action not in ("retry", "resend"):
            return PlainTextResponse("404 Not Found: the actions are retry and resend\n", status_code=404)
        job = db.one("SELECT id FROM jobs WHERE case_id = ?", (case_id,))
        if job is None:
            return PlainTextResponse(f"409 Conflict: case {case_id} has no job\n", status_code=409)
        try:
            if action == "retry":
                retry_job(db, job["id"])
                if actions.wake_workers is not None:
                    actions.wake_workers()
            else:
                resend_job(db, job["id"])
                if actions.wake_sender is not None:
                    actions.wake_sender()
        except JobError as exc:
            return PlainTextResponse(f"409 Conflict: {exc}\n", status_code=409)
        from dicom_node.logs import event, get_logger

        event(get_logger("dicom_node.web"), f"web_{action}", case=case_id, job=job["id"], user=user)
        done = "retried" if action == "retry" else "resent"
        return RedirectResponse(f"/cases/{case_id}?done={done}", status_code=303)

    def prometheus(request: Request) -> Response:
        return Response(exposition(state), media_type=CONTENT_TYPE)

    routes = [
        Route("/", health),
        Route("/cases", case_list),
        Route("/cases/{case_id:int}", one_case),
        Route("/cases/{case_id:int}/qa/{name:str}", qa_picture),
        Route("/cases/{case_id:int}/{action:str}", act, methods=["POST"]),
        Route("/metrics", prometheus),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [
        Middleware(_SecurityHeaders),
        Middleware(
            AuthenticationMiddleware,
            backend=NodeAuthBackend(passwords, cfg.web.client_certificates),
            on_error=challenge,
        ),
    ]
    return Starlette(routes=routes, middleware=middleware)
