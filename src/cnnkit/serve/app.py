"""The HTTP app: every task's model behind one API, with dynamic batching and metrics.

Routes (``/v1`` is the API version):

- ``POST /v1/models/{name}/predict``: one image (for medical models a ``.nii``/``.nii.gz``
  volume) as the raw body or a multipart upload (one or more file parts), or a JSON batch
  ``{"images": ["<base64>", ...]}``; query parameters are the task's per-call predict options
  (``conf``, ``max_det``, ``topk``). The answer is the list that ``cnnkit TASK predict
  --json`` writes (semantic masks added as COCO RLE per class, label volumes as a base64
  ``.nii.gz`` in ``labels_nifti``), with the time per stage in the ``Server-Timing`` header.
- ``GET /v1/models``: the models, with their cards. ``GET /healthz``, ``GET /readyz``.
- ``GET /v1/models/{name}/drift``: the drift score of the recent requests against the
  model's reference (:mod:`cnnkit.methods.drift`), also in ``/metrics``.
- ``GET /metrics``: Prometheus text (:mod:`cnnkit.serve.metrics`).
- ``GET /``: a web page (``page.html``, plain HTML and JavaScript): pick or drop an image, see
  the result drawn (labels and scores, boxes, masks) and the time per stage.

Errors are JSON ``{"detail": "one sentence"}``: 404 unknown model, 413 body or image too
large, 422 not an image or a bad option, 429 queue full (with ``Retry-After``), 504 timed out.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cnnkit.errors import CnnkitError, ImageDecodeError
from cnnkit.serve.batcher import Batcher, Overloaded
from cnnkit.serve.guard import BodyTooLarge, Guard
from cnnkit.serve.metrics import Metrics

# the web page: its own inline script and styles, images it decodes itself, requests to this server only
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
            "connect-src 'self'; frame-ancestors 'none'")


@dataclass
class ServeSettings:
    """How the server batches and what it accepts (``cnnkit serve --help`` names each)."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting per model before 429
    max_queue_ms: float | None = None  # refuse (429) when the expected wait in the queue is longer
    timeout_s: float = 30.0  # a request waiting longer is dropped (504)
    max_body_mb: float = 20.0
    max_pixels: int = 40_000_000
    max_images: int = 64  # images per request
    max_parts: int = 64  # multipart parts per request
    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # default per-call options (--conf)
    references: dict[str, str] = field(default_factory=dict)  # model name -> reference features (drift.json)
    drift_window: int = 200
    drift_threshold: float = 0.25


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinite floats as None (JSON has no NaN; cards may hold one)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


class Answer(JSONResponse):
    """Strict JSON: NaN and infinities become null instead of invalid JSON."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:
            return json.dumps(finite(content), allow_nan=False, separators=(",", ":")).encode()


class ClientError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}


def call_options(task: str) -> dict[str, Any]:
    """The per-call predict options of ``task``: name -> :class:`~cnnkit.core.options.Opt`."""
    from cnnkit.tasks import config_class, spec

    names = spec(task).call_options
    return {o.name: o for o in config_class(task).PREDICT if o.name in names}


def parse_options(task: str, query: dict[str, str], defaults: dict[str, Any]) -> dict[str, Any]:
    known = call_options(task)  # the defaults of `cnnkit TASK predict`, then the server's, then the query
    out = {k: o.default for k, o in known.items() if o.default is not None}
    out.update({k: v for k, v in defaults.items() if k in known})
    for key, raw in query.items():
        if key not in known:
            names = ", ".join(known) or "none"
            raise ClientError(422, f"'{key}' is not an option of {task} models (options: {names})")
        opt = known[key]
        try:
            value = opt.kind(raw) if opt.kind in (int, float) else raw
        except ValueError:
            raise ClientError(422, f"option '{key}' takes a {opt.kind.__name__}, got '{raw}'") from None
        try:
            opt.check(value)
        except CnnkitError as e:
            raise ClientError(422, str(e).replace(opt.cli_flag, key)) from None
        out[key] = value
    return out


def result_row(result) -> dict[str, Any]:
    """``result.to_dict()``; a semantic mask also travels, as COCO RLE per class present, and
    a volume's labels as a base64 ``.nii.gz`` with the uploaded file's affine
    (``labels_nifti``)."""
    from cnnkit.core.results import SegMask, VolumeLabels, mask_to_rle

    row = result.to_dict()
    if isinstance(result, SegMask) and "mask" not in row:
        ids = result.mask.unique().tolist()
        row["masks"] = {result.class_names[i]: mask_to_rle(result.mask == i) for i in ids
                        if i < len(result.class_names)}
    elif isinstance(result, VolumeLabels):
        from cnnkit.data.volumes import nifti_bytes

        row["labels_nifti"] = base64.b64encode(nifti_bytes(result.labels.numpy(), result.affine)).decode()
    return row


async def read_images(request: Request, settings: ServeSettings) -> list[tuple[bytes, str]]:
    """``(encoded bytes, name)`` of every image in the request (raw body, multipart or JSON)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        from starlette.exceptions import HTTPException

        try:
            form = await request.form(max_files=settings.max_parts, max_fields=settings.max_parts)
        except HTTPException as e:
            raise ClientError(413 if "too many" in str(e.detail).lower() else 400,
                              f"the multipart body cannot be read ({e.detail})") from None
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        images = [(await f.read(), f.filename or f"<image {i}>") for i, f in enumerate(files)]
        await form.close()
    elif ctype == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ClientError(422, "the JSON body cannot be parsed") from None
        items = body.get("images") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ClientError(422, 'a JSON body must be {"images": ["<base64>", ...]}')
        names = body.get("names") or [f"<image {i}>" for i in range(len(items))]
        images = []
        for i, (s, n) in enumerate(zip(items, names)):
            try:
                images.append((base64.b64decode(s.split(",", 1)[-1], validate=True), str(n)))
            except (binascii.Error, ValueError):
                raise ClientError(422, f"image {i} of the JSON batch is not valid base64") from None
    else:
        images = [(await request.body(), "<image 0>")]
    if not images or not any(len(b) for b, _ in images):
        raise ClientError(422, "the request holds no image (send one as the body, as multipart files or as "
                               'JSON {"images": [...]})')
    if len(images) > settings.max_images:
        raise ClientError(413, f"at most {settings.max_images} images per request, got {len(images)}")
    return images


def create_app(models: dict[str, Any], settings: ServeSettings | None = None):
    """The ASGI app serving ``models`` (name -> :class:`~cnnkit.runtime.pipeline.Predictor`),
    wrapped in its :class:`~cnnkit.serve.guard.Guard` (token, body limit)."""
    s = settings or ServeSettings()
    metrics = Metrics()
    batchers: dict[str, Batcher] = {}
    from cnnkit.methods.drift import DriftMonitor, EmbeddingTap, Reference

    monitors = {name: DriftMonitor(Reference.load(path), s.drift_window, s.drift_threshold)
                for name, path in s.references.items() if name in models}

    @asynccontextmanager
    async def lifespan(app):
        # embeddings for the drift features, caught on the inference thread (torch or ONNX Runtime)
        taps = {name: EmbeddingTap.attach(models[name]) for name, m in monitors.items()
                if m.reference.embedding is not None}
        for name, p in models.items():
            b = Batcher(p, s.max_batch, s.max_wait_ms, s.max_queue,
                        on_batch=lambda n, name=name: metrics.batch.labels(name).observe(n), max_queue_ms=s.max_queue_ms,
                        tap=taps.get(name))
            b.start()
            batchers[name] = b
        yield
        for b in batchers.values():
            await b.stop()
        for tap in taps.values():
            if tap is not None:
                tap.close()

    app = FastAPI(title="cnnkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=Answer)
    app.state.models, app.state.metrics, app.state.batchers, app.state.settings = models, metrics, batchers, s
    if s.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(s.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], expose_headers=["server-timing"])

    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError):
        return Answer({"detail": e.detail}, e.status, headers=e.headers)

    @app.get("/")
    async def page():
        from pathlib import Path

        from fastapi.responses import HTMLResponse

        html = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer"})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ready = len(batchers) == len(models) and all(b.running for b in batchers.values())
        return Answer({"status": "ready" if ready else "starting", "models": list(models)},
                            200 if ready else 503)

    @app.get("/v1/models")
    async def list_models():
        return {"models": [{"name": n, "task": p.task, "backend": p.backend.name, "classes": p.classes,
                            "card": p.card.to_dict()} for n, p in models.items()]}

    @app.get("/v1/models/{name}/drift")
    async def drift(name: str):
        if name not in models:
            raise ClientError(404, f"no model named '{name}' is served (models: {', '.join(models)})")
        if name not in monitors:
            raise ClientError(404, f"model '{name}' has no drift reference; start the server with "
                                   f"--reference {name}=FOLDER (images like those it should see)")
        return monitors[name].report()

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for name, b in batchers.items():
            metrics.queued.labels(name).set(b.waiting)
        for name, m in monitors.items():
            report = m.report()
            if report["score"] is not None:
                metrics.drift.labels(name).set(report["score"])
                for feature, value in report["features"].items():
                    metrics.drift_feature.labels(name, feature).set(value)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request):
        t0 = time.perf_counter()
        status = 500
        if name not in models:
            raise ClientError(404, f"no model named '{name}' is served (models: {', '.join(models)})")
        p = models[name]
        batcher = batchers[name]
        if not batcher.admit():  # refused before its body is read or decoded
            metrics.requests.labels(name, "429").inc()
            raise ClientError(429, f"model '{name}' is busy (its queue is full); retry shortly", {"Retry-After": "1"})
        metrics.in_flight.labels(name).inc()
        arriving = True
        try:
            options = parse_options(p.task, dict(request.query_params), s.options)
            images = await read_images(request, s)
            t1 = time.perf_counter()
            prepared = await run_in_threadpool(_prepare_all, p, images, s.max_pixels, name in monitors)
            t2 = time.perf_counter()
            batcher.release()  # from arriving to waiting: submit counts its images
            arriving = False
            try:
                results, timing, embeddings = await batcher.submit([x for x, _, _ in prepared],
                                                              [m for _, m, _ in prepared], options, s.timeout_s)
            except Overloaded:
                raise ClientError(429, f"model '{name}' is busy (its queue is full); retry shortly",
                                  {"Retry-After": "1"}) from None
            except TimeoutError:
                raise ClientError(504, f"no result within {s.timeout_s:g} s; the request was dropped") from None
            rows = [result_row(r) for r in results]
            timing = {**timing, "preprocess_ms": (t2 - t1) * 1e3, "total_ms": (time.perf_counter() - t0) * 1e3}
            metrics.observe(name, timing)
            metrics.count_classes(name, rows)
            if name in monitors:
                for i, ((_, _, feats), row) in enumerate(zip(prepared, rows)):
                    monitors[name].add(feats, row, embeddings[i] if embeddings is not None else None)
            status = 200
            header = ", ".join(f"{k[:-3]};dur={v:.2f}" for k, v in timing.items())
            return Answer(rows, headers={"Server-Timing": header})
        except ClientError as e:
            status = e.status
            raise
        except BodyTooLarge:
            status = 413
            raise
        finally:
            if arriving:
                batcher.release()
            metrics.in_flight.labels(name).dec()
            metrics.requests.labels(name, str(status)).inc()

    return Guard(app, int(s.max_body_mb * 2**20), s.token)


def _prepare_all(predictor, images: list[tuple[bytes, str]], max_pixels: int, features: bool) -> list:
    """``(input, meta, drift features or None)`` per image, decoded and prepared (in a worker thread)."""
    from cnnkit.methods.drift import image_features

    out = []
    for data, name in images:
        try:
            image, x, meta = predictor.decode_prepare(data, name, max_pixels)
            out.append((x, meta, image_features(image) if features else None))
        except ImageDecodeError as e:
            status = 413 if e.reason.startswith("too large") else 422
            raise ClientError(status, f"'{name}' cannot be read: {e.reason}") from None
    return out
