"""The ASGI application: routes, request checks, batching, Prometheus metrics. Transport only: every label comes
from the runtime's one Classifier and every record is its `Result.to_dict()`.

    POST /v1/classify   JSON or multipart -> {"results": [record, ...], "bundle": {"model": ..., "packs": [...]}}
    GET  /health  /info  /metrics  /openapi.json  /   (the playground page)
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Sequence

import onnxruntime
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..classifier import Classifier, Item
from ..result import Result
from ..errors import InputError, InputSizeError
from ..images import ImageBytes, check_image, load_image
from .batcher import Batcher, QueueFull, ShuttingDown
from .openapi import openapi_document
from .payload import (DISCONNECTED, INTERNAL, MEDIA_TYPE, NOT_FOUND, OVERLOADED, TOO_LARGE, UNAVAILABLE, VALIDATION,
                      ApiError, ClassifyRequest, Limits, parse_form, parse_json)

log = logging.getLogger("savpack_runtime.serve")

ROUTES = ("/", "/health", "/info", "/metrics", "/openapi.json", "/v1/classify")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PENDING_PIXEL_IMAGES = 16  # decoded images waiting in memory: at most this many max-size images' pixels


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32  # items per classifier call
    max_wait_ms: float = 5.0  # how long a batch waits to fill
    max_queue: int = 256  # items admitted and not yet answered; beyond: 429
    limits: Limits = field(default_factory=Limits)


def create_app(classifier: Classifier, options: ServeOptions = ServeOptions()) -> Starlette:
    """The service around a loaded Classifier. Its batcher starts and stops with the app's lifespan."""
    service = _Service(classifier, options)
    routes = [
        Route("/", service.playground, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/info", service.info, methods=["GET"]),
        Route("/metrics", service.metrics, methods=["GET"]),
        Route("/openapi.json", service.openapi, methods=["GET"]),
        Route("/v1/classify", service.classify, methods=["POST"]),
    ]
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=service.lifespan)
    app.state.service = service
    return _Metered(app, service)


class _Service:
    def __init__(self, classifier: Classifier, options: ServeOptions):
        self.classifier, self.options, self.limits = classifier, options, options.limits
        self.pack_names = classifier.pack_names
        self.in_progress = 0  # POST /v1/classify requests being read, queued or run
        self.registry = CollectorRegistry()
        self.requests = Counter("savpack_http_requests", "HTTP requests by route, method and status",
                                ["path", "method", "status"], registry=self.registry)
        self.latency = Histogram("savpack_http_request_duration_seconds", "HTTP request latency by route, method and status",
                                 ["path", "method", "status"], registry=self.registry)
        self.batch_items = Histogram("savpack_batch_items", "Items per classifier call (one batch)",
                                     buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("savpack_batch_duration_seconds", "Duration of one classifier call", registry=self.registry)
        self.items = Counter("savpack_items", "Items classified", registry=self.registry)
        self.batcher = Batcher(self._run_batch, options.max_batch, options.max_wait_ms / 1000, options.max_queue,
                               self.limits.max_image_pixels * PENDING_PIXEL_IMAGES, on_batch=self._observe_batch)
        Gauge("savpack_queue_items", "Items waiting for a batch", registry=self.registry).set_function(lambda: self.batcher.queued_items)
        Gauge("savpack_admitted_items", "Items admitted and not yet answered (limit: --max-queue)",
              registry=self.registry).set_function(lambda: self.batcher.admitted_items)
        self.openapi_body = openapi_document(self.pack_names, classifier.takes_images, self.limits)
        self.page = resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.batcher.start()
        try:
            yield
        finally:
            await self.batcher.stop()

    # -- classification ---------------------------------------------------------------------------------------------

    def _run_batch(self, requests: Sequence[tuple[Item, float | None]]) -> list[Result]:
        """(item, abstain_below) pairs -> results in order: one classifier call per threshold in the batch (one call
        when every request asks the same, as is usual)."""
        results: list[Result | None] = [None] * len(requests)
        for threshold in dict.fromkeys(threshold for _, threshold in requests):
            rows = [row for row, (_, wanted) in enumerate(requests) if wanted == threshold]
            options = {} if threshold is None else {"abstain_below": threshold}
            answered = self.classifier.classify_batch([requests[row][0] for row in rows], batch_size=self.options.max_batch, **options)
            for row, result in zip(rows, answered):
                results[row] = result
        return results

    def _observe_batch(self, items: int, seconds: float) -> None:
        self.batch_items.observe(items)
        self.batch_seconds.observe(seconds)
        self.items.inc(items)

    async def classify(self, request: Request) -> Response:
        # Requests being read count too (each admitted one holds at least one item): bodies in memory stay bounded by
        # --max-queue x --max-body-bytes however many clients connect.
        if self.in_progress >= self.options.max_queue:
            retry_after = self.batcher.retry_after()
            return _error(ApiError(OVERLOADED, f"the server is at capacity ({self.in_progress} requests in progress, "
                                               f"--max-queue {self.options.max_queue}); retry in {retry_after} s",
                                   {"Retry-After": str(retry_after)}))
        self.in_progress += 1
        try:
            return await self._classify(request)
        finally:
            self.in_progress -= 1

    async def _classify(self, request: Request) -> Response:
        try:
            parsed = await self._parse(request)
            items = [self._check_item(item, index) for index, item in enumerate(parsed.items)]
            has_images = any(item.images for item in items)
            # Image headers and pixels are read on a worker thread (PIL work must not stall the event loop).
            pixels = await run_in_threadpool(self._measure_images, parsed) if has_images else 0
            async with self.batcher.admit(len(items), pixels):
                if has_images:
                    decoded = await run_in_threadpool(self._decode_images, parsed)
                    items = [Item(item.text, tuple(pictures)) for item, pictures in zip(items, decoded)]
                results = await self.batcher.submit([(item, parsed.abstain_below) for item in items])
        except ApiError as exc:
            return _error(exc)
        except QueueFull as exc:
            return _error(ApiError(OVERLOADED, str(exc), {"Retry-After": str(exc.retry_after)}))
        except InputSizeError as exc:
            return _error(ApiError(TOO_LARGE, str(exc)))
        except InputError as exc:
            return _error(ApiError(VALIDATION, str(exc)))
        except ClientDisconnect:
            # Nobody reads this answer; it keeps a client that hung up out of the 5xx counts and the error log.
            return _error(ApiError(DISCONNECTED, "the client disconnected before its request was read"))
        except ShuttingDown as exc:
            return _error(ApiError(UNAVAILABLE, str(exc)))
        if parsed.packs is not None:
            results = [result.select(parsed.packs) for result in results]
        names = parsed.packs or self.pack_names
        return JSONResponse({"results": [result.to_dict() for result in results],
                             "bundle": {"model": self.classifier.bundle.model["id"], "packs": list(names)}})

    async def _parse(self, request: Request) -> ClassifyRequest:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in ("application/json", "multipart/form-data"):
            raise ApiError(MEDIA_TYPE, f"Content-Type {media or '(none)'!r}: send application/json or multipart/form-data")
        body = await _read_body(request, self.limits.max_body_bytes)
        if media == "application/json":
            return parse_json(body, self.limits, self.pack_names)
        replay = Request(request.scope, _replay(body))
        try:
            form = await replay.form(max_files=self.limits.max_images, max_fields=16, max_part_size=self.limits.max_body_bytes)
        except HTTPException as exc:
            raise ApiError(VALIDATION, f"multipart body: {exc.detail}") from None
        try:
            return await parse_form(form, self.limits, self.pack_names)
        finally:
            await form.close()

    def _check_item(self, item: dict[str, Any], index: int) -> Item:
        text = item["text"]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(VALIDATION, f"inputs[{index}].text: not valid Unicode ({exc.reason} at {exc.start})") from None
        return self.classifier.check_item(item, index)  # the Classifier's own rules and messages, as in the CLI

    def _measure_images(self, parsed: ClassifyRequest) -> int:
        """Image pixels the request will decode, from the headers only; a request over the budget is refused whole."""
        pixels = 0
        for item, names in zip(parsed.items, parsed.image_names):
            for data, name in zip(item["images"], names):
                width, height = check_image(ImageBytes(data, name), self.limits.max_image_pixels)
                pixels += width * height
        if pixels > self.limits.max_request_pixels:
            raise ApiError(TOO_LARGE, f"the request's images hold {pixels} pixels together, more than this server's "
                                      f"limit of {self.limits.max_request_pixels} per request")
        return pixels

    def _decode_images(self, parsed: ClassifyRequest) -> list[list[Any]]:
        return [[load_image(ImageBytes(data, name), self.limits.max_image_pixels) for data, name in zip(item["images"], names)]
                for item, names in zip(parsed.items, parsed.image_names)]

    # -- the other routes -------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        bundle = self.classifier.bundle
        graph = bundle.graph
        return JSONResponse({
            "model": bundle.model,
            "prompt": {"template": bundle.prompt["template"], "image_count": bundle.prompt["image_count"]},
            "takes_images": self.classifier.takes_images,
            "packs": [{"name": entry.name, "labels": list(entry.pack.labels), "k": entry.pack.k, "pack_name": entry.pack.name,
                       "version": entry.pack.version, "format_version": entry.pack.format_version}
                      for entry in bundle.packs],
            "versions": {"savpack_runtime": __version__, "onnxruntime": onnxruntime.__version__,
                         "bundle_format": bundle.info["format_version"], "created_by": bundle.info["created_by"]},
            "digests": {"graph": graph["sha256"], "graph_data": graph["data_sha256"],
                        "packs": {entry["name"]: entry["sha256"] for entry in bundle.info["packs"]},
                        "preprocessing": bundle.info["preprocessing"]["files"]},
            "providers": self.classifier.providers,
            "limits": {"max_batch": self.options.max_batch, "max_wait_ms": self.options.max_wait_ms,
                       "max_queue": self.options.max_queue, **asdict(self.limits),
                       "max_request_pixels": self.limits.max_request_pixels},
        })

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self.openapi_body)

    async def playground(self, request: Request) -> Response:
        return HTMLResponse(self.page)


class _Metered:
    """ASGI wrapper: counts and times every HTTP request by route (unknown paths as "other"), method and status."""

    def __init__(self, app: Starlette, service: _Service):
        self.app, self.service = app, service
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            labels = (scope["path"] if scope["path"] in ROUTES else "other", scope["method"], str(status))
            self.service.requests.labels(*labels).inc()
            self.service.latency.labels(*labels).observe(time.perf_counter() - started)


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit` bytes: never an unbounded read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(TOO_LARGE, f"request body of {declared} bytes is more than this server's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(TOO_LARGE, f"request body is more than this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "error_type": exc.error_type}, status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = NOT_FOUND if exc.status_code == 404 else (exc.status_code, "http")
    message = f"no route {request.url.path}" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse({"error": message, "error_type": kind[1]}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details",
                         "error_type": INTERNAL[1]}, status_code=500)
