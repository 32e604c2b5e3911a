"""Load test of `cnnkit serve` against a plain FastAPI app, on loopback, in one run.

    python benchmarks/serve_load.py [--duration 10] [--concurrency 1,8,32] [--models resnet18,fastdet]

Servers (each its own process, started and stopped here, one at a time):
- ``cnnkit``: `cnnkit serve` with dynamic batching (``--max-batch 16 --max-wait-ms 5``);
- ``cnnkit-nobatch``: the same with ``--max-batch 1``;
- ``cnnkit-onnx``: batching on ONNX Runtime (``--backend onnx``);
- ``plain``: the peer, what most users write: a FastAPI app whose (sync) endpoint reads the
  upload and calls the eager PyTorch model once per request (``cnnkit.load``'s predictor, so
  preprocessing and decoding are the same work), run by uvicorn with its defaults.
- ``litserve``: the same predictor in LitServe (Lightning AI) with its default settings
  (``LitServer(api).run()``; no batching unless asked), which takes JSON, so its client sends
  ``{"image": "<base64>"}``. LitServe is installed by this script into
  ``benchmarks/.peer-litserve`` (pip ``--target``) and put on that server's path only, never
  into cnnkit's environment.

The client (a separate process: asyncio + httpx, ``C`` connections each sending the next
request as soon as the last is answered) posts one 224 or 320 px JPEG for ``--duration``
seconds per concurrency and reports requests/s and p50/p99 latency. Then an overload run:
``cnnkit`` with ``--max-queue-ms 50`` (a latency budget for the queue) under 64 connections,
measuring how fast refusals (429) come, the p99 of the admitted requests against the unloaded
p99 (one connection), and the time until an ordinary request succeeds again after the load
stops.

Models are freshly initialized (latency does not depend on the weights): resnet18 at 224 px
and fastdet (width 16) at 320 px. Run it alone: the client and the server share the machine's
cores, and anything else running moves the numbers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import save

PLAIN_APP = '''
import os

import cnnkit
from fastapi import Body, FastAPI

model = cnnkit.load(os.environ["PLAIN_WEIGHTS"])
app = FastAPI()


@app.post("/predict")
def predict(body: bytes = Body(..., media_type="application/octet-stream")):
    return [r.to_dict() for r in model(body)]
'''


LITSERVE_APP = '''
import base64
import os

import litserve as ls

import cnnkit


class ImageAPI(ls.LitAPI):
    def setup(self, device):
        self.model = cnnkit.load(os.environ["PLAIN_WEIGHTS"])

    def decode_request(self, request):
        return base64.b64decode(request["image"])

    def predict(self, x):
        return [r.to_dict() for r in self.model(x)]

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    ls.LitServer(ImageAPI(), accelerator="cpu").run(port=int(os.environ["PORT"]), generate_client_file=False)
'''
LITSERVE = Path(__file__).parent / ".peer-litserve"
LITSERVE_VERSION = "0.2.19"


def install_litserve() -> None:
    if not (LITSERVE / "litserve").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(LITSERVE),
                        f"litserve=={LITSERVE_VERSION}"], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_weights(folder: Path) -> dict[str, tuple[Path, int]]:
    """resnet18 (224 px) and fastdet (320 px) cnnkit weights: ``{name: (weights, image size)}``."""
    import torch

    from cnnkit.core.card import InputSpec, ModelCard, OutputSpec
    from cnnkit.engine.checkpoint import save_weights
    from cnnkit.runtime.pipeline import pipeline_for

    cards = {
        "resnet18": (ModelCard("classify", "resnet18", [str(i) for i in range(10)],
                               InputSpec(224, 224, 3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
                               model_kwargs={"drop_rate": 0.0}), 224),
        "fastdet": (ModelCard("detect", "fastdet", [str(i) for i in range(8)], InputSpec(320, 320, 3, "letterbox"),
                              OutputSpec(("scores", "boxes"), "fastdet"), model_kwargs={"imgsz": 320, "width": 16},
                              thresholds={"iou": 0.6, "nms": "hard", "max_det": 100}), 320),
    }
    out = {}
    for name, (card, size) in cards.items():
        torch.manual_seed(0)
        w = folder / name / "weights" / "best.safetensors"
        w.parent.mkdir(parents=True)
        save_weights(w, pipeline_for(card).build().state_dict(), card.to_dict())
        out[name] = (w.parent.parent, size)
    return out


def jpeg(size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def start(kind: str, weights: Path, port: int, folder: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "cnnkit"
    if kind == "litserve":
        install_litserve()
        (folder / "lit_app.py").write_text(LITSERVE_APP)
        env = {**os.environ, "PLAIN_WEIGHTS": str(weights), "PORT": str(port), "PYTHONPATH": str(LITSERVE)}
        return subprocess.Popen([sys.executable, "lit_app.py"], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    if kind == "plain":
        (folder / "plain_app.py").write_text(PLAIN_APP)
        cmd = [sys.executable, "-m", "uvicorn", "plain_app:app", "--port", str(port), "--log-level", "warning"]
        env = {**os.environ, "PLAIN_WEIGHTS": str(weights), "PYTHONPATH": str(folder)}
        return subprocess.Popen(cmd, cwd=folder, env=env, stderr=subprocess.PIPE, text=True)
    args = {"cnnkit": (), "cnnkit-nobatch": ("--max-batch", "1"), "cnnkit-onnx": ("--backend", "onnx")}[kind]
    cmd = [str(exe), "serve", "--weights", f"m={weights}", "--port", str(port), "--log-level", "warning", *args, *extra]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code in (200, 405):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


CLIENT = r'''
import asyncio, json, sys, time, httpx
url, body, conc, duration = sys.argv[1], open(sys.argv[2], "rb").read(), int(sys.argv[3]), float(sys.argv[4])
ctype = sys.argv[5]
async def main():
    lat, codes, t_end = [], {}, time.perf_counter() + duration
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        async def loop():
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                try:
                    r = await c.post(url, content=body, headers={"content-type": ctype})
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                lat.append((code, (time.perf_counter() - t0) * 1e3))
        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(conc)))
        wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "lat": lat}))
asyncio.run(main())
'''


def load(url: str, image: Path, conc: int, duration: float, folder: Path, as_json: bool = False) -> dict:
    client = folder / "client.py"
    client.write_text(CLIENT)
    body, ctype = image, "application/octet-stream"
    if as_json:
        body, ctype = image.with_suffix(".json"), "application/json"
        body.write_text(json.dumps({"image": base64.b64encode(image.read_bytes()).decode()}))
    out = subprocess.run([sys.executable, str(client), url, str(body), str(conc), str(duration), ctype],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    ok = sorted(ms for code, ms in r["lat"] if code == 200)
    refused = sorted(ms for code, ms in r["lat"] if code in (429, 503))
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None
    return {"concurrency": conc, "requests": len(r["lat"]), "ok": len(ok), "refused": len(refused),
            "errors": len(r["lat"]) - len(ok) - len(refused), "rps": round(len(ok) / r["wall"], 1),
            "p50_ms": round(pct(ok, 0.5), 1) if ok else None, "p99_ms": round(pct(ok, 0.99), 1) if ok else None,
            "refused_p99_ms": round(pct(refused, 0.99), 1) if refused else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--models", default="resnet18,fastdet")
    ap.add_argument("--servers", default="plain,litserve,cnnkit-nobatch,cnnkit,cnnkit-onnx", help="'' for the overload run only")
    ap.add_argument("--queue-ms", type=float, default=50.0, help="--max-queue-ms of the overload run")
    ap.add_argument("--no-overload", action="store_true", help="skip the overload run")
    args = ap.parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    rows, overload = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = make_weights(folder)
        for name in args.models.split(","):
            w, size = weights[name]
            image = folder / f"{name}.jpg"
            image.write_bytes(jpeg(size))
            for kind in filter(None, args.servers.split(",")):
                port = free_port()
                proc = start(kind, w, port, folder)
                base = f"http://127.0.0.1:{port}"
                url = f"{base}/predict" if kind in ("plain", "litserve") else f"{base}/v1/models/m/predict"
                ready = {"plain": f"{base}/predict", "litserve": f"{base}/health"}.get(kind, f"{base}/readyz")
                as_json = kind == "litserve"
                try:
                    wait_ready(ready, proc)
                    load(url, image, 4, 2.0, folder, as_json)  # warm-up
                    for c in concs:
                        row = {"model": name, "server": kind, **load(url, image, c, args.duration, folder, as_json)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    stop(proc)
            if args.no_overload:
                continue
            # overload: 64 connections against a 50 ms queue budget (--max-queue-ms)
            port = free_port()
            proc = start("cnnkit", w, port, folder, ("--max-queue-ms", str(args.queue_ms)))
            base = f"http://127.0.0.1:{port}"
            url = f"{base}/v1/models/m/predict"
            try:
                wait_ready(f"{base}/readyz", proc)
                load(url, image, 4, 2.0, folder)
                calm = load(url, image, 1, args.duration, folder)
                busy = load(url, image, 64, args.duration, folder)
                t0 = time.time()
                import httpx

                while httpx.post(url, content=image.read_bytes(), timeout=60).status_code != 200:
                    if time.time() - t0 > 60:
                        raise RuntimeError("the server did not recover within 60 s after the load stopped")
                    time.sleep(0.05)
                recovered = time.time() - t0
                row = {"model": name, "unloaded_p99_ms": calm["p99_ms"], "overload": busy,
                       "admitted_p99_over_unloaded": round(busy["p99_ms"] / calm["p99_ms"], 2) if busy["p99_ms"] else None,
                       "recovered_s": round(recovered, 2)}
                overload.append(row)
                print(json.dumps(row), flush=True)
            finally:
                stop(proc)
    save("serve_load" if overload and rows else "serve_overload" if overload else "serve_throughput", {"duration_s": args.duration, "rows": rows, "overload": overload})


if __name__ == "__main__":
    main()
