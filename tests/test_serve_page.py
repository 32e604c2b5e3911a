"""The web page at `/` in a real headless Chromium (Debian's, driven by Playwright): pick an
image, the result is drawn, and a screenshot is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from servers import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags a sandboxed, offline machine needs (no background connections, no GPU, no setuid sandbox as root)
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (`make browser` installs Debian's chromium with apt)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency: make install")
    with playwright.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.mark.parametrize("fixture", ["tiny_run", "instance_run", "digits_run", "seg_run"])
def test_page_draws_the_result_of_a_picked_image(browser, fixture, request, tmp_path):
    import numpy as np
    from PIL import Image
    from task_inputs import task_images

    from cnnkit.serve import load_models

    run = request.getfixturevalue(fixture)
    models = load_models([f"m={run}"])
    image = Path(task_images(fixture, request, tmp_path)[0])
    out = Path(request.config.rootpath) / "tests" / "artifacts"
    out.mkdir(exist_ok=True)
    shot = out / f"serve_page_{models['m'].task}.png"
    with running(models) as (url, _):
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#model option", state="attached")
        assert page.inner_text("#task").startswith(models["m"].task)
        if models["m"].task in ("detect", "instance"):
            page.fill("#conf", "0")  # two-epoch detectors score low: draw everything they find
        page.set_input_files("#file", str(image))
        page.wait_for_selector("body[data-state=drawn]", timeout=30_000)
        stages = page.inner_text("#timing")
        assert "inference" in stages and "queue" in stages
        w, h = page.eval_on_selector("#view", "c => [c.width, c.height]")
        src = Image.open(image)
        assert (w, h) == src.size  # drawn at the image's own size
        page.screenshot(path=str(shot), full_page=True)
        if models["m"].task in ("detect", "instance"):  # boxes listed and drawn: the canvas is not the picture
            assert page.locator("#result tr").count() > 0
            pixels = page.eval_on_selector("#view", "c => Array.from(c.getContext('2d').getImageData(0, 0, "
                                                   "c.width, c.height).data)")
            drawn = np.array(pixels, np.uint8).reshape(h, w, 4)[..., :3]
            assert (drawn != np.asarray(src.convert("RGB"))).any()
        assert page.inner_text("#result").strip()
        assert not errors, errors
        page.close()
    assert shot.stat().st_size > 10_000


def test_page_shows_a_volume_answer(browser, medical_run, tmp_path, request):
    """A medical segmenter: the page takes a .nii.gz and lists the voxels of every class."""
    import numpy as np

    from cnnkit.data.volumes import write_nifti
    from cnnkit.serve import load_models

    scan = tmp_path / "scan.nii.gz"
    write_nifti(scan, np.random.default_rng(0).normal(size=(20, 45, 37)).astype(np.float32))
    models = load_models([f"m={medical_run}"])
    shot = Path(request.config.rootpath) / "tests" / "artifacts" / "serve_page_medical.png"
    shot.parent.mkdir(exist_ok=True)
    with running(models) as (url, _):
        page = browser.new_page(viewport={"width": 1100, "height": 500})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#model option", state="attached")
        assert page.inner_text("#task").startswith("medical") and ".nii.gz" in page.inner_text("#drop")
        page.set_input_files("#file", str(scan))
        page.wait_for_selector("body[data-state=drawn]", timeout=30_000)
        listed = page.inner_text("#result")
        expected = models["m"](str(scan))[0].to_dict()["voxels"]
        for name, n in expected.items():
            assert f"{name} ({n} voxels)" in listed
        page.screenshot(path=str(shot), full_page=True)
        assert not errors, errors
        page.close()
