"""``cnnkit serve``: trained models of any task over HTTP (FastAPI + uvicorn).

Every weights file carries its model card, so the server preprocesses, decodes and answers
the way the model was trained and the way ``cnnkit TASK predict --json`` answers. See
:mod:`cnnkit.serve.app` for the routes, :mod:`cnnkit.serve.batcher` for dynamic batching and
:mod:`cnnkit.serve.guard` for the limits. Safe by default: it binds 127.0.0.1, bodies are
capped while they are read, images are checked against a pixel limit before decoding, CORS is
off, and no route loads a model or file a client names.

Examples:
    >>> from cnnkit.serve import load_models, serve
    >>> serve(load_models(["runs/classify/digits"]), port=8000)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError


def model_name(weights: str | Path) -> str:
    """What a model is called when ``--weights`` names no ``NAME=``: the run folder's name
    (``runs/classify/digits`` -> ``digits``; its ``weights/best.int8.onnx`` -> ``digits-int8``),
    else the file's stem."""
    p = Path(weights)
    if p.is_dir():
        return p.resolve().name
    first, *variant = p.name.split(".")[:-1] or [p.name]
    if p.parent.name == "weights" and first in ("best", "last"):
        return "-".join([p.parent.parent.resolve().name, *variant])
    return p.stem


def load_models(weights: list[str], backend: str = "torch", device: str = "cpu",
                workdir: str | Path | None = None) -> dict[str, Any]:
    """``{name: Predictor}`` for ``weights`` (each ``PATH`` or ``NAME=PATH``).

    With ``backend="onnx"``, cnnkit weights are exported to ONNX first (into ``workdir``, a
    temporary folder by default) and served by ONNX Runtime; ``.onnx`` files are used as they are.
    """
    from cnnkit.runtime.pipeline import load

    if backend not in ("torch", "onnx"):
        raise CnnkitError(f"--backend must be torch or onnx, got '{backend}'")
    models: dict[str, Any] = {}
    for spec in weights:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or model_name(path)
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise CnnkitError(f"model name '{name}' must be letters, digits, '-', '_' or '.'; name it with NAME=PATH")
        if name in models:
            raise CnnkitError(f"two models are named '{name}'; name them with NAME=PATH")
        if backend == "onnx" and Path(path).suffix != ".onnx":
            from cnnkit.methods.export import export

            folder = Path(workdir or tempfile.mkdtemp(prefix="cnnkit-serve-"))
            path = export(path, "onnx", folder / f"{name}.onnx", verbose=False)["file"]
        models[name] = load(path, device)
    return models


def build_references(models: dict[str, Any], specs: list[str], workdir: str | Path | None = None) -> dict[str, str]:
    """``{model name: reference file}`` for ``--reference [NAME=]SOURCE`` values: SOURCE is a
    folder of images like those the model should see (its validation images, say), whose
    drift features are computed now, or a reference ``.json`` saved before. Without ``NAME=``
    the reference is for the only model served. A model named by no SOURCE uses the
    ``drift.json`` its training wrote beside its weights, when there is one."""
    from cnnkit.data.decode import list_sources
    from cnnkit.methods.drift import MIN_REFERENCE, Reference

    out: dict[str, str] = {}
    for spec in specs:
        name, _, source = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if not name:
            if len(models) != 1:
                raise CnnkitError(f"--reference {spec} names no model; with several models use NAME=SOURCE")
            name = next(iter(models))
        if name not in models:
            raise CnnkitError(f"--reference names model '{name}', which is not served (models: {', '.join(models)})")
        if models[name].task == "medical":
            raise CnnkitError(f"--reference names '{name}', a medical (3-D volume) model; drift is measured "
                              "on 2-D images only")
        src = Path(source)
        if src.suffix == ".json":
            if not src.is_file():
                raise CnnkitError(f"reference file '{src}' does not exist")
            Reference.load(src)  # fails early on a damaged file
            out[name] = str(src)
            continue
        items = list_sources(src)
        if len(items) < MIN_REFERENCE:
            raise CnnkitError(f"the reference '{src}' has {len(items)} images; drift needs at least {MIN_REFERENCE}")
        workdir = Path(workdir or tempfile.mkdtemp(prefix="cnnkit-drift-"))  # only when one is computed
        path = workdir / f"{name}.drift.json"
        Reference.from_predictor(models[name], items, str(src)).save(path)
        out[name] = str(path)
    for name, model in models.items():
        beside = training_reference(model.source)
        if name not in out and beside is not None:
            out[name] = str(beside)
    return out


def training_reference(source: str | Path | None) -> Path | None:
    """The ``drift.json`` training wrote beside the weights ``source`` (a run folder or a file
    in its ``weights/``), or None."""
    from cnnkit.methods.drift import REFERENCE_FILE

    if source is None:
        return None
    p = Path(source)
    found = (p / "weights" if p.is_dir() else p.parent) / REFERENCE_FILE
    return found if found.is_file() else None


ENV = "CNNKIT_SERVE_WORKER"  # what each worker process of `--workers N` loads (JSON)
UVICORN = {"h11_max_incomplete_event_size": 64 * 1024, "timeout_graceful_shutdown": 30, "server_header": False}


def serve(models: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, settings=None,
          log_level: str = "info", workers: int = 1, device: str = "cpu") -> None:
    """Serve ``models`` until SIGINT/SIGTERM (in-flight requests finish first).

    With ``workers`` > 1, uvicorn starts that many processes, each loading the same model
    files (``Predictor.source``) and batching on its own; the port is shared.
    """
    import uvicorn

    from cnnkit.serve.app import create_app

    if workers > 1:
        import dataclasses
        import json
        import os

        os.environ[ENV] = json.dumps({"models": {n: str(p.source) for n, p in models.items()}, "device": device,
                                      "settings": dataclasses.asdict(settings) if settings else {}})
        uvicorn.run("cnnkit.serve:worker_app", factory=True, host=host, port=port, log_level=log_level,
                    workers=workers, **UVICORN)
        return
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn re-raises a caught SIGTERM/SIGINT once it has shut down, so the process
            # would end "killed by signal"; a graceful stop is a normal end of `cnnkit serve`
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    Server(uvicorn.Config(create_app(models, settings), host=host, port=port, log_level=log_level,
                          **UVICORN)).run()


def worker_app():
    """The app of one ``--workers`` process (uvicorn's factory), from :data:`ENV`."""
    import json
    import os

    from cnnkit.runtime.pipeline import load
    from cnnkit.serve.app import ServeSettings, create_app

    spec = json.loads(os.environ[ENV])
    settings = spec["settings"]
    settings["cors_origins"] = tuple(settings.get("cors_origins", ()))  # JSON made the tuple a list
    models = {name: load(path, spec["device"]) for name, path in spec["models"].items()}
    return create_app(models, ServeSettings(**settings))


__all__ = ["build_references", "load_models", "model_name", "serve", "training_reference"]
