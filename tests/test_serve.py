"""`cnnkit serve`: a real server on 127.0.0.1 answers what `cnnkit TASK predict --json` writes,
for every task, batches concurrent requests, counts them in /metrics, and holds under bad
and hostile input."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import running
from task_inputs import task_images

import cnnkit

SERVED = {"digits_run": "digits", "multilabel_run": "tags", "tiny_run": "det", "instance_run": "inst",
          "seg_run": "seg"}


def _png(h: int = 40, w: int = 56, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _slow_down(monkeypatch, predictor, seconds_per_image: float) -> list[int]:
    """Make ``predictor``'s core take ``seconds_per_image`` per image; returns the batch sizes run."""
    real, calls = predictor.infer, []

    def slow(x, metas):
        calls.append(len(x))
        time.sleep(seconds_per_image * len(x))
        return real(x, metas)

    monkeypatch.setattr(predictor, "infer", slow)
    return calls


def _burst(url: str, n: int) -> list[httpx.Response]:
    """``n`` concurrent predict requests to the digits model, each a different image."""
    async def go():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/models/digits/predict", content=_png(seed=i))
                                          for i in range(n)))

    return asyncio.run(go())


def same(a, b, key: str = "") -> bool:
    """Rows equal up to float noise: batched inference sums in another order (scores within
    1e-4; boxes, rounded to 0.01 px, within 0.011)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k], k) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y, key) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        tol = 0.011 if key == "box" else 1e-4
        return isinstance(b, (int, float)) and abs(a - b) <= tol
    return a == b


@pytest.fixture(scope="module")
def served(request):
    """Every 2-D task's tiny model, loaded once: ``{name: (fixture name, predictor)}``."""
    from cnnkit.serve import load_models

    runs = {fx: request.getfixturevalue(fx) for fx in SERVED}
    models = load_models([f"{SERVED[fx]}={run}" for fx, run in runs.items()])
    return runs, models


def test_http_answers_what_cli_predict_writes_for_every_task(served, request, tmp_path):
    from pycocotools import mask as mask_utils

    runs, models = served
    with running(models) as (url, _):
        listed = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
        assert set(listed) == set(SERVED.values())
        for fx, name in SERVED.items():
            assert listed[name]["task"] == models[name].task and listed[name]["card"]["classes"] == models[name].classes
            files = task_images(fx, request, tmp_path)[:3]
            expected = []
            for f in files:
                expected += cnnkit.predict(models[name].task, runs[fx], str(f), verbose=False)
            parts = [("file", (str(f), Path(f).read_bytes(), "image/png")) for f in files]
            r = httpx.post(f"{url}/v1/models/{name}/predict", files=parts, timeout=60)
            assert r.status_code == 200, r.text
            got = r.json()
            assert [g["path"] for g in got] == [str(f) for f in files]
            for g, e in zip(got, expected):
                masks = g.pop("masks", None)
                assert same(g, json.loads(json.dumps(e))), (name, g, e)
                if masks is not None:  # semantic masks travel as RLE per class; their areas are the fractions
                    area = {c: mask_utils.area(m) / (g["width"] * g["height"]) for c, m in masks.items()}
                    assert {c: round(a, 5) for c, a in area.items()} == g["classes"]
            # one raw-body image and one JSON base64 image answer the same as the upload
            raw = httpx.post(f"{url}/v1/models/{name}/predict", content=Path(files[0]).read_bytes(), timeout=60)
            b64 = httpx.post(f"{url}/v1/models/{name}/predict", timeout=60,
                             json={"images": [base64.b64encode(Path(files[0]).read_bytes()).decode()]})
            for alt in (raw.json()[0], b64.json()[0]):
                alt.pop("masks", None)
                alt["path"] = str(files[0])
                assert same(alt, got[0])


def test_concurrent_requests_share_batches_and_metrics_count_them(served):
    from prometheus_client.parser import text_string_to_metric_families

    from cnnkit.serve.app import ServeSettings

    _, models = served
    images = [_png(seed=i) for i in range(12)]
    alone = {}
    with running({"digits": models["digits"]}, ServeSettings(max_wait_ms=200)) as (url, _):
        for i, img in enumerate(images[:3]):
            alone[i] = httpx.post(f"{url}/v1/models/digits/predict?topk=3", content=img).json()

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(f"{url}/v1/models/digits/predict?topk=3", content=img)
                                              for img in images))

        answers = asyncio.run(burst())
        assert all(a.status_code == 200 for a in answers)
        for i in range(3):  # batched with others, each request still gets its own answer
            assert same(answers[i].json(), alone[i])
        assert all(len(a.json()[0]["topk"]) == 3 for a in answers)
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    sizes = families["cnnkit_batch_images"].samples
    count = next(s.value for s in sizes if s.name.endswith("_count"))
    total = next(s.value for s in sizes if s.name.endswith("_sum"))
    assert total == 15 and count < 15  # 15 images in fewer core calls: the burst shared calls
    ok = next(s.value for s in families["cnnkit_requests"].samples
              if s.name == "cnnkit_requests_total" and s.labels == {"model": "digits", "status": "200"})
    assert ok == 15
    classes = sum(s.value for s in families["cnnkit_predicted_class"].samples if s.name.endswith("_total"))
    assert classes == 15
    stages = {s.labels["stage"] for s in families["cnnkit_latency_seconds"].samples}
    assert {"queue", "preprocess", "inference", "postprocess", "total"} <= stages


def test_a_full_queue_is_refused_at_once_with_retry_after(served, monkeypatch):
    """A slow model with room for 2 waiting images: a burst of 12 gets 429s with Retry-After at
    once, the admitted ones are answered, and the server serves normally afterwards."""
    from cnnkit.serve.app import ServeSettings

    _, models = served
    p = models["digits"]
    _slow_down(monkeypatch, p, 0.3)
    with running({"digits": p}, ServeSettings(max_batch=1, max_queue=2, max_wait_ms=0)) as (url, _):
        answers = _burst(url, 12)
        codes = sorted(a.status_code for a in answers)
        assert codes.count(429) >= 6 and set(codes) <= {200, 429}, codes
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["detail"]
        monkeypatch.undo()
        assert httpx.post(f"{url}/v1/models/digits/predict", content=_png()).status_code == 200


def test_max_queue_ms_refuses_what_would_wait_too_long(served, monkeypatch):
    """With a latency budget, a burst is admitted only as far as the measured time per image
    lets it wait within the budget (a queue of 64 images alone would admit all ten, the last
    waiting about 2 s); once the burst is done the next request is admitted."""
    from cnnkit.serve.app import ServeSettings

    _, models = served
    p = models["digits"]
    _slow_down(monkeypatch, p, 0.2)
    settings = ServeSettings(max_batch=1, max_queue=64, max_queue_ms=500, max_wait_ms=0)
    with running({"digits": p}, settings) as (url, _):
        assert httpx.post(f"{url}/v1/models/digits/predict", content=_png()).status_code == 200  # learns 0.2 s
        codes = [a.status_code for a in _burst(url, 10)]
        time.sleep(1.0)  # the admitted ones finish; the next request is first in line and admitted
        assert httpx.post(f"{url}/v1/models/digits/predict", content=_png()).status_code == 200
    assert 1 <= codes.count(200) <= 4 and set(codes) <= {200, 429}, codes


class _FakePredictor:
    """The predictor surface the batcher uses: ``infer`` takes ``seconds`` per batch."""

    class pipeline:
        batchable = True

        @staticmethod
        def postprocess(raw, metas, **options):
            return [None] * len(metas)

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds

    def infer(self, x, metas):
        time.sleep(self.seconds)
        return (x,)


def test_expected_wait_counts_the_batch_running_now():
    """A request arriving while a batch runs waits for the rest of that batch too: the latency
    budget (--max-queue-ms) must see it, or an overloaded server admits one batch too many."""
    import torch

    from cnnkit.serve.batcher import Batcher

    async def go():
        b = Batcher(_FakePredictor(0.4), max_batch=4, max_wait_ms=0, max_queue_ms=100)
        b.start()
        b.per_image_s = 0.2  # as measured by earlier batches
        job = asyncio.create_task(b.submit([torch.zeros(1)] * 2, [{}, {}], {}, timeout=5))
        await asyncio.sleep(0.1)  # the two images are running (about 0.4 s expected, 0.3 s left)
        during = b.expected_wait(), b.admit()
        await job
        after = b.expected_wait()
        await b.stop()
        return during, after

    (wait, admitted), after = asyncio.run(go())
    assert 0.2 < wait < 0.35 and not admitted
    assert after == 0.0


def test_a_batch_waits_only_for_requests_already_arriving():
    """A request alone runs at once, however long --max-wait-ms is; one admitted while the
    first is queued (its body still being read) joins the first one's batch."""
    import torch

    from cnnkit.serve.batcher import Batcher

    async def go():
        batches = []
        b = Batcher(_FakePredictor(), max_batch=8, max_wait_ms=2000, on_batch=batches.append)
        b.start()
        _, alone, _ = await b.submit([torch.zeros(1)], [{}], {}, timeout=5)
        assert b.admit()  # a second request arrives while a third is queued
        third = asyncio.create_task(b.submit([torch.zeros(1)], [{}], {}, timeout=5))
        await asyncio.sleep(0.2)
        b.release()
        await b.submit([torch.zeros(1)], [{}], {}, timeout=5)
        await third
        await b.stop()
        return alone, batches

    alone, batches = asyncio.run(go())
    assert alone["queue_ms"] < 1000  # not the 2 s of max_wait
    assert batches == [1, 2]


def test_a_request_that_times_out_is_dropped(served, monkeypatch):
    from cnnkit.serve.app import ServeSettings

    _, models = served
    p = models["digits"]
    calls = _slow_down(monkeypatch, p, 0.5)
    with running({"digits": p}, ServeSettings(max_batch=1, timeout_s=0.2, max_wait_ms=0)) as (url, _):
        assert [a.status_code for a in _burst(url, 2)] == [504, 504]
        time.sleep(0.8)
    assert len(calls) == 1  # the second request timed out in the queue and never ran


def _bomb(side: int = 14000) -> bytes:
    """A side x side PNG of a few kilobytes (196 M pixels once decoded at 14,000)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:300]


def test_hostile_input_is_refused_and_ordinary_requests_go_on(served, tmp_path):
    from cnnkit.serve.app import ServeSettings

    _, models = served
    token = "t0ken-" + "x" * 26
    auth = {"Authorization": f"Bearer {token}"}
    settings = ServeSettings(token=token, cors_origins=("http://good.example",))
    with running({"digits": models["digits"]}, settings) as (url, _):
        predict = f"{url}/v1/models/digits/predict"
        stop, ordinary = threading.Event(), []

        def steady():  # ordinary requests all along
            with httpx.Client(timeout=60, headers=auth) as c:
                while not stop.is_set():
                    ordinary.append(c.post(predict, content=_png()).status_code)

        workers = [threading.Thread(target=steady) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            with httpx.Client(timeout=120, headers=auth) as c:
                r = c.post(predict, content=_bomb())  # Pillow's own guard refuses it when opening
                assert r.status_code == 413 and "too large" in r.json()["detail"]
                r = c.post(predict, content=_bomb(8000))  # under Pillow's guard, over the server's pixel limit
                assert r.status_code == 413 and "limit is 40,000,000 pixels" in r.json()["detail"]
                r = c.post(predict, content=b"\x89PNG" + b"x" * (20 * 2**20 - 3))  # 20 MB + 1
                assert r.status_code == 413 and "larger than 20 MB" in r.json()["detail"]

                def gigabyte():
                    chunk = b"x" * 2**20
                    for _ in range(1024):
                        yield chunk

                r = c.post(predict, content=gigabyte())  # chunked: no Content-Length
                assert r.status_code == 413
                many = [("file", (f"{i}.png", b"x", "image/png")) for i in range(10_000)]
                r = c.post(predict, files=many)
                assert r.status_code in (400, 413) and "multipart" in r.json()["detail"]
                r = c.post(predict, content=b"not an image at all")
                assert r.status_code == 422 and "not an image" in r.json()["detail"]
                r = c.post(predict, content=_truncated_jpeg())
                assert r.status_code == 422 and "truncated" in r.json()["detail"]
                r = c.post(f"{url}/v1/models/nope/predict", content=_png())
                assert r.status_code == 404 and "digits" in r.json()["detail"]
                r = c.post(predict, content=_png(), headers={"X-Big": "y" * 2**20})
                assert r.status_code in (400, 431)
            with httpx.Client(timeout=60) as anon:
                assert anon.post(predict, content=_png()).status_code == 401
                r = anon.post(predict, content=_png(), headers={"Authorization": "Bearer " + "x" * 32})
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert anon.get(f"{url}/v1/models").status_code == 401
                assert anon.get(f"{url}/metrics").status_code == 401
                assert anon.get(f"{url}/healthz").json() == {"status": "ok"}
                assert anon.get(f"{url}/readyz").status_code == 200
                good = anon.post(predict, content=_png(), headers={**auth, "Origin": "http://good.example"})
                bad = anon.post(predict, content=_png(), headers={**auth, "Origin": "http://evil.example"})
                assert good.headers["access-control-allow-origin"] == "http://good.example"
                assert bad.status_code == 200 and "access-control-allow-origin" not in bad.headers
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert len(ordinary) >= 4 and ordinary.count(200) / len(ordinary) >= 0.95, ordinary
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_cors_is_off_unless_origins_are_named(served):
    _, models = served
    with running({"digits": models["digits"]}) as (url, _):
        r = httpx.post(f"{url}/v1/models/digits/predict", content=_png(), headers={"Origin": "http://a.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_serve_cli_errors_are_one_sentence(cli, tmp_path, digits_run):
    short = tmp_path / "token"
    short.write_text("abc")
    r = cli("serve", "--weights", digits_run, "--token-file", short)
    assert r.code == 2 and "shorter than 16" in r.err
    r = cli("serve", "--weights", digits_run, "--token-file", tmp_path / "nothere")
    assert r.code == 2 and "does not exist" in r.err
    r = cli("serve", "--weights", tmp_path / "missing")
    assert r.code == 2 and "does not exist" in r.err
    r = cli("serve", "--weights", f"a={digits_run}", "--weights", f"a={digits_run}")
    assert r.code == 2 and "two models are named 'a'" in r.err
    r = cli("serve", "--weights", f"a={digits_run}", f"a={digits_run}")  # --weights A B, as the issue writes it
    assert r.code == 2 and "two models are named 'a'" in r.err
    r = cli("serve", "--weights", digits_run, tmp_path / "missing")
    assert r.code == 2 and "missing" in r.err and "does not exist" in r.err


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_as_a_process_answers_then_stops_on_sigterm(digits_run, tmp_path, workers):
    """The installed command: `cnnkit serve` starts (one process, or two sharing the port),
    answers, and exits 0 on SIGTERM."""
    import signal
    import socket
    import subprocess
    import sys

    from cnnkit.serve import model_name

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit.cli.main", "serve", "--weights", str(digits_run),
                             "--port", str(port), "--log-level", "warning", "--workers", str(workers)],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/models/{model_name(digits_run)}/predict", content=_png())
        assert r.status_code == 200 and "label" in r.json()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_drift_rises_for_darkened_noisy_or_rotated_images_and_not_for_clean_ones(served, tmp_path):
    """Reference: the digits model on its validation images. 200 clean held-out test images
    stay under the threshold; the same images darkened, or with noise, cross it; rotated a
    quarter turn (the same pixels, so the image statistics cannot move) they cross it through
    the model's embedding; /metrics carries the score."""
    from prometheus_client.parser import text_string_to_metric_families

    from cnnkit.data.digits import digits_arrays
    from cnnkit.serve import build_references
    from cnnkit.serve.app import ServeSettings

    _, models = served
    digits = {"digits": models["digits"]}
    ref_dir = tmp_path / "val"
    ref_dir.mkdir()
    for i, a in enumerate(digits_arrays("val")[0]):
        Image.fromarray(a).save(ref_dir / f"{i}.png")
    settings = ServeSettings(references=build_references(digits, [str(ref_dir)], tmp_path), drift_window=200)
    test = digits_arrays("test")[0][:200].astype(np.float32)
    rng = np.random.default_rng(0)
    variants = {"clean": test, "dark": test * 0.4, "noisy": test + rng.normal(0, 40, test.shape),
                "rotated": np.rot90(test, axes=(1, 2))}

    def encode(a) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    scores = {}
    with running(digits, settings) as (url, _):
        assert httpx.get(f"{url}/v1/models/digits/drift").json()["score"] is None  # nothing seen yet
        for name, images in variants.items():
            for i in range(0, len(images), 25):
                parts = [("file", (f"{j}.png", encode(a), "image/png")) for j, a in enumerate(images[i:i + 25])]
                assert httpx.post(f"{url}/v1/models/digits/predict", files=parts, timeout=60).status_code == 200
            report = httpx.get(f"{url}/v1/models/digits/drift").json()
            assert report["samples"] == 200
            scores[name] = report
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        assert httpx.get(f"{url}/v1/models/det/drift").status_code == 404
    assert scores["clean"]["score"] < 0.25 and scores["clean"]["drifted"] is False, scores["clean"]
    assert scores["dark"]["drifted"] and scores["dark"]["features"]["gray_mean"] > 0.25, scores["dark"]
    assert scores["noisy"]["drifted"] and scores["noisy"]["features"]["gray_std"] > 0.25, scores["noisy"]
    embedding = [f"embedding_pc{i}" for i in (1, 2, 3, 4)] + ["embedding_distance"]
    assert set(embedding) <= set(scores["clean"]["features"]), scores["clean"]
    rotated = scores["rotated"]["features"]
    assert max(rotated["gray_mean"], rotated["gray_std"]) < 0.25, rotated  # the same pixels
    assert scores["rotated"]["drifted"] and max(rotated[f] for f in embedding) > 0.25, rotated
    gauge = next(s.value for s in families["cnnkit_drift_score"].samples if s.labels == {"model": "digits"})
    assert gauge == scores["rotated"]["score"]


def test_onnx_backend_answers_like_torch(served, tmp_path):
    """`--backend onnx` exports the weights and serves them on ONNX Runtime: same answers."""
    from cnnkit.serve import load_models

    runs, models = served
    onnx = load_models([f"det={runs['tiny_run']}"], backend="onnx", workdir=tmp_path)
    assert onnx["det"].backend.name == "onnx" and (tmp_path / "det.onnx").is_file()
    image = _png(96, 128)
    answers = {}
    for backend, ms in (("torch", {"det": models["det"]}), ("onnx", onnx)):
        with running(ms) as (url, _):
            answers[backend] = httpx.post(f"{url}/v1/models/det/predict?conf=0.001", content=image).json()
    assert answers["torch"][0]["detections"] and same(answers["onnx"], answers["torch"])


@pytest.mark.parametrize("fixture", list(SERVED))
def test_onnx_backend_catches_the_embedding_torch_does(served, request, tmp_path, fixture):
    """Drift's embedding on ONNX Runtime (the deepest stage's output fetched beside the graph
    outputs) equals the torch hook's, image for image, for every 2-D task's model; the tap
    comes off cleanly."""
    from cnnkit.methods.drift import EmbeddingTap
    from cnnkit.serve import load_models

    runs, models = served
    name = SERVED[fixture]
    onnx = load_models([f"{name}={runs[fixture]}"], backend="onnx", workdir=tmp_path)[name]
    images = task_images(fixture, request, tmp_path)
    embeddings = {}
    for backend, p in (("torch", models[name]), ("onnx", onnx)):
        tap = EmbeddingTap.attach(p)
        assert tap is not None, backend
        embeddings[backend] = tap.run(lambda p=p: p(images), len(images))[1]
        tap.close()
    assert embeddings["torch"] is not None and embeddings["torch"].shape == embeddings["onnx"].shape
    assert np.abs(embeddings["onnx"] - embeddings["torch"]).max() <= 1e-4 * max(1, np.abs(embeddings["torch"]).max())
    assert onnx.backend.tapped is None and [o.name for o in onnx.backend.session.get_outputs()] == onnx.backend.outputs


def test_training_writes_the_drift_reference_serve_uses(served, tmp_path):
    """Training wrote weights/drift.json (val images' features, embeddings included); serving
    the run with no --reference watches drift against it: clean test images stay under the
    threshold."""
    from cnnkit.data.digits import digits_arrays
    from cnnkit.methods.drift import Reference
    from cnnkit.serve import build_references
    from cnnkit.serve.app import ServeSettings

    runs, models = served
    ref = runs["digits_run"] / "weights" / "drift.json"
    assert ref.is_file()
    loaded = Reference.load(ref)
    assert loaded.embedding is not None and "embedding_pc1" in loaded.names and len(loaded.values) >= 30
    refs = build_references({"digits": models["digits"]}, [])
    assert refs == {"digits": str(ref)}
    test = digits_arrays("test")[0][:200]
    with running({"digits": models["digits"]}, ServeSettings(references=refs, drift_window=200)) as (url, _):
        for i in range(0, len(test), 25):
            parts = [("file", (f"{j}.png", _encode(a), "image/png")) for j, a in enumerate(test[i:i + 25])]
            assert httpx.post(f"{url}/v1/models/digits/predict", files=parts, timeout=60).status_code == 200
        report = httpx.get(f"{url}/v1/models/digits/drift").json()
    assert report["samples"] == 200 and report["drifted"] is False, report


def _encode(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(a, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_psi_of_a_window_like_the_reference_stays_under_the_threshold():
    """Two samples of one distribution: the smoothed PSI of 100 window values against 1,000
    reference values stays under 0.25 for nearly every seed (raw shares with an empty-bin floor
    flagged 40 clean digits as drifted), and no score is given before 100 images."""
    from cnnkit.methods.drift import DriftMonitor, Reference

    rng = np.random.default_rng(0)
    ref = Reference(["x"], rng.normal(size=(1000, 1)))
    scores = []
    for _ in range(50):
        m = DriftMonitor(ref, window=100)
        for v in rng.normal(size=100):
            with m.lock:
                m.recent.append([float(v)])
            if len(m.recent) == 99:
                assert m.report()["score"] is None
        scores.append(m.report()["score"])
    assert sum(s < 0.25 for s in scores) >= 48, sorted(scores)[-5:]
    shifted = DriftMonitor(ref, window=100)
    for v in rng.normal(0.8, 1.0, size=100):
        shifted.recent.append([float(v)])
    assert shifted.report()["drifted"]


def _nifti_header_only(shape: tuple[int, ...]) -> bytes:
    """A .nii.gz whose header announces ``shape`` (uint8) but holds a few bytes of voxels."""
    import gzip

    import nibabel as nib

    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(np.uint8)
    h["vox_offset"] = 352
    raw = h.binaryblock + b"\0" * 4 + b"\0" * 64
    return gzip.compress(raw)


def test_medical_volumes_over_http_answer_what_cli_predict_writes(medical_run, medical_classifier_run, tmp_path):
    """Segmenter and classifier volumes, .nii.gz and .nii, raw and multipart: the rows of
    `cnnkit medical predict --json`; the segmenter's label volume comes back as a .nii.gz
    with the upload's affine, equal to the one `--save-dir` writes; hostile volumes are refused."""
    import gzip

    import nibabel as nib

    from cnnkit.cli.main import main
    from cnnkit.data.volumes import read_nifti, read_nifti_bytes, write_nifti
    from cnnkit.serve import load_models

    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    vol = np.random.default_rng(0).normal(size=(20, 45, 37)).astype(np.float32)
    scan = tmp_path / "in" / "scan.nii.gz"
    write_nifti(scan, vol, affine)
    gz = scan.read_bytes()
    plain = gzip.decompress(gz)  # the same volume as an uncompressed .nii
    assert main(["medical", "predict", "--weights", str(medical_run), "--source", str(scan.parent),
                 "--save-dir", str(tmp_path / "out"), "--json", str(tmp_path / "seg.json")]) == 0
    (seg_row,) = json.loads((tmp_path / "seg.json").read_text())
    seg_row.pop("labels")  # the file --save-dir wrote
    saved_labels, saved_affine = read_nifti(tmp_path / "out" / "scan.nii.gz")
    (cls_row,) = [r.to_dict() for r in cnnkit.load(medical_classifier_run)(str(scan))]

    models = load_models([f"seg={medical_run}", f"cls={medical_classifier_run}"])
    with running(models) as (url, _):
        listed = {m["name"]: m["task"] for m in httpx.get(f"{url}/v1/models").json()["models"]}
        assert listed == {"seg": "medical", "cls": "medical"}
        for body in (gz, plain):
            r = httpx.post(f"{url}/v1/models/seg/predict", content=body, timeout=120)
            assert r.status_code == 200, r.text
            (got,) = r.json()
            labels, got_affine = read_nifti_bytes(base64.b64decode(got.pop("labels_nifti")))
            assert np.array_equal(labels, saved_labels) and np.allclose(got_affine, affine)
            assert np.allclose(saved_affine, affine)
            got["path"] = seg_row["path"]
            assert got == seg_row
            r = httpx.post(f"{url}/v1/models/cls/predict", timeout=60,
                           files=[("file", ("scan.nii.gz", body, "application/gzip"))])
            assert r.status_code == 200, r.text
            (got,) = r.json()
            assert got["path"] == "scan.nii.gz" and got["shape"] == [20, 45, 37]
            got["path"] = cls_row["path"]
            assert same(got, cls_row)
        flat = tmp_path / "flat.nii"
        nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), str(flat))
        hostile = {
            "huge": (_nifti_header_only((2000, 2000, 2000)), 413, "too large"),
            "truncated": (gz[: len(gz) // 2], 422, "truncated"),
            "png": (_png(), 422, "not a NIfTI volume"),
            "flat": (flat.read_bytes(), 422, "not a 3-D volume"),
        }
        for what, (body, status, words) in hostile.items():
            r = httpx.post(f"{url}/v1/models/seg/predict", content=body, timeout=60)
            assert r.status_code == status and words in r.json()["detail"], (what, r.status_code, r.text)
        assert httpx.get(f"{url}/readyz").status_code == 200
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        counted = {s.labels["class_name"] for s in families["cnnkit_predicted_class"].samples
                   if s.labels.get("model") == "cls"}
        assert cls_row["label"] in counted


def test_a_compressed_volume_is_inflated_only_as_far_as_its_header_announces():
    """A zip bomb: a 100^3 uint8 volume followed by 256 MB of zeros (about 250 KB compressed)
    is read without holding the zeros in memory; a header announcing more voxels than the
    limit is refused before anything is inflated."""
    import tracemalloc
    import zlib

    import nibabel as nib

    from cnnkit.data.volumes import read_nifti_bytes
    from cnnkit.errors import ImageDecodeError

    h = nib.Nifti1Header()
    h.set_data_shape((100, 100, 100))
    h.set_data_dtype(np.uint8)
    h["vox_offset"] = 352
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = z.compress(h.binaryblock + b"\0" * 4 + (np.arange(10**6) % 256).astype(np.uint8).tobytes())
    zeros = b"\0" * 2**24
    bomb += b"".join(z.compress(zeros) for _ in range(16)) + z.flush()
    assert len(bomb) < 2**20
    tracemalloc.start()
    try:
        vol, _ = read_nifti_bytes(bomb, max_voxels=40_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert vol.shape == (100, 100, 100) and vol[0, 0, 1] == 1 and vol[0, 1, 0] == 100  # (k, j, i)
    assert peak < 64 * 2**20, peak  # the volume as bytes and float32, not the 256 MB of zeros
    with pytest.raises(ImageDecodeError, match="too large"):
        read_nifti_bytes(bomb, max_voxels=999_999)
