"""Classification techniques: losses, samplers, label tools, freezing, layer decay, cyclic LR,
snapshots, mixup. Each test checks a formula or an invariant a wrong implementation breaks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit.data.sampling import (ClassBalancedSampler, LabelView, bootstrap, class_counts, class_weights,
                                  long_tail, make_sampler, noisy_labels)
from cnnkit.errors import CnnkitError
from cnnkit.tasks.losses import classification_loss, per_sample_loss, target_distribution


# ---- losses --------------------------------------------------------------------------------
@pytest.fixture
def logits_targets():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=g) * 2, torch.randint(0, 5, (16,), generator=g)


def test_ce_matches_torch_with_smoothing(logits_targets):
    x, y = logits_targets
    ours = classification_loss(x, y, "ce", label_smoothing=0.1)
    assert torch.allclose(ours, F.cross_entropy(x, y, label_smoothing=0.1), atol=1e-6)


def test_soft_targets_match_torch(logits_targets):
    x, y = logits_targets
    t = torch.softmax(torch.randn(16, 5), 1)
    assert torch.allclose(classification_loss(x, t, "ce"), F.cross_entropy(x, t), atol=1e-6)


def test_focal_formula(logits_targets):
    x, y = logits_targets
    assert torch.allclose(classification_loss(x, y, "focal", gamma=0.0), F.cross_entropy(x, y), atol=1e-6)
    p = x.softmax(1).gather(1, y[:, None]).squeeze(1)
    expected = (-(1 - p) ** 2 * p.log()).mean()
    assert torch.allclose(classification_loss(x, y, "focal", gamma=2.0), expected, atol=1e-6)


def test_gce_and_sce_formulas(logits_targets):
    x, y = logits_targets
    p = x.softmax(1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(classification_loss(x, y, "gce", q=0.7), ((1 - p ** 0.7) / 0.7).mean(), atol=1e-6)
    # q -> 0 gives cross-entropy; q = 1 gives MAE-like 1 - p
    assert torch.allclose(classification_loss(x, y, "gce", q=1e-4), F.cross_entropy(x, y), atol=1e-3)
    # SCE: 0.1 CE + RCE, where RCE = -sum_k p_k log clamp(onehot, 1e-4) = -log(1e-4) (1 - p_y)
    rce = -math.log(1e-4) * (1 - p)
    expected = 0.1 * F.cross_entropy(x, y, reduction="none") + rce
    assert torch.allclose(classification_loss(x, y, "sce"), expected.mean(), atol=1e-5)


def test_ohem_keeps_the_hardest(logits_targets):
    x, y = logits_targets
    per = F.cross_entropy(x, y, reduction="none")
    expected = per.topk(4).values.mean()
    assert torch.allclose(classification_loss(x, y, "ce", ohem=0.25), expected, atol=1e-6)


def test_class_weights_scale_each_sample(logits_targets):
    x, y = logits_targets
    w = torch.arange(1, 6, dtype=torch.float32)
    per = F.cross_entropy(x, y, reduction="none") * w[y]
    assert torch.allclose(classification_loss(x, y, "ce", weight=w), per.mean(), atol=1e-6)


def test_target_distribution_rows_sum_to_one():
    t = target_distribution(torch.tensor([0, 2]), 3, 0.3)
    assert torch.allclose(t.sum(1), torch.ones(2)) and t[0, 0] == pytest.approx(0.8)


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss"):
        per_sample_loss(torch.zeros(1, 2), torch.ones(1, 2) / 2, "hinge")


# ---- label tools and samplers --------------------------------------------------------------
def test_long_tail_profile():
    y = np.repeat(np.arange(10), 100)
    idx = long_tail(y, 10, 0.05, seed=0)
    counts = class_counts(y[idx], 10)
    assert counts[0] == 100 and counts[9] == 5
    assert all(counts[i] >= counts[i + 1] for i in range(9))
    assert idx == long_tail(y, 10, 0.05, seed=0) and idx != long_tail(y, 10, 0.05, seed=1)


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_noisy_labels(kind):
    y = np.repeat(np.arange(10), 100)
    noisy = np.array(noisy_labels(y, 10, 0.4, kind, seed=3))
    changed = noisy != y
    assert changed.sum() == 400  # exactly 40%, none "flipped" to the true class
    if kind == "pairflip":
        assert np.all(noisy[changed] == (y[changed] + 1) % 10)
    else:
        assert len(np.unique(noisy[changed & (y == 0)])) > 5  # spread over many classes


def test_noisy_labels_errors():
    with pytest.raises(CnnkitError, match="noise-type"):
        noisy_labels([0, 1], 2, 0.2, "uniform")


def test_label_view_keeps_attributes():
    class Base(torch.utils.data.Dataset):
        classes, channels, name, default_imgsz = ["a", "b"], 1, "x", 8
        targets = [0, 1, 1]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((1, 2, 2), i), self.targets[i]

    v = LabelView(Base(), [2, 0], [0, 1])
    assert v.targets == [0, 1] and v.classes == ["a", "b"] and v[0][0][0, 0, 0] == 2 and v[0][1] == 0


@pytest.mark.parametrize("mode", ["oversample", "undersample"])
def test_class_balanced_sampler(mode):
    y = [0] * 50 + [1] * 10 + [2] * 5
    g = torch.Generator().manual_seed(0)
    s = ClassBalancedSampler(y, 3, mode, g)
    idx = list(s)
    counts = np.bincount(np.array(y)[idx], minlength=3)
    n = 50 if mode == "oversample" else 5
    assert len(idx) == len(s) == 3 * n and counts.tolist() == [n, n, n]
    g.manual_seed(0)
    assert list(s) == idx  # reseeding replays the epoch (resume)


def test_weighted_sampler_balances_in_expectation():
    y = [0] * 900 + [1] * 100
    g = torch.Generator().manual_seed(0)
    idx = [i for _ in range(5) for i in make_sampler("weighted-sampler", y, 2, g)]
    share = np.mean(np.array(y)[idx] == 1)
    assert 0.45 < share < 0.55


def test_class_weights():
    y = [0] * 90 + [1] * 10
    w = class_weights(y, 2, "inverse")
    assert w[1] / w[0] == pytest.approx(9.0) and w.mean() == pytest.approx(1.0)
    cb = class_weights(y, 2, "effective", beta=0.99)
    expected = (1 - 0.99) / (1 - 0.99 ** torch.tensor([90.0, 10.0]))
    assert cb[1] / cb[0] == pytest.approx(float(expected[1] / expected[0]), rel=1e-5)


def test_bootstrap_has_repeats():
    idx = bootstrap(1000, seed=0)
    assert len(idx) == 1000 and 550 < len(set(idx)) < 720  # about 63.2% unique


# ---- fine-tuning: groups, freezing, layer decay, cyclic LR, snapshots, mixup ----------------
from cnnkit.models import create_model  # noqa: E402
from cnnkit.models.finetune import frozen_names, layer_decay_scales, num_stages, parameter_groups  # noqa: E402


@pytest.mark.parametrize("arch,stages", [("smallcnn", 4), ("resnet18", 4), ("efficientnet_b0", 5)])
def test_parameter_groups_cover_every_parameter_once(arch, stages):
    m = create_model(arch, 3, 3)
    groups = parameter_groups(m)
    names = [n for g in groups for n in g]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters())
    assert num_stages(m) == stages
    head = {n for n, _ in m.get_classifier().named_parameters()}
    assert {n.split(".")[-1] for n in groups[-1]} == head


def test_freeze_specs():
    m = create_model("resnet18", 3, 3)
    body = {n for n, _ in m.named_parameters() if not n.startswith("fc.")}
    assert frozen_names(m, "backbone") == body
    two = frozen_names(m, "2")
    assert "conv1.weight" in two and any(n.startswith("layer2.") for n in two)
    assert not any(n.startswith("layer3.") for n in two)
    with pytest.raises(CnnkitError, match="4 stages"):
        frozen_names(m, 5)


def test_freeze_a_segmenter_freezes_its_encoder_only():
    """Wrappers (segmenters, detectors) have no feature_info of their own: --freeze reaches
    the registry encoder inside, the decoder stays trainable and one step trains it."""
    from cnnkit.models.finetune import set_frozen
    from cnnkit.models.segmentation import build_segmenter

    m = build_segmenter("unet", 3, 3, "smallcnn")
    enc = "encoder.features.body."
    groups = parameter_groups(m)
    assert sorted(n for g in groups for n in g) == sorted(n for n, _ in m.named_parameters())
    assert all(n.startswith(enc) for g in groups[:-1] for n in g)
    assert groups[-1] and not any(n.startswith(enc) for n in groups[-1])
    frozen = frozen_names(m, "backbone")
    assert frozen == {n for n, _ in m.named_parameters() if n.startswith(enc)}
    assert frozen_names(m, 1) < frozen and num_stages(m) == 4
    set_frozen(m, frozen)
    out = m(torch.rand(2, 3, 32, 32))
    out.mean().backward()  # would raise if nothing required a gradient
    grads = {n: p.grad is not None for n, p in m.named_parameters()}
    assert not any(grads[n] for n in frozen) and all(grads[n] for n in groups[-1])


def test_freeze_that_leaves_nothing_is_refused():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(CnnkitError, match="would freeze every parameter"):
        frozen_names(m, "backbone")


def test_layer_decay_scales():
    m = create_model("smallcnn", 3, 1)
    s = layer_decay_scales(m, 0.5)
    assert s["fc.weight"] == 1.0 and s["stages.3.1.0.weight"] == 0.5 and s["stem.0.weight"] == 0.5 ** 5


def _toy_loaders(n=64, k=3, seed=0):
    from cnnkit.data.classification import make_loader

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.arange(n) % k
    x[:, 0, :4, :4] += y[:, None, None].float() * 2  # learnable
    items = [(x[i], int(y[i])) for i in range(n)]
    from cnnkit.tasks.classify.task import ClassifyTask

    task = ClassifyTask([str(i) for i in range(k)])
    tl = make_loader(items, 16, True, 0, task.collate, torch.Generator().manual_seed(seed))
    vl = make_loader(items, 32, False, 0, task.collate)
    return task, tl, vl


def _trainer(tmp_path=None, hooks=(), batch_transforms=(), **cfg_kw):
    from cnnkit.engine.config import TrainConfig
    from cnnkit.engine.trainer import Trainer

    task, tl, vl = _toy_loaders()
    cfg = TrainConfig(**{"epochs": 2, "lr": 1e-2, "warmup_epochs": 0, **cfg_kw})
    cfg.validate()
    model = create_model("smallcnn", 3, 1, width=8)
    return Trainer(task, model, tl, vl, cfg, torch.device("cpu"), tmp_path, {"task": "classify"},
                   list(hooks), list(batch_transforms))


def test_freeze_backbone_keeps_backbone_and_bn_stats():
    from cnnkit.engine.hooks import Freeze

    tr = _trainer(hooks=[Freeze("backbone")])
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.fit()
    after = tr.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # weights AND BN running stats of the body untouched


def test_unfreeze_at_releases_the_backbone():
    from cnnkit.engine.hooks import Freeze

    tr = _trainer(hooks=[Freeze("2", unfreeze_at=1)], epochs=1)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.fit()
    mid = {k: v.clone() for k, v in tr.model.state_dict().items()}
    assert torch.equal(before["stem.0.weight"], mid["stem.0.weight"])
    assert not torch.equal(before["stages.2.1.0.weight"], mid["stages.2.1.0.weight"])  # stage 3 trains
    tr.cfg.epochs = 2
    tr.fit()
    assert not torch.equal(mid["stem.0.weight"], tr.model.state_dict()["stem.0.weight"])


def test_layer_decay_sets_group_lrs():
    tr = _trainer(layer_decay=0.5)
    lrs = sorted({g["lr"] for g in tr.optimizer.param_groups}, reverse=True)
    assert lrs[0] == pytest.approx(1e-2) and lrs[1] == pytest.approx(5e-3) and lrs[-1] == pytest.approx(1e-2 * 0.5 ** 5)


def test_cyclic_schedule_and_snapshots(tmp_path):
    from cnnkit.engine.hooks import Snapshots

    tr = _trainer(tmp_path, hooks=[Snapshots(2)], epochs=4, schedule="cyclic", snapshots=2)
    tr.fit()
    lr = np.array(tr.lr_history)
    per_cycle = len(lr) // 2
    assert lr[0] == pytest.approx(1e-2) and lr[per_cycle] == pytest.approx(1e-2)  # restart
    assert lr[per_cycle - 1] < 2e-4 and lr[-1] < 2e-4  # each cycle ends near zero
    assert (tmp_path / "weights" / "snapshot1.safetensors").exists()
    assert (tmp_path / "weights" / "snapshot2.safetensors").exists()


def test_cyclic_needs_snapshots():
    from cnnkit.engine.config import TrainConfig

    with pytest.raises(CnnkitError, match="go together"):
        TrainConfig(schedule="cyclic").validate()
    with pytest.raises(CnnkitError, match="divide"):
        TrainConfig(schedule="cyclic", snapshots=3, epochs=10).validate()


def test_batch_mix_soft_targets():
    from cnnkit.data.mix import BatchMix

    torch.manual_seed(0)
    batch = {"images": torch.rand(8, 3, 8, 8), "targets": torch.arange(8) % 4}
    out = BatchMix(4, mixup=0.4)(batch)
    t = out["targets"]
    assert t.shape == (8, 4) and torch.allclose(t.sum(1), torch.ones(8))
    lam = t[0, 0].item()  # image 0 is lam * x0 + (1 - lam) * x_rolled
    assert torch.allclose(out["images"][0], lam * batch["images"][0] + (1 - lam) * batch["images"][7], atol=1e-5)
    tr = _trainer(batch_transforms=[BatchMix(3, cutmix=1.0)], epochs=1)
    tr.fit()
    assert math.isfinite(tr.history[-1]["train_loss"])


# ---- missing data and channel conversion ---------------------------------------------------
@pytest.mark.parametrize("mode", ["pixel", "patch"])
def test_missing_mask_share(mode):
    from cnnkit.data.missing import missing_mask

    g = torch.Generator().manual_seed(0)
    m = missing_mask((64, 64), 0.3, mode, generator=g)
    share = 1 - m.mean().item()
    assert set(m.unique().tolist()) <= {0.0, 1.0} and 0.25 < share < 0.4
    assert missing_mask((64, 64), 0.0, mode).min() == 1


def test_drop_pixels_mask_channel_marks_the_holes():
    from cnnkit.data.missing import DropPixels

    torch.manual_seed(0)
    x = torch.randn(3, 32, 32) + 5  # no natural zeros
    out = DropPixels(0.4, "patch", mask_channel=True)(x)
    assert out.shape == (4, 32, 32)
    holes = out[3] == 0
    assert holes.any() and torch.all(out[:3, holes] == 0) and torch.equal(out[:3, ~holes], x[:, ~holes])
    assert DropPixels(0.4, "pixel")(x).shape == (3, 32, 32)


def test_preprocess_mask_channel_round_trip():
    from cnnkit.data.transforms import Preprocess

    pre = Preprocess(16, (0.5,), (0.25,), 1, mask_channel=True)
    assert Preprocess.from_dict(pre.to_dict()) == pre and pre.model_channels == 2
    out = pre.eval_transform()(torch.zeros(1, 8, 8, dtype=torch.uint8))
    assert out.shape == (2, 16, 16) and torch.all(out[1] == 1)


def test_channel_view_gray_to_rgb():
    from cnnkit.data.classification import load_classification_data

    d = load_classification_data("digits", channels=3)
    img, label = d.split("train")[0]
    assert d.channels == 3 and img.shape[0] == 3 and torch.equal(img[0], img[2])


def test_missing_curve_cli(digits_run, cli, tmp_path):
    png, js = tmp_path / "curve.png", tmp_path / "curve.json"
    r = cli("classify", "val", "--weights", digits_run, "--data", "digits", "--missing", "0,0.5",
            "--plot", png, "--json", js)
    assert r.code == 0, r.err
    import json

    d = json.loads(js.read_text())
    (curve,) = d["top1"].values()
    assert curve[0] > curve[1] + 0.05  # half the image gone hurts a model never trained for it
    assert png.stat().st_size > 5000
