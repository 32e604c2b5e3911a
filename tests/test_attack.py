"""Adversarial attacks (`cnnkit TASK attack`): FGSM and PGD against formulas written out by hand,
their budgets, and that they hurt a trained classifier, detector and segmenter; bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_classifier

from cnnkit.core.card import InputSpec, ModelCard
from cnnkit.methods import attack as A
from cnnkit.runtime.pipeline import pipeline_for


@pytest.fixture(scope="module")
def tiny():
    pipe, _, core, x = tiny_classifier(16, 6)
    with torch.no_grad():
        ref = (core(x),)
    return pipe, core, x, ref


def _loss(pipe, core, ref, targeted=None):
    return lambda a: pipe.attack_loss((core(a),), ref, targeted)


def _ce_grad(core, x, y):
    x = x.clone().requires_grad_(True)
    F.cross_entropy(core(x), y, reduction="sum").backward()
    return x.grad


def test_fgsm_is_one_signed_gradient_step(tiny):
    pipe, core, x, ref = tiny
    eps = 0.05
    got = A.perturb(_loss(pipe, core, ref), x, A.AttackConfig("fgsm", eps))
    want = (x + eps * _ce_grad(core, x, ref[0].argmax(1)).sign()).clamp(0, 1)
    torch.testing.assert_close(got, want)


def test_pgd_without_random_start_is_projected_gradient_ascent(tiny):
    pipe, core, x, ref = tiny
    eps, alpha, steps = 0.03, 0.01, 5
    got = A.perturb(_loss(pipe, core, ref), x, A.AttackConfig("pgd", eps, steps, alpha, random_start=False))
    y, adv = ref[0].argmax(1), x.clone()
    for _ in range(steps):
        adv = adv + alpha * _ce_grad(core, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(got, adv)


def test_targeted_pgd_descends_toward_the_class(tiny):
    pipe, core, x, ref = tiny
    got = A.perturb(_loss(pipe, core, ref, 2), x, A.AttackConfig("pgd", 0.03, 3, 0.01, random_start=False,
                                                                  targeted=2))
    y, adv = torch.full((len(x),), 2), x.clone()
    for _ in range(3):
        adv = adv - 0.01 * _ce_grad(core, adv, y).sign()
        adv = torch.min(torch.max(adv, x - 0.03), x + 0.03).clamp(0, 1)
    torch.testing.assert_close(got, adv)


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_its_ball_and_the_image_range(tiny, norm, eps):
    pipe, core, x, ref = tiny
    adv = A.perturb(_loss(pipe, core, ref), x, A.AttackConfig("pgd", eps, 10, norm=norm),
                    torch.Generator().manual_seed(0))
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all() and (size > 0.5 * eps).all()
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (pipe.attack_loss((core(adv),), ref) > pipe.attack_loss((core(x),), ref)).all()


def test_pgd_breaks_a_trained_classifier(digits_run, tmp_path, cli):
    js = tmp_path / "a.json"
    r = cli("classify", "attack", "--weights", str(digits_run), "--data", "digits", "--limit", "128", "--eps", "0.1",
            "--out", str(tmp_path / "pics"), "--json", str(js))
    assert r.code == 0, r.err
    res = json.loads(js.read_text())
    assert res["clean"] > 0.9 and res["attacked"] < res["clean"] - 0.5
    assert res["success_rate"] > 0.5 and res["mean_linf"] == pytest.approx(0.1, abs=1e-4)
    assert (tmp_path / "pics" / "pgd_linf.png").is_file()
    fgsm = cli("classify", "attack", "--weights", str(digits_run), "--data", "digits", "--limit", "128", "--eps",
               "0.1", "--method", "fgsm", "--out", str(tmp_path / "pics"), "--json", str(tmp_path / "f.json"))
    assert fgsm.code == 0
    assert json.loads((tmp_path / "f.json").read_text())["attacked"] > res["attacked"]  # PGD is the stronger


def test_objects_vanish_from_a_fitted_detector(fitted_detector, tmp_path):
    """Acceptance: an attack lowers a detector's mAP."""
    import cnnkit

    run, data = fitted_detector
    r = cnnkit.attack("detect", run, str(data), eps="8/255", out=str(tmp_path), verbose=False)
    assert r["metric"] == "map50_95" and r["clean"] > 0.5
    assert r["attacked"] < 0.5 * r["clean"] and r["success_rate"] > 0.5


def test_segmenter_under_targeted_attack(seg_run, seg_data, tmp_path):
    import cnnkit

    r = cnnkit.attack("segment", seg_run, str(seg_data), eps="16/255", targeted="1", out=str(tmp_path), verbose=False)
    clean, attacked = r["clean_metrics"], r["attacked_metrics"]
    assert attacked["pixel_acc"] < clean["pixel_acc"] and r["success_rate"] > 0


def test_cw_margin_is_the_true_logit_minus_the_best_other(tiny):
    pipe = tiny[0]
    logits = torch.tensor([[2.0, 5.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([1, 0])
    m = pipe.attack_margin((logits,), None, None, labels)
    torch.testing.assert_close(m, torch.tensor([5.0 - 2.0, 0.1 - 0.4]))
    toward = pipe.attack_margin((logits,), None, 3, labels)  # best other minus the target's
    torch.testing.assert_close(toward, torch.tensor([5.0 - 0.5, 0.3 - 0.4]))


def test_cw_keeps_the_smallest_success_and_leaves_failures_clean(tiny):
    """Each image is either overturned (its top class changed) or returned exactly clean; a
    larger c overturns at least as many, with larger changes."""
    pipe, core, x, ref = tiny

    def margin(a):
        return pipe.attack_margin((core(a),), ref)

    runs = {}
    for c in (0.05, 10.0):
        adv = A.perturb(None, x, A.AttackConfig("cw", steps=30, alpha=0.05, c=c), margin_fn=margin)
        with torch.no_grad():
            flipped = core(adv).argmax(1) != ref[0].argmax(1)
        same = (adv == x).flatten(1).all(1)
        assert (flipped | same).all() and adv.min() >= 0 and adv.max() <= 1
        runs[c] = (flipped, (adv - x).flatten(1).norm(dim=1))
    assert runs[10.0][0].sum() >= runs[0.05][0].sum() and runs[10.0][0].any()


def test_cw_breaks_a_trained_classifier_with_small_changes(digits_run, tmp_path, cli):
    js = tmp_path / "cw.json"
    r = cli("classify", "attack", "--weights", str(digits_run), "--data", "digits", "--limit", "64", "--method", "cw",
            "--steps", "30", "--c", "5", "--out", str(tmp_path / "pics"), "--json", str(js))
    assert r.code == 0, r.err
    res = json.loads(js.read_text())
    assert res["eps"] is None and res["c"] == 5.0 and res["norm"] == "l2" and res["steps"] == 30
    assert res["clean"] > 0.9 and res["attacked"] < res["clean"] - 0.5
    assert 0 < res["mean_l2"] < 2.0 and (tmp_path / "pics" / "cw_l2.png").is_file()
    assert "CW L2, c 5" in r.out


def test_cw_refuses_a_detector(fitted_detector, tmp_path, cli):
    run, data = fitted_detector
    r = cli("detect", "attack", "--weights", str(run), "--data", str(data), "--method", "cw", "--limit", "2",
            "--out", str(tmp_path))
    assert r.code == 2 and "--method cw and autoattack need a margin" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["--eps", "0"], "--eps must be in (0, 1]"),
    (["--eps", "2"], "--eps must be in (0, 1]"),
    (["--eps", "eight"], "--eps takes a number"),
    (["--targeted", "zebra"], "is not a class of this model"),
    (["--method", "deepfool"], "--method"),
])
def test_attack_bad_input(digits_run, tmp_path, cli, args, words):
    r = cli("classify", "attack", "--weights", str(digits_run), "--data", "digits", "--limit", "8", *args,
            "--out", str(tmp_path))
    assert r.code == 2, r.out + r.err
    assert words in r.err and "Traceback" not in r.err


def test_adversarial_training_hook_perturbs_in_pixel_space_and_keeps_bn_statistics():
    """The hook's batch is the clean batch moved at most eps in [0, 1] pixels (the classifier's
    data is normalized), with a higher loss, and the attack's passes leave BatchNorm alone."""
    from types import SimpleNamespace

    from cnnkit.engine.adversarial import AdversarialTraining, AttackConfig
    from cnnkit.tasks.classify.task import ClassifyTask

    torch.manual_seed(0)
    card = ModelCard("classify", "smallcnn", ["a", "b", "c"], InputSpec(16, 16, 1, mean=(0.3,), std=(0.4,)),
                     model_kwargs={"width": 8})
    model = pipeline_for(card).build().train()
    task = ClassifyTask(card.classes)
    pixels = torch.rand(8, 1, 16, 16)
    batch = {"images": (pixels - 0.3) / 0.4, "targets": torch.randint(0, 3, (8,))}
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    hook = AdversarialTraining(AttackConfig("pgd", 0.1, 3), (0.3,), (0.4,))
    trainer = SimpleNamespace(model=model, task=task)
    out = hook.before_step(trainer, batch)
    torch.testing.assert_close(bn.running_mean, before)
    moved = out["images"] * 0.4 + 0.3 - pixels
    assert moved.abs().max() <= 0.1 + 1e-5 and moved.abs().max() > 0.05
    with torch.no_grad():
        model.eval()
        clean = task.loss(task.forward(model, batch), batch)["loss"]
        adv = task.loss(task.forward(model, out), out)["loss"]
    assert adv > clean


def test_adversarial_training_raises_pgd_accuracy(digits_run, tmp_path):
    """Acceptance: a digits model trained on PGD examples holds up under PGD far better than the
    same recipe trained on clean images (3 epochs each; the full study is in BENCHMARKS.md)."""
    import cnnkit

    robust = tmp_path / "robust"
    cnnkit.train("classify", data="digits", epochs=3, adv="pgd", adv_eps="0.1", adv_steps=3, out=str(robust),
                 verbose=False)
    kw = {"eps": "0.1", "steps": 10, "limit": 128, "out": str(tmp_path / "pics"), "verbose": False}
    plain = cnnkit.attack("classify", digits_run, "digits", **kw)
    hard = cnnkit.attack("classify", robust, "digits", **kw)
    assert hard["attacked"] > plain["attacked"] + 0.2
    assert hard["clean"] > 0.8


def test_adv_option_errors(cli, tmp_path):
    for args, words in ((["--adv", "cw"], "--adv"), (["--adv", "pgd", "--adv-eps", "3"], "--adv-eps must be"),
                        (["--adv", "pgd", "--adv-steps", "0"], "--adv-steps must be")):
        r = cli("classify", "train", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "r"), *args)
        assert r.code == 2 and words in r.err and "Traceback" not in r.err, r.err
