"""``cnnkit serve``: models of any task over HTTP (the options; the server is cnnkit.serve)."""

from __future__ import annotations

from pathlib import Path

import click

from cnnkit.cli.export import CONTEXT
from cnnkit.errors import CnnkitError


@click.command("serve", context_settings=CONTEXT)
@click.option("--weights", "weights", multiple=True, required=True, metavar="[NAME=]PATH",
              help="a run folder, best.safetensors or an exported .onnx, of any task; several models: "
                   "--weights A B or --weights A --weights B (named after their run folder, or NAME=)")
@click.option("--host", default="127.0.0.1", help="address to bind (0.0.0.0 listens on every interface)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="port to bind")
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch",
              help="run on PyTorch, or export to ONNX and run on ONNX Runtime")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
@click.option("--workers", type=click.IntRange(1, 64), default=1,
              help="server processes sharing the port, each with its own copy of the models")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16,
              help="most images per model call; concurrent requests share calls")
@click.option("--max-wait-ms", type=click.FloatRange(0, 1000), default=5.0,
              help="how long a request may wait for others already arriving to share its call "
                   "(a request alone starts at once)")
@click.option("--max-queue", type=click.IntRange(1), default=256,
              help="images waiting per model before requests are refused with 429")
@click.option("--max-queue-ms", type=click.FloatRange(1), default=None,
              help="also refuse (429) requests whose expected wait in the queue is longer than this")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1), default=30.0,
              help="seconds a request may wait for its result (then 504, and it is dropped)")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=20.0, help="request body limit (413 beyond)")
@click.option("--max-pixels", type=click.IntRange(1), default=40_000_000,
              help="largest image accepted, in pixels, checked before decoding (413 beyond)")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="require 'Authorization: Bearer <the file's text>' on every route but the page, /healthz and /readyz")
@click.option("--cors-origin", "cors", multiple=True, help="allow browser requests from this origin (repeat); "
              "none by default")
@click.option("--conf", type=click.FloatRange(0, 1), default=None,
              help="default score threshold of detectors (a request's ?conf= overrides it)")
@click.option("--reference", "references", multiple=True, metavar="[NAME=]SOURCE",
              help="watch a model's inputs for drift against SOURCE: a folder of images like those it should see "
                   "(its validation images), or a reference .json; see GET /v1/models/NAME/drift. "
                   "Without it, the reference training wrote (weights/drift.json) is used")
@click.option("--drift-window", type=click.IntRange(100), default=200,
              help="recent images the drift score covers (a score needs 100)")
@click.option("--drift-threshold", type=click.FloatRange(0, min_open=True), default=0.25,
              help="drift score (largest PSI over the features) above which a model is reported as drifted")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info")
@click.argument("more_weights", nargs=-1, metavar="[MORE_WEIGHTS]...")
def serve_cmd(weights, host, port, backend, device, workers, max_batch, max_wait_ms, max_queue, max_queue_ms,
              timeout_s, max_body_mb, max_pixels, token_file, cors, conf, references, drift_window, drift_threshold,
              log_level, more_weights) -> None:
    """Serve trained models over HTTP, each with its own preprocessing, classes and thresholds.

    \b
    cnnkit serve --weights runs/classify/digits
    curl -s --data-binary @digit.png http://127.0.0.1:8000/v1/models/digits/predict
    \b
    Routes: POST /v1/models/NAME/predict (raw image body, multipart files, or JSON
    {"images": [base64, ...]}; query options such as ?conf=0.3), GET /v1/models, GET /metrics
    (Prometheus), GET /healthz, GET /readyz, and a web page at /. Answers are the JSON of
    `cnnkit TASK predict --json`.
    """
    token = None
    if token_file:
        p = Path(token_file)
        if not p.is_file():
            raise CnnkitError(f"token file '{p}' does not exist")
        token = p.read_text().strip()
        if len(token) < 16:
            raise CnnkitError(f"the token in '{p}' is shorter than 16 characters; use a long random one "
                              "(for example: python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    from cnnkit.serve import build_references, load_models, serve
    from cnnkit.serve.app import ServeSettings

    models = load_models([*weights, *more_weights], backend, device)  # --weights A B as --weights A --weights B
    settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_queue_ms=max_queue_ms, timeout_s=timeout_s,
                             max_body_mb=max_body_mb, max_pixels=max_pixels, token=token, cors_origins=tuple(cors),
                             options={"conf": conf} if conf is not None else {},
                             references=build_references(models, list(references)), drift_window=drift_window,
                             drift_threshold=drift_threshold)
    click.echo(f"serving {', '.join(f'{n} ({p.task}, {p.backend.name})' for n, p in models.items())} "
               f"on http://{host}:{port}", err=True)
    serve(models, host, port, settings, log_level, workers, device)
