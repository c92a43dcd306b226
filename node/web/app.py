"""The web console: server-rendered pages and a JSON API on the node's store (``petriage web``).

Pages (Jinja2 templates, a few lines of plain script for live refresh, no front-end build):

- ``/``: the worklist, in the CLI's reading order (PE suspected first, most probable first, then
  pending, then the rest), refreshed every 10 s without a reload; filters by state and date;
- ``/studies/{uid}``: the key images with the attention overlay and the summary image as the node sent
  them, the SR's finding and probability, the series chosen and why the others were not, the timeline,
  where the results went, the notifications and their answers;
- ``/queue``: jobs by state, failed ones with their reasons, destinations, disk, model, node
  heartbeats; an admin's actions retry, cancel, priority and requeue, the CLI's own functions
  (node.admin), each recorded as an event naming the user.

``/api/...`` serves the same data as the CLI's ``--json`` (OpenAPI at ``/api/openapi.json``). Every page
and API route with patient data needs a login (node/web/security.py says how sessions, CSRF and login
throttling work); a viewer sees, an admin also acts.
"""


import datetime as dt
import json
import logging
import re
import shutil
from ipaddress import ip_address
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BeforeValidator
from starlette.middleware.sessions import SessionMiddleware

from node import admin
from node.admin import AdminError
from node.config import Config
from node.store import JobState, Store, utcnow
from node.web import users
from node.web.errors import WebError
from node.web.headers import HeaderCache
from node.web.results import list_outbox, render_png, sr_finding
from node.web.security import LoginThrottle, new_token, same_token, session_secret

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
NOTICE = "AI triage aid - not for diagnostic use"
STATES = [str(s) for s in JobState]


def _iso_day(value: object) -> object:
    """Only YYYY-MM-DD (pydantic alone would also take a number of seconds since 1970)."""
    if value is None or isinstance(value, dt.date):
        return value
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("a date as YYYY-MM-DD")
    return value


DateText = Annotated[dt.date | None, BeforeValidator(_iso_day), Query(description="YYYY-MM-DD")]
States = Annotated[list[JobState] | None, Query(description="only jobs in these states")]


class LoginRequiredError(Exception):
    """Raised by the user dependency: pages redirect to the login, the API answers 401."""


def create_app(config: Config, store: Store) -> FastAPI:
    app = FastAPI(title="petriage console", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json",
                  description=f"The node's worklist, studies, queue and health ({NOTICE}).")
    web = config.web
    app.state.headers = HeaderCache(store)
    app.state.throttle = LoginThrottle(web.login_attempts)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(notice=NOTICE, node_name=config.node.name or config.node.ae_title)
    app.add_middleware(SessionMiddleware, secret_key=session_secret(store), session_cookie="petriage_session",
                       max_age=int(web.session_hours * 3600), same_site="strict", https_only=web.tls is not None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                    "script-src 'self'; frame-ancestors 'none'; form-action 'self'")
        if request.url.path != "/login" and not request.url.path.startswith("/static"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(LoginRequiredError)
    async def to_login(request: Request, exc: LoginRequiredError):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "log in first"}, status_code=401)
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.exception_handler(AdminError)
    @app.exception_handler(WebError)
    async def refused(request: Request, exc: Exception):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=409)
        return templates.TemplateResponse(request, "message.html", {"title": "Not done", "message": str(exc),
                                                                    "user": _user_or_none(request)},
                                          status_code=409)

    def _client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def _proxy_user(request: Request) -> users.User | None:
        proxy = web.trusted_proxy
        if proxy is None or request.client is None:
            return None
        name = request.headers.get(proxy.header)
        try:
            addr = ip_address(request.client.host)
        except ValueError:
            return None
        if not name or not any(addr in net for net in proxy.addresses):
            return None
        return users.get(store, name)

    def _user_or_none(request: Request) -> users.User | None:
        user = _proxy_user(request)
        if user is not None:
            request.session.setdefault("csrf", new_token())
            return user
        name = request.session.get("user")
        if not name:
            return None
        user = users.get(store, name)
        changed = users.password_changed_at(store, name)
        if user is None or changed is None or changed.timestamp() > float(request.session.get("since", 0)) + 1:
            request.session.clear()  # removed, or the password changed since this login
            return None
        return user

    def current_user(request: Request) -> users.User:
        user = _user_or_none(request)
        if user is None:
            raise LoginRequiredError()
        return user

    async def check_csrf(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is not None and origin.rstrip("/") != f"{request.url.scheme}://{request.url.netloc}":
            raise HTTPException(403, "cross-site request refused")
        given: str | None = request.headers.get("x-csrf-token")
        if given is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            field = (await request.form()).get("csrf")
            given = field if isinstance(field, str) else None
        if not same_token(request.session.get("csrf"), given):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")

    def admin_user(request: Request, user: Annotated[users.User, Depends(current_user)],
                   _: Annotated[None, Depends(check_csrf)]) -> users.User:
        if not user.can_act:
            store.record_event(None, "web-refused",
                               f"{user.name} ({user.role}) tried {request.method} {request.url.path}")
            raise HTTPException(403, f"{user.name} is a viewer: only an admin may change the queue")
        return user

    User = Annotated[users.User, Depends(current_user)]  # noqa: N806 - a type alias
    Admin = Annotated[users.User, Depends(admin_user)]  # noqa: N806 - a type alias

    def page(request: Request, name: str, context: dict, status: int = 200) -> HTMLResponse:
        request.session.setdefault("csrf", new_token())
        return templates.TemplateResponse(request, name, {"csrf": request.session["csrf"], **context},
                                          status_code=status)

    # ---- login ---------------------------------------------------------------------------------------
    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:  # noqa: A002 - the query's name
        return page(request, "login.html", {"next": _local(next), "user": None, "error": None})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request, name: Annotated[str, Form()], password: Annotated[str, Form()],
                    _: Annotated[None, Depends(check_csrf)], next: Annotated[str, Form()] = "/"):  # noqa: A002
        keys = (f"ip:{_client(request)}", f"user:{name.lower()}")
        wait = app.state.throttle.retry_after(*keys)
        if wait:
            store.record_event(None, "web-login-throttled", f"{name!r} from {_client(request)}")
            response = page(request, "login.html", {"next": _local(next), "user": None,
                                                    "error": f"Too many failed logins: try again in {wait} s."},
                            status=429)
            response.headers["Retry-After"] = str(wait)
            return response
        user = users.verify(store, name, password)
        if user is None:
            app.state.throttle.failed(*keys)
            store.record_event(None, "web-login-failed", f"{name!r} from {_client(request)}")
            return page(request, "login.html", {"next": _local(next), "user": None,
                                                "error": "Wrong user name or password."}, status=401)
        app.state.throttle.succeeded(*keys)
        request.session.clear()
        request.session.update(user=user.name, since=utcnow().timestamp(), csrf=new_token())
        store.record_event(None, "web-login", f"{user.name} ({user.role}) from {_client(request)}")
        return RedirectResponse(_local(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, user: User, _: Annotated[None, Depends(check_csrf)]):
        store.record_event(None, "web-logout", user.name)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ---- data ------------------------------------------------------------------------------------------
    def worklist_rows(state: list[JobState] | None, since: dt.date | None, until: dt.date | None,
                      limit: int) -> list[dict]:
        rows = admin.worklist(store, limit=limit)
        if state:
            wanted = {str(s) for s in state}
            rows = [r for r in rows if r["state"] in wanted]
        if since or until:
            rows = [r for r in rows if (since is None or r["created_at"].date() >= since)
                    and (until is None or r["created_at"].date() <= until)]
        headers = app.state.headers.get_many([r["study_instance_uid"] for r in rows])
        for r in rows:
            r["header"] = headers[r["study_instance_uid"]].as_dict()
            r["triage"] = admin.triage_label(r)
        return rows

    def study_data(uid: str) -> dict:
        found_uid, found = admin.find(store, uid)
        latest = found[-1] if found else None
        parsed = _json_field(latest.get("result")) if latest else None
        result: dict | None = parsed if isinstance(parsed, dict) else None
        outbox = latest.get("outbox") if latest else None
        return {"study_instance_uid": found_uid, "study": store.study(found_uid), "jobs": found, "result": result,
                "header": app.state.headers.get_many([found_uid])[found_uid].as_dict(),
                "objects": [o.__dict__ for o in list_outbox(outbox)],
                "sr": sr_finding(outbox, (result or {}).get("sr", {}).get("sop_instance_uid") if result else None),
                "delivered": _json_field(latest.get("delivered")) if latest else [],
                "notifications": [{k: v for k, v in n.items() if k != "payload"}
                                  for n in store.notifications_of(found_uid)],
                "events": admin.timeline(store, found_uid)}

    def health() -> dict:
        beats = store.node_heartbeats()
        root = Path(config.storage.root)
        where = root if root.exists() else root.parent
        disk = shutil.disk_usage(where)
        return {"jobs": store.queue_summary(utcnow())["jobs"], "nodes": beats,
                "disk": {"free_bytes": disk.free, "total_bytes": disk.total,
                         "floor_bytes": config.storage.min_free_mb * 2**20},
                "model": str(config.model.bundle),
                "destinations": [{"name": d.name, "ae_title": d.ae_title, "host": d.host, "port": d.port}
                                 for d in config.destinations]}

    # ---- pages -----------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def worklist_page(request: Request, user: User, state: States = None,
                      since: DateText = None, until: DateText = None) -> HTMLResponse:
        rows = worklist_rows(state, since, until, 1000)
        return page(request, "worklist.html", {"user": user, "rows": rows, "states": STATES, "state": state or [],
                                               "since": since, "until": until})

    @app.get("/worklist/rows", response_class=HTMLResponse, include_in_schema=False)
    def worklist_fragment(request: Request, user: User, state: States = None,
                          since: DateText = None, until: DateText = None) -> HTMLResponse:
        rows = worklist_rows(state, since, until, 1000)
        return page(request, "worklist_rows.html", {"user": user, "rows": rows})

    @app.get("/studies/{uid}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(request: Request, uid: str, user: User) -> HTMLResponse:
        return page(request, "study.html", {"user": user, **study_data(uid)})

    @app.get("/studies/{uid}/images/{sop}.png", include_in_schema=False)
    def study_image(uid: str, sop: str, user: User) -> Response:
        _, found = admin.find(store, uid)
        outbox = found[-1].get("outbox") if found else None
        return Response(render_png(outbox, sop), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/queue", response_class=HTMLResponse, include_in_schema=False)
    def queue_page(request: Request, user: User, state: str | None = None) -> HTMLResponse:
        jobs = admin.list_jobs(store, [state] if state in STATES else None, 500)
        audit = admin.audit_trail(store, 50) if user.can_act else []
        return page(request, "queue.html", {"user": user, "jobs": jobs, "health": health(), "states": STATES,
                                            "state": state, "audit": audit})

    def _back(request: Request, fallback: str = "/queue") -> RedirectResponse:
        referer = request.headers.get("referer", "")
        target = _local(referer.split(request.url.netloc, 1)[-1]) if request.url.netloc in referer else fallback
        return RedirectResponse(target, status_code=303)

    @app.post("/jobs/{job_id}/retry", include_in_schema=False)
    def retry_job(request: Request, job_id: int, user: Admin):
        admin.retry(store, job_id, force=True, by=f"web:{user.name}")
        return _back(request)

    @app.post("/jobs/{job_id}/cancel", include_in_schema=False)
    def cancel_job(request: Request, job_id: int, user: Admin):
        admin.cancel(store, job_id, by=f"web:{user.name}")
        return _back(request)

    @app.post("/jobs/{job_id}/priority", include_in_schema=False)
    def priority_job(request: Request, job_id: int, user: Admin, priority: Annotated[int, Form()]):
        admin.set_priority(store, job_id, priority, by=f"web:{user.name}")
        return _back(request)

    @app.post("/queue/requeue", include_in_schema=False)
    def requeue(request: Request, user: Admin, which: Annotated[str, Form()]):
        if which not in ("failed", "sending"):
            raise WebError("requeue which jobs: failed or sending")
        admin.requeue(store, JobState.FAILED if which == "failed" else JobState.SENDING, by=f"web:{user.name}")
        return _back(request)

    # ---- API -------------------------------------------------------------------------------------------
    errors: dict[int | str, dict[str, Any]] = {
        401: {"description": "not logged in"}, 403: {"description": "a viewer, or no CSRF token"},
        404: {"description": "no such job or study"}, 409: {"description": "not possible in its state"},
        422: {"description": "malformed request"}}

    def known_job(job_id: int) -> None:
        try:
            admin.get_job(store, job_id)
        except AdminError as exc:
            raise HTTPException(404, str(exc)) from exc

    @app.get("/api/worklist", tags=["worklist"], responses=errors)
    def api_worklist(user: User, state: States = None, since: DateText = None, until: DateText = None,
                     limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> list[dict]:
        """Studies in reading order, as `petriage worklist --json`, with their header fields."""
        return jsonable_encoder(worklist_rows(state, since, until, limit))

    @app.get("/api/jobs", tags=["queue"], responses=errors)
    def api_jobs(user: User, state: States = None, limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> list[dict]:
        """Jobs, most urgent first, as `petriage queue list --json`."""
        return jsonable_encoder(admin.list_jobs(store, [str(s) for s in state] if state else None, limit))

    @app.get("/api/studies/{uid}", tags=["worklist"], responses=errors)
    def api_study(uid: str, user: User) -> dict:
        """A study: its jobs, result, SR finding, result objects, deliveries, notifications and timeline."""
        try:
            data = study_data(uid)
        except AdminError as exc:  # no such job or study
            raise HTTPException(404, str(exc)) from exc
        return jsonable_encoder(data)

    @app.get("/api/status", tags=["health"], responses=errors)
    def api_status(user: User) -> dict:
        """Jobs by state, node heartbeats, disk, model and destinations."""
        return jsonable_encoder(health())

    @app.post("/api/jobs/{job_id}/retry", tags=["queue"], responses=errors)
    def api_retry(job_id: int, user: Admin) -> dict:
        """Run a job again (admin; needs the X-CSRF-Token header of the session)."""
        known_job(job_id)
        return jsonable_encoder(admin.retry(store, job_id, force=True, by=f"web:{user.name}"))

    @app.post("/api/jobs/{job_id}/cancel", tags=["queue"], responses=errors)
    def api_cancel(job_id: int, user: Admin) -> dict:
        """Cancel a queued, running or sending job (admin)."""
        known_job(job_id)
        return jsonable_encoder(admin.cancel(store, job_id, by=f"web:{user.name}"))

    return app


def _local(target: str) -> str:
    """Only paths of this console as redirect targets (no open redirect)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _json_field(text) -> object:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
