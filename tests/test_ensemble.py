"""Ensembles (mean, vote) and test-time augmentation: the math, the CLI, and the accuracy gain."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from cnnkit.data.transforms import Preprocess
from cnnkit.errors import CnnkitError, ModelError
from cnnkit.methods.ensemble import (TTA, Ensemble, Standardize, View, build_ensemble, combine,
                                     ensemble_preprocess, parse_tta)

# Small digits runs, unsaturated on purpose (0.85-0.89 test top-1 after one epoch), so that
# members make different mistakes for the ensemble to fix. Measured on the seed triples (0, 1, 2),
# (3, 4, 5), (0, 2, 4) and (1, 3, 5): the mean ensemble gained +0.028 to +0.088 test top-1 over
# the average member and beat the best member every time (BENCHMARKS.md, "Ensembles"). At two
# epochs members reach 0.97-0.98 and the gain shrinks to 0-3 test images, too close to assert.
EPOCHS = 1
SEEDS = (0, 1, 2)


class Fixed(nn.Module):
    """A 'model' that returns the same logits for every input: ``(B, K)``."""

    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


# ---------------------------------------------------------------------------------------
# combine / Ensemble
# ---------------------------------------------------------------------------------------
def test_mean_is_the_log_of_averaged_probabilities():
    lp = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                       [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]],
                       [[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]]])  # (M=3, B=2, K=3) logits
    out = combine(lp, "mean")
    expect = lp.softmax(-1).mean(0)
    torch.testing.assert_close(out.exp(), expect)
    # image 0: one confident member outweighs two lukewarm ones in mean mode ...
    assert out.argmax(1).tolist() == [0, 2]
    # ... but not in vote mode, where members 2 and 3 agree on class 1
    assert combine(lp, "vote").argmax(1)[0].item() == 1


def test_vote_majority_tie_break_and_distribution():
    # 3 members, 1 image: two vote class 2 weakly, one votes class 0 with certainty
    lp = torch.tensor([[[9.0, 0.0, 0.0]], [[0.0, 1.0, 1.2]], [[0.0, 1.0, 1.2]]])
    v = combine(lp, "vote").exp()
    assert v.argmax(1).item() == 2
    assert combine(lp, "mean").argmax(1).item() == 0
    torch.testing.assert_close(v.sum(1), torch.ones(1))
    # the class with the most votes ranks first, then the one with one vote, then the one with none
    assert v[0].argsort(descending=True).tolist() == [2, 0, 1]

    # 2-2 tie between classes 0 and 1: the higher mean probability wins, whichever member order
    tie = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]], [[0.0, 5.0, 0.0]], [[0.0, 8.0, 0.0]]])
    assert combine(tie, "vote").argmax(1).item() == 1  # class 1's mean probability is higher
    assert combine(tie.flip(0), "vote").argmax(1).item() == 1
    tie2 = torch.tensor([[[8.0, 0.0, 0.0]], [[5.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]]])
    assert combine(tie2, "vote").argmax(1).item() == 0

    # vote shares: 2 of 4 votes -> about 0.5 of the probability
    assert abs(combine(tie, "vote").exp()[0, 1].item() - 0.5) < 1 / 8


def test_vote_never_lets_confidence_beat_a_majority():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        m = int(torch.randint(2, 7, (1,), generator=g))
        lp = torch.randn(m, 16, 5, generator=g) * 10  # very confident members
        votes = torch.nn.functional.one_hot(lp.argmax(-1), 5).sum(0)  # (B, K)
        winner = combine(lp, "vote").argmax(1)
        assert (votes.gather(1, winner[:, None]).squeeze(1) == votes.max(1).values).all()


def test_ensemble_module_and_bad_mode():
    a = Fixed([[2.0, 0.0], [0.0, 1.0]])
    b = Fixed([[0.0, 3.0], [0.0, 2.0]])
    ens = Ensemble([a, b], "mean")
    x = torch.zeros(2, 1, 4, 4)
    torch.testing.assert_close(ens(x).exp(), (a(x).softmax(1) + b(x).softmax(1)) / 2)
    assert ens.member_outputs(x).shape == (2, 2, 2)
    with pytest.raises(CnnkitError, match="mean, vote"):
        Ensemble([a, b], "median")
    with pytest.raises(CnnkitError, match="mean, vote"):
        combine(torch.zeros(1, 1, 2), "max")


def test_ensemble_goes_through_evaluate_like_a_model():
    from cnnkit.engine.trainer import evaluate
    from cnnkit.tasks.classify.task import ClassifyTask

    # member a is right on images 0-1, member b on 1-2, member c on 0 and 2: each 2/3 right;
    # the vote (and here the mean) gets all three right
    targets = torch.tensor([0, 1, 2])
    a = Fixed([[3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0]])
    b = Fixed([[0, 0, 3.0], [0, 3.0, 0], [0, 0, 3.0]])
    c = Fixed([[3.0, 0, 0], [0, 0, 3.0], [0, 0, 3.0]])
    loader = [{"images": torch.zeros(3, 1, 2, 2), "targets": targets}]
    task = ClassifyTask(["a", "b", "c"])
    tops = [evaluate(m, loader, task, torch.device("cpu"))[0]["top1"] for m in (a, b, c)]
    assert tops == pytest.approx([2 / 3] * 3)
    for mode in ("mean", "vote"):
        metrics, _, _ = evaluate(Ensemble([a, b, c], mode), loader, task, torch.device("cpu"))
        assert metrics["top1"] == pytest.approx(1.0)
    # decode sees probabilities that sum to one
    pred = task.decode(Ensemble([a, b, c], "mean")(torch.zeros(3, 1, 2, 2)))
    assert [p.label for p in pred] == ["a", "b", "c"]
    assert 0.5 < pred[0].score < 1.0


# ---------------------------------------------------------------------------------------
# TTA
# ---------------------------------------------------------------------------------------
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()


@torch.no_grad()
def test_tta_flip_on_symmetric_and_asymmetric_inputs():
    net = _net()
    a = torch.rand(2, 1, 8, 8)
    sym = a + a.flip(-1)  # left-right symmetric
    tta = TTA(net, "flip")
    assert [v.name for v in tta.views] == ["identity", "hflip"]
    torch.testing.assert_close(tta(sym), net(sym).log_softmax(1))
    # on an asymmetric input the two views differ and TTA is their probability average
    assert not torch.allclose(net(a), net(a.flip(-1)))
    torch.testing.assert_close(tta(a).exp(), (net(a).softmax(1) + net(a.flip(-1)).softmax(1)) / 2)
    # TTA over an ensemble is a model like any other
    ens_tta = TTA(Ensemble([net, _net()], "mean"), "flip")
    torch.testing.assert_close(ens_tta(sym).exp().sum(1), torch.ones(2))


def test_scale_views_keep_shape_zoom_and_pad_with_the_border():
    x = torch.zeros(1, 1, 20, 20)
    x[..., 6:14, 6:14] = 1.0  # an 8-px square in the middle of a black image
    big, small = View(scale=1.5)(x), View(scale=0.5)(x)
    assert big.shape == small.shape == x.shape
    # zoom in: the square grows (about 12 px wide); zoom out: it shrinks (about 4 px)
    assert (big[0, 0, 10] > 0.5).sum() == 12
    assert (small[0, 0, 10] > 0.5).sum() == 4
    # padding repeats the border, so the black background stays black (not the mean grey)
    assert small[..., 0, :].abs().max() == 0 and small[..., :, 0].abs().max() == 0
    torch.testing.assert_close(View(scale=0.7)(torch.full((1, 3, 16, 16), 0.3)), torch.full((1, 3, 16, 16), 0.3))
    # flips
    y = torch.arange(6.0).view(1, 1, 2, 3)
    assert View(hflip=True)(y)[0, 0, 0].tolist() == [2.0, 1.0, 0.0]
    assert View(vflip=True)(y)[0, 0, :, 0].tolist() == [3.0, 0.0]


def test_parse_tta_names_combinations_and_errors():
    assert [v.name for v in parse_tta(None)] == ["identity"]
    assert [v.name for v in parse_tta("none")] == ["identity"]
    assert [v.name for v in parse_tta("scale")] == ["identity", "scale0.9", "scale1.1"]
    assert [v.name for v in parse_tta("scale=0.2")] == ["identity", "scale0.8", "scale1.2"]
    assert [v.name for v in parse_tta("scale=0.85:1.2")] == ["identity", "scale0.85", "scale1.2"]
    assert len(parse_tta("flip,vflip,scale")) == 2 * 2 * 3
    assert [v.name for v in parse_tta(" flip , vflip ")] == ["identity", "vflip", "hflip", "hflip+vflip"]
    with pytest.raises(CnnkitError, match="unknown --tta view 'flp'; did you mean 'flip'"):
        parse_tta("flp")
    with pytest.raises(CnnkitError, match="did you mean 'scale'"):
        parse_tta("flip,scael")
    with pytest.raises(CnnkitError, match="choose from flip, vflip, scale"):
        parse_tta("rotate")
    for bad in ("scale=2", "scale=x", "scale=0:1", "scale=1:2:3"):
        with pytest.raises(CnnkitError, match="scale"):
            parse_tta(bad)
    with pytest.raises(CnnkitError, match="takes no value"):
        parse_tta("flip=0.5")


# ---------------------------------------------------------------------------------------
# Members with different preprocessing
# ---------------------------------------------------------------------------------------
class MeanPixel(nn.Module):
    """Logits ``[mean, -mean]`` of the input: sees exactly what preprocessing produced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return torch.stack([m, -m], 1)


@torch.no_grad()
def test_members_with_different_preprocessing_get_their_own_inputs():
    pa = Preprocess(16, (0.3,), (0.2,), 1)
    pb = Preprocess(8, (0.5,), (0.1,), 1)
    pre, adapt = ensemble_preprocess([pa, pb])
    assert adapt and pre.imgsz == 16 and pre.mean == (0.0,) and pre.std == (1.0,)
    assert ensemble_preprocess([pa, Preprocess(16, (0.3,), (0.2,), 1)]) == (pa, False)

    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 30, 30), dtype=np.uint8))
    x = pre(img)[None]
    # the member at the largest size sees what it would see alone
    torch.testing.assert_close(Standardize(MeanPixel(), pa)(x), MeanPixel()(pa(img)[None]), atol=1e-5, rtol=0)
    # the smaller member gets its size and its normalization (up to resize rounding)
    torch.testing.assert_close(Standardize(MeanPixel(), pb)(x), MeanPixel()(pb(img)[None]), atol=0.05, rtol=0)

    module, inp = build_ensemble([MeanPixel(), MeanPixel()], [pa, pb], "mean", "flip")
    assert isinstance(module, Ensemble) and inp == pre
    assert all(isinstance(m, TTA) and isinstance(m.model, Standardize) for m in module.members)
    # one member, no TTA: the model itself with its own preprocessing
    single = MeanPixel()
    assert build_ensemble([single], [pa]) == (single, pa)

    with pytest.raises(ModelError, match="member 2 takes 3-channel images but member 1 takes 1"):
        ensemble_preprocess([pa, Preprocess(16, (0.3,) * 3, (0.2,) * 3, 3)])
    with pytest.raises(ModelError, match="member 2 takes an observation-mask channel"):
        ensemble_preprocess([pa, Preprocess(16, (0.3,), (0.2,), 1, mask_channel=True)])


# ---------------------------------------------------------------------------------------
# The command line and the API on trained digits models
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> list[Path]:
    """Three short digits runs that differ only by seed."""
    import cnnkit

    root = tmp_path_factory.mktemp("ensemble")
    runs = []
    for seed in SEEDS:
        out = root / f"digits-s{seed}"
        cnnkit.train("classify", data="digits", epochs=EPOCHS, seed=seed, out=str(out), verbose=False)
        runs.append(out)
    return runs


def test_cli_val_ensemble_writes_members(cli, digits_runs, tmp_path):
    a, b, c = digits_runs
    out = tmp_path / "val.json"
    r = cli("classify", "val", "--weights", a, b, c, "--data", "digits", "--split", "test",
            "--ensemble", "mean", "--json", out)
    assert r.code == 0, r.err
    assert "ensemble of 3 (mean)" in r.out
    res = json.loads(out.read_text())
    members = [str(p / "weights" / "best.safetensors") for p in digits_runs]
    assert res["ensemble"] == {"mode": "mean", "members": members}
    assert res["weights"] == members and res["num_images"] == 270 and "tta" not in res
    assert len(res["members_top1"]) == 3
    assert res["mean_member_top1"] == pytest.approx(sum(res["members_top1"]) / 3)

    # each member's top-1 is what `val` reports for it alone; one weights file is the old val
    singles = []
    for p in digits_runs:
        one = tmp_path / "one.json"
        assert cli("classify", "val", "--weights", p, "--data", "digits", "--split", "test", "--json", one).code == 0
        singles.append(json.loads(one.read_text()))
    assert [s["top1"] for s in singles] == pytest.approx(res["members_top1"])
    assert singles[0]["weights"] == members[0]
    assert not {"ensemble", "members_top1", "mean_member_top1", "tta"} & set(singles[0])

    # repeated flags work too, and vote mode plus TTA are recorded
    r = cli("classify", "val", "--weights", a, "--weights", b, c, "--data", "digits", "--split", "test",
            "--ensemble", "vote", "--tta", "scale", "--json", out)
    assert r.code == 0, r.err
    res = json.loads(out.read_text())
    assert res["ensemble"]["mode"] == "vote" and len(res["ensemble"]["members"]) == 3
    assert res["tta"] == ["identity", "scale0.9", "scale1.1"]


def test_cli_predict_ensemble_follows_the_majority(cli, digits_runs, tmp_path):
    from cnnkit import load
    from cnnkit.data.digits import digits_arrays

    images, labels = digits_arrays("test")
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(40):
        Image.fromarray(np.asarray(images[i]).squeeze()).save(src / f"{i:02d}.png")
    out = tmp_path / "preds.json"
    r = cli("classify", "predict", "--weights", *digits_runs, "--source", src, "--ensemble", "vote",
            "--json", out, "--topk", "3")
    assert r.code == 0, r.err
    assert "ensemble of 3 (vote)" in r.out
    preds = {Path(p["path"]).name: p for p in json.loads(out.read_text())}
    assert len(preds) == 40
    alone = [{Path(p.path).name: p.label for p in load(run).predict(sorted(src.glob("*.png")))}
             for run in digits_runs]
    checked = 0
    for name, p in preds.items():
        assert 0 < p["score"] <= 1 and len(p["topk"]) == 3
        votes = [m[name] for m in alone]
        top = max(set(votes), key=votes.count)
        if votes.count(top) >= 2:
            assert p["label"] == top, (name, votes, p)
            checked += 1
    assert checked >= 35


def test_mismatched_members_and_bad_options_exit_2(cli, digits_runs, tmp_path):
    a = digits_runs[0]
    other = tmp_path / "other"
    shutil.copytree(a / "weights", other / "weights")
    card_file = other / "weights" / "best.json"
    card = json.loads(card_file.read_text())
    card["classes"] = list(reversed(card["classes"]))
    card_file.write_text(json.dumps(card))
    r = cli("classify", "val", "--weights", a, other, "--data", "digits")
    assert r.code == 2 and "Traceback" not in r.err
    assert r.err.strip().startswith("Error: weights '") and \
        "ensemble members need the same classes in the same order" in r.err
    assert len(r.err.strip().splitlines()) == 1

    r = cli("classify", "predict", "--weights", a, other, "--source", tmp_path)
    assert r.code == 2 and "same classes in the same order" in r.err

    r = cli("classify", "val", "--weights", a, "--data", "digits", "--tta", "flp")
    assert r.code == 2 and "did you mean 'flip'" in r.err
    r = cli("classify", "val", "--weights", a, a, "--data", "digits", "--ensemble", "median")
    assert r.code == 2 and "median" in r.err
    r = cli("classify", "val", "--weights", "--data", "digits")
    assert r.code == 2


def test_python_api_val_and_load_ensemble(digits_runs):
    import cnnkit
    from cnnkit.methods.ensemble import load_ensemble

    res = cnnkit.val("classify", [str(p) for p in digits_runs], "digits", split="test", ensemble="vote",
                     verbose=False)
    assert res["ensemble"]["mode"] == "vote"
    model = load_ensemble(digits_runs, tta="scale")
    assert model.card.extra["ensemble"]["mode"] == "mean" and len(model.card.extra["tta"]) == 3
    x, _ = model.pipeline.preprocess([np.zeros((8, 8), np.uint8)])
    assert torch.allclose(model.raw(x)[0].exp().sum(1), torch.ones(1))
    # a list of one is exactly `load`
    assert load_ensemble([digits_runs[0]]).model.__class__.__name__ != "Ensemble"


def test_ensemble_beats_its_average_member(digits_runs):
    """THE claim of the issue: three small models together beat the average one of them."""
    from cnnkit import val

    paths = [str(p) for p in digits_runs]
    mean = val("classify", paths, "digits", split="test", ensemble="mean", verbose=False)
    vote = val("classify", paths, "digits", split="test", ensemble="vote", verbose=False)
    members = mean["members_top1"]
    assert vote["members_top1"] == pytest.approx(members)
    print(f"members {members} mean member {mean['mean_member_top1']:.4f} ensemble mean {mean['top1']:.4f} "
          f"vote {vote['top1']:.4f}")
    # measured gains over the average member were +0.028 or more (mean) and +0.021 or more (vote)
    assert mean["top1"] > mean["mean_member_top1"] + 0.015
    assert mean["top1"] > max(members)
    assert vote["top1"] > mean["mean_member_top1"] + 0.01
    # its probabilities are at least as good as its members' on average: the log-loss of an
    # average of distributions is at most the average log-loss (log is concave)
    member_losses = [json.loads((Path(p) / "results.json").read_text())["test"]["loss"] for p in paths]
    assert math.isfinite(mean["loss"]) and mean["loss"] <= sum(member_losses) / 3 + 1e-6
