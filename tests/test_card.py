"""The typed model card: cards written before it (format 1, one per task, kept in tests/data)
still load and predict exactly as their format-2 translation; malformed cards are one sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cnnkit
from cnnkit.core.card import CARD_VERSION, ModelCard
from cnnkit.errors import ModelError

V1 = Path(__file__).parent / "data" / "cards_v1"
TASKS = ("classify", "multilabel", "detect", "instance", "segment", "medical")


def _inputs(card: ModelCard) -> list:
    rng = np.random.default_rng(0)
    if card.task == "medical":
        return [rng.normal(size=(20, 24, 28)).astype(np.float32)]
    shape = (40, 52) if card.input.channels == 1 else (40, 52, 3)
    return [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(2)]


@pytest.mark.parametrize("task", TASKS)
def test_format1_cards_load_and_predict_like_format2(task, tmp_path):
    from safetensors.torch import save_file

    from cnnkit.runtime.pipeline import pipeline_for

    raw = json.loads((V1 / f"{task}.json").read_text())
    assert raw["format"] == 1 and raw["task"] == task
    card = ModelCard.from_dict(raw)
    assert card.version == CARD_VERSION and card.classes == raw["classes"]
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card  # format 2 round trip
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in pipeline_for(card).build().state_dict().items()}
    for name, c in (("v1", raw), ("v2", card.to_dict())):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "best.safetensors"))
        (tmp_path / name / "best.json").write_text(json.dumps(c))
    a, b = cnnkit.load(tmp_path / "v1" / "best.safetensors"), cnnkit.load(tmp_path / "v2" / "best.safetensors")
    opts = {"conf": 0.001} if task in ("detect", "instance") else {}
    ra, rb = a(_inputs(card), **opts), b(_inputs(card), **opts)
    assert [r.to_dict() for r in ra] == [r.to_dict() for r in rb]


def test_card_fields_of_each_layout():
    cards = {t: ModelCard.from_dict(json.loads((V1 / f"{t}.json").read_text())) for t in TASKS}
    assert cards["classify"].input.resize == "resize" and cards["classify"].input.mean is not None
    assert cards["multilabel"].thresholds["per_class"] and cards["multilabel"].output.kind == "sigmoid"
    assert cards["detect"].input.resize == "letterbox" and cards["detect"].output.names == ("scores", "boxes")
    assert cards["instance"].output.names[-1] == "masks" and cards["instance"].thresholds["nms"] == "hard"
    assert cards["segment"].input.resize in ("resize", "tile") and cards["segment"].extra["ignore_index"] == 255
    assert cards["medical"].input.dims == 3 and cards["medical"].head == "segment"


def test_bad_cards_are_one_sentence(tmp_path):
    with pytest.raises(ModelError, match="lacks the task, arch or classes"):
        ModelCard.from_dict({"task": "classify"})
    with pytest.raises(ModelError, match="unknown task 'ocr'"):
        ModelCard.from_dict({"task": "ocr", "arch": "x", "classes": []})
    with pytest.raises(ModelError, match="has format 9; this cnnkit reads up to"):
        ModelCard.from_dict({"task": "classify", "arch": "x", "classes": [], "format": 9})
    with pytest.raises(ModelError, match="incomplete or malformed"):
        ModelCard.from_dict({"task": "classify", "arch": "x", "classes": ["a"], "preprocess": {"imgsz": 8}})
    run = tmp_path / "w"
    shutil.copytree(V1.parent / "cards_v1", run)
    (run / "best.safetensors").write_bytes(b"not safetensors")
    shutil.copy(run / "classify.json", run / "best.json")
    with pytest.raises(ModelError, match="unreadable"):
        cnnkit.load(run / "best.safetensors")
