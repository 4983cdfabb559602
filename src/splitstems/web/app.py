"""The ASGI app: the page, its static files and the JSON API over a :class:`JobManager`.

Routes (every ``/api`` answer is JSON; errors are ``{"error": "<file>: <problem>"}``):

- ``GET /`` the page; ``/static/...`` its CSS, JS and icon (shipped in the package).
- ``GET /api/config`` upload limit, models, codecs, defaults.
- ``POST /api/jobs?name=&model=&mwf=&fast=`` the song as the request body; 201 and the job.
- ``GET /api/jobs``, ``GET /api/jobs/{id}``, ``GET /api/jobs/{id}/events`` (SSE), and
  ``DELETE /api/jobs/{id}`` (cancel and delete).
- ``GET /api/jobs/{id}/stems/{stem}?codec=wav``, ``/zip``, ``/mix?codec=&<stem>=<gain>``.

Nothing is ever served from a path a request names: stems are looked up by job id and
instrument name, static files by Starlette's ``StaticFiles`` inside the package folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import json
import logging
import math
import os
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from splitstems import audio, hub
from splitstems.config import RELEASED_MODELS
from splitstems.errors import AudioError, ModelError, SplitstemsError
from splitstems.web.jobs import FINAL_STATES, Job, JobGone, JobManager, JobOptions, QueueFull

__all__ = ["DEFAULT_MAX_UPLOAD", "Settings", "create_app", "format_size", "is_loopback"]

log = logging.getLogger("splitstems.web")
STATIC = Path(__file__).resolve().parent / "static"
#: Default ``--max-upload``: 512 MiB (a 45-minute 16-bit 44.1 kHz WAV).
DEFAULT_MAX_UPLOAD = 512 * 1024 * 1024
#: Codecs a stem or mix can be downloaded in (WAV is what the server keeps).
DOWNLOAD_CODECS = ("wav", "flac", "mp3", "ogg", "m4a")
MAX_GAIN = 4.0
_NAME_CHARS = 200
_COOKIE = "splitstems_token"
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
        b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Settings:
    """How the server runs (``splitstems serve``'s options)."""

    max_upload: int = DEFAULT_MAX_UPLOAD
    default_model: str = "spleeter:2stems"
    token: str | None = None
    loopback: bool = True
    workers: int = 1
    queue_size: int = 16
    keep_seconds: float = 3600.0
    separator_kwargs: dict[str, object] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def format_size(n_bytes: float) -> str:
    """``1.5 MB``-style size (powers of 1024, as ``--max-upload`` reads them)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _host_name(header: str) -> str:
    """Return the name in a ``Host`` header without its port: ``[::1]:8000`` -> ``[::1]``."""
    if header.startswith("["):  # an IPv6 address: the port, if any, follows the "]"
        end = header.find("]")
        return header[: end + 1] if end > 0 else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


_TOKEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>splitstems: token needed</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body>
<h1>This splitstems server needs its token</h1>
<p>{message}</p></body></html>
"""


def _display_name(raw: str | None) -> str:
    """Return the upload's name as the page shows it: no folders, no control characters."""
    name = (raw or "").rsplit("/", 1)[-1]  # "\\" is part of a name on Linux and macOS
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:_NAME_CHARS] or "upload"


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


def _download_name(job: Job, suffix: str) -> str:
    stem = job.name.rsplit(".", 1)[0] if "." in job.name else job.name
    return f"{stem}-{suffix}"


class _Guard:
    """ASGI middleware: Host and Origin checks, the token, security headers."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        problem = self._refuse(request)
        set_cookie = (
            problem is None
            and self.settings.token is not None
            and request.query_params.get("token")
        )

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(_SECURITY_HEADERS)
                if set_cookie:
                    cookie = f"{_COOKIE}={self.settings.token}; Path=/; HttpOnly; SameSite=Strict"
                    headers.append((b"set-cookie", cookie.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        if problem is not None:
            status, text = problem
            refusal: Response
            if status == 401 and request.method in ("GET", "HEAD") and scope["path"] == "/":
                # a person in a browser: a page, not JSON
                page = _TOKEN_PAGE.format(message=html.escape(text[:1].upper() + text[1:]))
                refusal = HTMLResponse(page, status_code=401)
            else:
                refusal = _error(status, text)
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refuse(self, request: Request) -> tuple[int, str] | None:
        host = _host_name(request.headers.get("host") or "")
        if self.settings.loopback and not is_loopback(host):
            # a page of another site that resolves its name to 127.0.0.1 (DNS rebinding)
            return 400, f"host {host!r} is not this server's (it listens on loopback only)"
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin is not None:
            if urlsplit(origin).netloc != request.headers.get("host"):
                return 403, "requests from other sites are refused"
        token = self.settings.token
        if token is None:
            return None
        given = (
            request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            or request.cookies.get(_COOKIE)
            or request.query_params.get("token")
            or ""
        )
        if not secrets.compare_digest(given.encode(), token.encode()):
            return 401, (
                "this server needs its token: open the address that splitstems serve "
                "printed (…/?token=…), or send Authorization: Bearer <token>"
            )
        return None


def create_app(settings: Settings | None = None, manager: JobManager | None = None) -> Any:
    """Return the ASGI app (Starlette behind :class:`_Guard`); jobs start with its lifespan."""
    settings = settings or Settings()
    manager = manager or JobManager(
        workers=settings.workers,
        queue_size=settings.queue_size,
        keep_seconds=settings.keep_seconds,
        separator_kwargs=settings.separator_kwargs,
    )
    model_dir = settings.separator_kwargs.get("model_dir")

    released = [f"spleeter:{name}" for name in RELEASED_MODELS]
    known = set(released) | {settings.default_model}

    def warm_up() -> None:  # load the default model now, not when the first song comes
        try:
            manager.separator(JobOptions(model=settings.default_model))
        except ModelError:
            pass  # logged by separator(), with the operator's hint
        except SplitstemsError as exc:
            log.warning("%s", exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        manager.start()
        threading.Thread(target=warm_up, name="splitstems-web-warm-up", daemon=True).start()
        try:
            yield
        finally:
            await run_in_threadpool(manager.stop)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    async def config(request: Request) -> Response:
        models = await run_in_threadpool(hub.list_models, model_dir=model_dir)  # type: ignore[arg-type]
        return JSONResponse(
            {
                "max_upload": settings.max_upload,
                "max_upload_text": format_size(settings.max_upload),
                "models": [
                    {"name": m.name, "local": m.available, "failed": m.name in manager.unavailable}
                    for m in models
                ]
                + [
                    {"name": name, "local": True, "failed": name in manager.unavailable}
                    for name in sorted(known - set(released))
                ],
                "default_model": settings.default_model,
                "codecs": list(DOWNLOAD_CODECS),
                "queue_size": manager.queue_size,
                "keep_seconds": manager.keep_seconds,
            }
        )

    async def list_jobs(request: Request) -> Response:
        return JSONResponse({"jobs": [job.to_json() for job in manager.jobs()]})

    async def create_job(request: Request) -> Response:
        name = _display_name(request.query_params.get("name"))
        model = request.query_params.get("model") or settings.default_model
        if model not in known:
            return _error(
                400, f"{name}: unknown model {model!r} (one of {', '.join(sorted(known))})"
            )
        options = JobOptions(
            model=model,
            mwf=_flag(request.query_params.get("mwf")),
            fast=_flag(request.query_params.get("fast")),
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload:
            return _too_big(name, int(length))
        try:
            job = manager.new_job(name, options)
        except QueueFull as exc:
            return _error(503, f"{name}: {exc}")
        try:
            size = await _store(request, job.input_path, settings.max_upload)
        except _TooBig:
            manager.discard(job)
            return _too_big(name, None)
        except BaseException:
            manager.discard(job)
            raise
        if size == 0:
            manager.discard(job)
            return _error(400, f"{name}: empty file")
        try:  # checked by decoding it, whatever its name or type say
            duration = await run_in_threadpool(_check_audio, job.input_path)
        except SplitstemsError as exc:
            manager.discard(job)
            return _error(415, str(exc).replace(str(job.input_path), name))
        manager.submit(job, duration=duration)
        return JSONResponse(job.to_json(), status_code=201)

    def _too_big(name: str, size: int | None) -> Response:
        what = f"{format_size(size)} is" if size is not None else "it is"
        return _error(
            413,
            f"{name}: {what} over this server's upload limit of "
            f"{format_size(settings.max_upload)} (splitstems serve --max-upload)",
        )

    def _job(request: Request) -> Job | None:
        return manager.get(request.path_params["job_id"])

    async def get_job(request: Request) -> Response:
        job = _job(request)
        if job is None:
            return _error(404, "no such job")
        return JSONResponse(job.to_json())

    async def delete_job(request: Request) -> Response:
        if not await run_in_threadpool(manager.delete, request.path_params["job_id"]):
            return _error(404, "no such job")
        return Response(status_code=204)

    async def events(request: Request) -> Response:
        job = _job(request)
        if job is None:
            return _error(404, "no such job")

        async def stream() -> AsyncIterator[str]:
            sent = -1
            while True:
                version = job.version
                if version != sent:
                    sent = version
                    yield f"data: {json.dumps(job.to_json())}\n\n"
                if job.state in FINAL_STATES or manager.get(job.id) is None:
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    def _finished(request: Request) -> Job | Response:
        job = _job(request)
        if job is None:
            return _error(404, "no such job")
        if job.state != "done":
            return _error(409, f"{job.name}: not separated yet ({job.state})")
        return job

    def _codec(request: Request) -> str | None:
        codec = request.query_params.get("codec", "wav").lower()
        return codec if codec in DOWNLOAD_CODECS else None

    async def stem(request: Request) -> Response:
        job = _finished(request)
        if isinstance(job, Response):
            return job
        name = request.path_params["stem"]
        codec = _codec(request)
        if name not in job.instruments:
            return _error(404, f"{job.name}: no stem {name!r}")
        if codec is None:
            return _error(400, f"codec must be one of {', '.join(DOWNLOAD_CODECS)}")
        return await _send_file(job, f"{name}.{codec}", lambda: manager.stem_file(job, name, codec))

    async def zip_all(request: Request) -> Response:
        job = _finished(request)
        if isinstance(job, Response):
            return job
        return await _send_file(
            job, "stems.zip", lambda: manager.zip_file(job), media_type="application/zip"
        )

    async def mix(request: Request) -> Response:
        job = _finished(request)
        if isinstance(job, Response):
            return job
        codec = _codec(request)
        if codec is None:
            return _error(400, f"codec must be one of {', '.join(DOWNLOAD_CODECS)}")
        gains: dict[str, float] = {}
        query = parse_qs(request.url.query)
        for name in job.instruments:
            raw = query.get(name, ["1"])[-1]
            try:
                gain = float(raw)
            except ValueError:
                gain = -1.0
            if not (math.isfinite(gain) and 0.0 <= gain <= MAX_GAIN):
                return _error(400, f"gain of {name} must be a number from 0 to {MAX_GAIN:g}")
            gains[name] = gain
        label = (
            "+".join(f"{n}" if g == 1 else f"{n}{g:g}" for n, g in gains.items() if g > 0)
            or "silence"
        )
        return await _send_file(
            job, f"mix-{label}.{codec}", lambda: manager.mix_file(job, gains, codec), temp=True
        )

    async def _send_file(
        job: Job,
        suffix: str,
        make: Callable[[], Path],
        *,
        media_type: str | None = None,
        temp: bool = False,
    ) -> Response:
        """Make a job's file in a worker thread and send it; errors as JSON, without paths.

        The song may be removed (Cancel, expiry, server stop) while its file is made:
        that is a 404 like any request for a removed song.
        """

        def made() -> tuple[Path, os.stat_result]:
            path = make()
            return path, os.stat(path)

        try:
            path, stat = await run_in_threadpool(made)
        except (SplitstemsError, OSError) as exc:
            if isinstance(exc, JobGone) or manager.get(job.id) is None:
                return _error(404, f"{job.name}: removed from this server while it was prepared")
            log.exception("job %s (%s): cannot make %s", job.id, job.name, suffix)
            return _error(500, f"{job.name}: cannot make {suffix} (the server's log says why)")
        return FileResponse(
            path,
            media_type=media_type,
            filename=_download_name(job, suffix),
            stat_result=stat,
            background=BackgroundTask(os.unlink, path) if temp else None,
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, "not found")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail.lower(), headers=exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # uvicorn logs the traceback; the answer names no file and no path
        return _error(500, "internal error (the server's log says more)")

    routes = [
        Route("/", page),
        Route("/api/config", config),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/api/jobs/{job_id}/events", events),
        Route("/api/jobs/{job_id}/stems/{stem}", stem),
        Route("/api/jobs/{job_id}/zip", zip_all),
        Route("/api/jobs/{job_id}/mix", mix),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            404: not_found,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
    app.state.manager = manager
    return _Guard(app, settings)


class _TooBig(Exception):
    """The body went past the upload limit."""


async def _store(request: Request, path: Path, limit: int) -> int:
    """Stream the request body into ``path``; return its size (raise past ``limit``)."""
    size = 0
    with open(path, "wb") as fh:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooBig
            await run_in_threadpool(fh.write, chunk)
    return size


def _check_audio(path: Path) -> float | None:
    """Probe the upload and decode its first second; return its duration if known.

    Raises:
        AudioError: not audio, no audio stream, or nothing decodable; the message
            starts with ``path``.
    """
    info = audio.probe(path)
    first = next(iter(audio.stream(path, chunk_samples=44100, duration=1.0)), None)
    if first is None or first.shape[0] == 0:
        raise AudioError(f"{path}: no audio could be decoded")
    return info.duration
