"""Who may reach the server, and how big a request may be: the API key (a bearer token, or the web page's
session cookie set by the login page), the body size cap, and the request counters around both."""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import time
import urllib.parse

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_body
from .metrics import ServerMetrics
from .settings import ServerSettings

UI_COOKIE = "lion_ui"


class BodyTooLargeError(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds this server's limit of {limit} bytes", "body_too_large")


def ui_session_token(key: str) -> str:
    """The web page's session cookie value for this API key (an HMAC: the key itself never goes in it)."""
    return hmac.new(key.encode(), b"lion-mllm web page session", hashlib.sha256).hexdigest()


def _open_path(path: str) -> bool:
    """Paths served without the API key: the health check, the root redirect and the login page. The web
    page (`/ui`) takes the key through the login page (a cookie); everything else, the API and /metrics
    included, takes it as `Authorization: Bearer KEY`."""
    return path in ("/", "/health", "/login")


def _is_ui_path(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def _cookie(headers: dict[str, str], name: str) -> str:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


async def _send_json(send: Send, status: int, body: dict, extra_headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    """Checks the API key before the body is read, and caps every request body.

    The cap applies to the declared Content-Length (refused before reading) and to the bytes actually
    received (chunked bodies), so no request can make the server buffer more than `max_body_bytes`.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not await self._key_accepted(scope, headers, send):
            return
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_json(send, 413, BodyTooLargeError(limit).body(), {"connection": "close"})
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, limited_receive, send)

    async def _key_accepted(self, scope: Scope, headers: dict[str, str], send: Send) -> bool:
        """Whether the request may go on; if not, its refusal (a redirect to the login page for a browser
        asking for the web page, else 401) has been sent."""
        key = self.settings.api_key
        path = scope.get("path", "")
        if key is None or _open_path(path):
            return True
        if _is_ui_path(path):
            if hmac.compare_digest(_cookie(headers, UI_COOKIE).encode(), ui_session_token(key).encode()):
                return True
            if scope.get("method") == "GET" and "text/html" in headers.get("accept", ""):
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", b"/login"), (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
            else:
                await _send_json(send, 401, error_body(401, "log in at /login with this server's API key",
                                                       "login_required"))
            return False
        given = headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if hmac.compare_digest(token.encode(), key.encode()):
            return True
        message = "missing API key (send 'Authorization: Bearer KEY')" if not given else "wrong API key"
        await _send_json(send, 401, error_body(401, message, "invalid_api_key"), {"www-authenticate": "Bearer"})
        return False


class MetricsMiddleware:
    """Counts `/v1/` requests by status and times them from arrival to their last byte (a stream's end)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 500
        endpoint = path if path in ("/v1/chat/completions", "/v1/tags", "/v1/models") else "other"

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.observe_request(endpoint, status, time.monotonic() - started)

        await self.app(scope, receive, timed_send)


def login_router(settings: ServerSettings) -> APIRouter:
    """`/login`: the web page's login, one field (the API key) and a session cookie on success."""
    router = APIRouter(include_in_schema=False)

    @router.get("/login")
    async def login_page() -> Response:
        if settings.api_key is None:
            return RedirectResponse("/ui/", status_code=303)
        return HTMLResponse(_login_html(""))

    @router.post("/login")
    async def login(request: Request) -> Response:
        if settings.api_key is None:
            return RedirectResponse("/ui/", status_code=303)
        raw = await request.body()
        given = urllib.parse.parse_qs(raw.decode("utf-8", "replace")).get("key", [""])[0]
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            return HTMLResponse(_login_html("That is not this server's API key."), status_code=401)
        response = RedirectResponse("/ui/", status_code=303)
        response.set_cookie(UI_COOKIE, ui_session_token(settings.api_key), max_age=12 * 3600, httponly=True,
                            samesite="strict", path="/")
        return response

    return router


def _login_html(error: str) -> str:
    notice = f'<p role="alert" style="color:#b00020">{html.escape(error)}</p>' if error else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>LION: log in</title>"
            "<meta name=viewport content='width=device-width'></head>"
            "<body style='font-family:system-ui,sans-serif;max-width:26rem;margin:4rem auto'>"
            "<h1>LION</h1><form method=post action=/login>"
            "<label for=key>This server's API key</label><br>"
            "<input id=key name=key type=password autocomplete=current-password required autofocus "
            "style='width:100%;font-size:1.1rem;margin:.5rem 0'><br>"
            f"{notice}<button type=submit style='font-size:1.1rem'>Open the page</button></form></body></html>")
