"""Load test of `cnnkit serve` against a plain FastAPI app, on loopback, in one run.

    python benchmarks/serve_load.py [--duration 10] [--concurrency 1,8,32] [--models resnet18,fastdet]

Servers (each its own process, started and stopped here, one at a time):
- ``cnnkit``: `cnnkit serve` with dynamic batching (``--max-batch 16 --max-wait-ms 5``);
- ``cnnkit-nobatch``: the same with ``--max-batch 1``;
- ``cnnkit-onnx``: batching on ONNX Runtime (``--backend onnx``);
- ``cnnkit-int8``: batching on an int8 file from `cnnkit quantize`'s ``quantize_onnx``
  (calibrated on 32 random inputs: latency does not depend on the ranges). Not a like-for-like
  peer comparison (the peers run fp32); it shows what the int8 path serves. Not in the default
  ``--servers``;
- ``plain``: the peer, what most users write: a FastAPI app whose (sync) endpoint reads the
  upload and calls the eager PyTorch model once per request (``cnnkit.load``'s predictor, so
  preprocessing and decoding are the same work), run by uvicorn with its defaults.
- ``litserve``: the same predictor in LitServe (Lightning AI) with its default settings
  (``LitServer(api).run()``; no batching unless asked), which takes JSON, so its client sends
  ``{"image": "<base64>"}``. LitServe is installed by this script into
  ``benchmarks/.peer-litserve`` (pip ``--target``) and put on that server's path only, never
  into cnnkit's environment.

The client is a minimal HTTP/1.1 client on asyncio streams (one prebuilt request, keep-alive),
in ``--client-procs`` separate processes: ``C`` connections each send the next request as soon as
the last is answered, for ``--duration`` seconds per concurrency, and it reports requests/s and
p50/p99 latency. (An httpx client spent about 7 ms of CPU per request here: with 64 connections
on one core the client, not the server, set the latency it measured.)

Then overload runs per model: the capacity ``C`` (requests/s of ``cnnkit`` at concurrency 32)
and the unloaded p99 (one connection); then, for each ``--queue-ms`` budget, a server with
``--max-queue-ms`` (a latency budget for the queue) gets an open loop of ``--overload`` x ``C`` arrivals per second (latency counted
from each scheduled arrival, so a client falling behind cannot hide it), measuring how fast
refusals (429) come, the p99 of the admitted requests against the unloaded p99, the requests/s
answered (goodput) against the capacity, and the time until an ordinary request succeeds again
after the load stops. A tight budget keeps admitted latency near the unloaded one but leaves
batches small (goodput near the unbatched rate); a loose one batches more and waits longer.

Models are freshly initialized (latency does not depend on the weights): resnet18 at 224 px
and fastdet (width 16) at 320 px. Run it alone: anything else running moves the numbers. The
client shares the machine's cores with the server unless ``--server-cpus``/``--client-cpus``
bind them apart; ``--device cuda`` serves every server (peers included) from the GPU.
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

model = cnnkit.load(os.environ["PLAIN_WEIGHTS"], os.environ.get("PLAIN_DEVICE", "cpu"))
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
        self.model = cnnkit.load(os.environ["PLAIN_WEIGHTS"], os.environ.get("PLAIN_DEVICE", "cpu"))

    def decode_request(self, request):
        return base64.b64decode(request["image"])

    def predict(self, x):
        return [r.to_dict() for r in self.model(x)]

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    ls.LitServer(ImageAPI(), accelerator=os.environ.get("PLAIN_DEVICE", "cpu")).run(port=int(os.environ["PORT"]), generate_client_file=False)
'''
LITSERVE = Path(__file__).parent / ".peer-litserve"
LITSERVE_VERSION = "0.2.19"


def install_litserve() -> None:
    if not (LITSERVE / "litserve").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(LITSERVE),
                        f"litserve=={LITSERVE_VERSION}"], check=True)


def cpu_set(text: str) -> set[int] | None:
    """``"0-3,8"`` -> ``{0, 1, 2, 3, 8}``; ``""`` -> None."""
    cpus = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus or None


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


def make_int8(run: Path) -> Path:
    """``run``'s weights as int8 ONNX (``weights/best.int8.onnx``), calibrated on random inputs."""
    import torch

    from cnnkit.core.card import ModelCard
    from cnnkit.methods.export import export
    from cnnkit.methods.quantize import quantize_onnx
    from cnnkit.runtime.backend import read_onnx_card

    out = run / "weights" / "best.int8.onnx"
    if not out.is_file():
        fp32 = Path(export(run, "onnx", run / "weights" / "best.onnx", check=False, verbose=False)["file"])
        card = ModelCard.from_dict(read_onnx_card(fp32))
        g = torch.Generator().manual_seed(0)
        xs = [torch.rand(card.input.shape(1)[1:], generator=g) for _ in range(32)]
        quantize_onnx(fp32, out, card, xs, xs[:4], sensitivity=False)
    return out


def jpeg(size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def pinned(proc: subprocess.Popen, cpus: set[int] | None) -> subprocess.Popen:
    """``proc`` bound to ``cpus`` (None: left alone), at once, before it imports torch or starts
    threads (those inherit the binding)."""
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    return proc


def pythonpath(*extra: Path | str) -> str:
    return os.pathsep.join([*map(str, extra), *filter(None, [os.environ.get("PYTHONPATH")])])


def start(kind: str, weights: Path, port: int, folder: Path, extra: tuple[str, ...] = (), device: str = "cpu",
          cpus: set[int] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PLAIN_WEIGHTS": str(weights), "PLAIN_DEVICE": device}
    if kind == "litserve":
        install_litserve()
        (folder / "lit_app.py").write_text(LITSERVE_APP)
        env.update(PORT=str(port), PYTHONPATH=pythonpath(LITSERVE))
        return pinned(subprocess.Popen([sys.executable, "lit_app.py"], cwd=folder, env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), cpus)
    if kind == "plain":
        (folder / "plain_app.py").write_text(PLAIN_APP)
        cmd = [sys.executable, "-m", "uvicorn", "plain_app:app", "--port", str(port), "--log-level", "warning"]
        env.update(PYTHONPATH=pythonpath(folder))
        return pinned(subprocess.Popen(cmd, cwd=folder, env=env, stderr=subprocess.PIPE, text=True), cpus)
    args = {"cnnkit": (), "cnnkit-nobatch": ("--max-batch", "1"), "cnnkit-onnx": ("--backend", "onnx"),
            "cnnkit-int8": ()}[kind]
    if kind == "cnnkit-int8":
        weights = make_int8(weights)
    cmd = [sys.executable, "-m", "cnnkit", "serve", "--weights", f"m={weights}", "--port", str(port),
           "--device", device, "--log-level", "warning", *args, *extra]
    return pinned(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), cpus)


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


CLIENT = r"""
# A minimal HTTP/1.1 load client on asyncio streams: one prebuilt request, keep-alive, reconnect
# when the server closes. httpx spent about 7 ms of client CPU per request here, so with 64
# connections on one core the client, not the server, set the latency it measured.
import asyncio, json, sys, time
from urllib.parse import urlsplit
url, body, conc, duration = urlsplit(sys.argv[1]), open(sys.argv[2], "rb").read(), int(sys.argv[3]), float(sys.argv[4])
ctype = sys.argv[5]
request = (f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: {ctype}\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body

async def exchange(reader, writer):
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
    await reader.readexactly(int(fields.get("content-length", 0)))
    return code, fields.get("connection", "").lower() == "close"

async def closed_loop(lat):
    # conc connections, each sending its next request as soon as the last is answered
    t_end = time.perf_counter() + duration
    async def loop():
        conn = None
        while time.perf_counter() < t_end:
            conn = await timed(conn, time.perf_counter(), lat)
        if conn is not None:
            conn[1].close()
    await asyncio.gather(*(loop() for _ in range(conc)))

async def open_loop(lat, rate):
    # arrivals at a constant rate per second whatever the answers, each on an idle connection
    # or a new one; latency counts from the scheduled arrival, so a client that falls behind
    # shows up in the figures instead of hiding them (no coordinated omission)
    idle, tasks, t0 = [], [], time.perf_counter()
    async def one(t):
        conn = idle.pop() if idle else None
        conn = await timed(conn, t, lat)
        if conn is not None:
            idle.append(conn)
    for i in range(int(rate * duration)):
        t = t0 + i / rate
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        tasks.append(asyncio.create_task(one(t)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn[1].close()

async def timed(conn, t0, lat):
    try:
        if conn is None:
            conn = await asyncio.open_connection(url.hostname, url.port)
        code, close = await asyncio.wait_for(exchange(*conn), 60)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
        code, close = -1, True
    lat.append((code, (time.perf_counter() - t0) * 1e3))
    if close and conn is not None:
        conn[1].close()
        conn = None
    return conn

async def main():
    lat, t0 = [], time.perf_counter()
    rate = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    await (open_loop(lat, rate) if rate else closed_loop(lat))
    print(json.dumps({"wall": time.perf_counter() - t0, "lat": lat}))
asyncio.run(main())
"""


def load(url: str, image: Path, conc: int, duration: float, folder: Path, as_json: bool = False,
         cpus: set[int] | None = None, procs: int = 1, rate: float = 0.0) -> dict:
    """Requests/s and latency percentiles of ``conc`` connections spread over ``procs`` client
    processes, or with ``rate``, of an open loop of that many arrivals per second (one process)."""
    client = folder / "client.py"
    client.write_text(CLIENT)
    body, ctype = image, "application/octet-stream"
    if as_json:
        body, ctype = image.with_suffix(".json"), "application/json"
        body.write_text(json.dumps({"image": base64.b64encode(image.read_bytes()).decode()}))
    procs = 1 if rate else max(1, min(procs, conc))
    shares = [conc // procs + (i < conc % procs) for i in range(procs)]
    clients = [pinned(subprocess.Popen([sys.executable, str(client), url, str(body), str(n), str(duration), ctype,
                                        str(rate)], stdout=subprocess.PIPE, text=True), cpus) for n in shares]
    runs = [json.loads(c.communicate()[0]) for c in clients]
    lat = [x for r in runs for x in r["lat"]]
    wall = max(r["wall"] for r in runs)
    ok = sorted(ms for code, ms in lat if code == 200)
    refused = sorted(ms for code, ms in lat if code in (429, 503))
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None
    return {"concurrency": conc, "rate": rate or None, "requests": len(lat), "ok": len(ok), "refused": len(refused),
            "errors": len(lat) - len(ok) - len(refused), "rps": round(len(ok) / wall, 1),
            "p50_ms": round(pct(ok, 0.5), 1) if ok else None, "p99_ms": round(pct(ok, 0.99), 1) if ok else None,
            "refused_p50_ms": round(pct(refused, 0.5), 1) if refused else None,
            "refused_p99_ms": round(pct(refused, 0.99), 1) if refused else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--models", default="resnet18,fastdet")
    ap.add_argument("--servers", default="plain,litserve,cnnkit-nobatch,cnnkit,cnnkit-onnx", help="'' for the overload run only")
    ap.add_argument("--queue-ms", default="15,50", help="--max-queue-ms of the overload runs (one run each)")
    ap.add_argument("--no-overload", action="store_true", help="skip the overload run")
    ap.add_argument("--overload", type=float, default=2.0, help="arrival rate of the overload run, times capacity")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes sharing the connections")
    ap.add_argument("--device", default="cpu", help="the servers' device: cpu or cuda (every server, peers included)")
    ap.add_argument("--server-cpus", default="", help="bind the server to these cores, e.g. 0-7 (default: all)")
    ap.add_argument("--client-cpus", default="", help="bind the load client to these cores, e.g. 8-15 (default: all)")
    ap.add_argument("--tag", default="", help="suffix of the results file name (results/serve_load<tag>.json)")
    args = ap.parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    scpus, ccpus = cpu_set(args.server_cpus), cpu_set(args.client_cpus)
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
                proc = start(kind, w, port, folder, device=args.device, cpus=scpus)
                base = f"http://127.0.0.1:{port}"
                url = f"{base}/predict" if kind in ("plain", "litserve") else f"{base}/v1/models/m/predict"
                ready = {"plain": f"{base}/predict", "litserve": f"{base}/health"}.get(kind, f"{base}/readyz")
                as_json = kind == "litserve"
                try:
                    wait_ready(ready, proc)
                    load(url, image, 4, 2.0, folder, as_json, ccpus)  # warm-up
                    for c in concs:
                        row = {"model": name, "server": kind,
                               **load(url, image, c, args.duration, folder, as_json, ccpus, args.client_procs)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    stop(proc)
            if args.no_overload:
                continue
            # overload: capacity C (requests/s at concurrency 32, no budget), then arrivals at
            # --overload x C against a server with --max-queue-ms, then the time to recover
            base = {"model": name}
            for budget in [None, *(float(q) for q in args.queue_ms.split(","))]:
                port = free_port()
                flags = ("--max-queue-ms", f"{budget:g}") if budget else ()
                proc = start("cnnkit", w, port, folder, flags, args.device, scpus)
                url = f"http://127.0.0.1:{port}/v1/models/m/predict"
                try:
                    wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
                    load(url, image, 4, 2.0, folder, cpus=ccpus, procs=args.client_procs)
                    if budget is None:  # capacity and unloaded latency, no budget
                        calm = load(url, image, 1, args.duration, folder, cpus=ccpus)
                        full = load(url, image, 32, args.duration, folder, cpus=ccpus, procs=args.client_procs)
                        base.update(unloaded_p99_ms=calm["p99_ms"], capacity_rps=full["rps"])
                        continue
                    busy = load(url, image, 0, args.duration, folder, cpus=ccpus, rate=args.overload * base["capacity_rps"])
                    t0 = time.time()
                    while load(url, image, 1, 0.01, folder, cpus=ccpus)["ok"] == 0:
                        if time.time() - t0 > 60:
                            raise RuntimeError("the server did not recover within 60 s after the load stopped")
                        time.sleep(0.05)
                    ratio = busy["p99_ms"] / base["unloaded_p99_ms"] if busy["p99_ms"] else None
                    row = {**base, "max_queue_ms": budget, "overload": busy,
                           "admitted_p99_over_unloaded": ratio and round(ratio, 2),
                           "goodput_over_capacity": round(busy["rps"] / base["capacity_rps"], 2),
                           "recovered_s": round(time.time() - t0, 2)}
                    overload.append(row)
                    print(json.dumps(row), flush=True)
                finally:
                    stop(proc)
    name = "serve_load" if overload and rows else "serve_overload" if overload else "serve_throughput"
    setup = {"device": args.device, "server_cpus": args.server_cpus or "all", "client_cpus": args.client_cpus or "all"}
    save(name + args.tag, {"duration_s": args.duration, "setup": setup, "rows": rows, "overload": overload})


if __name__ == "__main__":
    main()
