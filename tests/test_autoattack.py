"""AutoAttack's four attacks (`cnnkit classify attack --method autoattack`): the DLR losses by
hand, FAB's boundary projection against the distance worked out for a linear model, the Square
attack breaking a model whose gradients are zero where APGD and FAB cannot, and the whole
ensemble through `cnnkit classify attack`. Parity of robust accuracy with torchattacks'
AutoAttack is measured in benchmarks/attack_torchattacks.py (torchattacks is not a dependency)."""

from __future__ import annotations

import json

import pytest
import torch

from cnnkit.engine import autoattack as AA


def test_dlr_losses_by_hand():
    z = torch.tensor([[2.0, 5.0, -1.0, 0.5], [4.0, 1.0, 3.0, 0.0]])
    y = torch.tensor([1, 0])
    # untargeted: (best other - true) / (first - third)
    torch.testing.assert_close(AA.dlr_loss(z, y), torch.tensor([(2.0 - 5.0) / (5.0 - 0.5), (3.0 - 4.0) / (4.0 - 1.0)]))
    # targeted: (target - true) / (first - (third + fourth) / 2)
    t = torch.tensor([3, 2])
    torch.testing.assert_close(AA.dlr_targeted_loss(z, y, t),
                               torch.tensor([(0.5 - 5.0) / (5.0 - 0.5 * (0.5 - 1.0)),
                                             (3.0 - 4.0) / (4.0 - 0.5 * (1.0 + 0.0))]))
    # two classes: the denominators fall back to the lowest score instead of failing
    two = torch.tensor([[1.0, -1.0]])
    torch.testing.assert_close(AA.dlr_targeted_loss(two, torch.tensor([0]), torch.tensor([1])), torch.tensor([-1.0]))


def _linear(w: torch.Tensor, b: torch.Tensor):
    """Logits ``w @ x + b`` of flattened images: its decision boundaries are hyperplanes, so
    the smallest perturbation that crosses one is known in closed form."""
    return lambda a: a.flatten(1) @ w.t() + b


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_nearest_point_of_a_linear_boundary(norm):
    """Away from the box's edges, the nearest point across ``(w1 - w0) . x + (b1 - b0) = 0`` is
    ``|margin| / ||w1 - w0||_1`` away in L-infinity and ``/ ||.||_2`` in L2; FAB-T lands
    within its 5% overshoot of it, where a wrong projection would be far off or never cross."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 64, generator=g)
    b = torch.tensor([2.0, 0.0, -5.0])
    x = 0.4 + 0.2 * torch.rand(4, 1, 8, 8, generator=g)
    logits = _linear(w, b)
    z = logits(x)
    y = z.argmax(1)
    target = z.argsort(1, descending=True)[:, 1]
    rows = torch.arange(4)
    dw = w[target] - w[y]
    margin = z[rows, y] - z[rows, target]
    exact = margin / (dw.abs().sum(1) if norm == "linf" else dw.norm(dim=1))
    adv, fooled = AA.fab_targeted(logits, x, y, target, eps=1.0, norm=norm, steps=30)
    dist = AA._norm(adv - x, norm)
    assert fooled.all() and (logits(adv).argmax(1) != y).all()
    assert (dist >= exact * 0.999).all() and (dist <= exact * 1.06).all(), (dist, exact)
    # a budget below the distance is not met
    assert not AA.fab_targeted(logits, x, y, target, eps=float(exact.min()) * 0.9, norm=norm, steps=30)[1].any()


def _masked_model():
    """A linear two-class model on images rounded to steps of 0.05: its gradients are zero
    everywhere (gradient masking), but the eps ball around 0.5 holds points it gets wrong."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 2, (64,), generator=g).float() * 2 - 1

    def logits(a: torch.Tensor) -> torch.Tensor:
        s = ((torch.round(a * 20) / 20 - 0.5).flatten(1) @ w) + 2.0  # margin 2.0 at x = 0.5
        return torch.stack([s, -s], 1)

    return logits


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_square_breaks_gradient_masking_where_apgd_and_fab_cannot(norm, eps):
    logits = _masked_model()
    x = torch.full((6, 1, 8, 8), 0.5)
    y = torch.zeros(6, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    _, fooled_apgd = AA.apgd(logits, x, y, eps, norm, steps=20, generator=g)
    assert not fooled_apgd.any()
    adv, broke = AA.auto_attack(logits, x, y, eps, norm, steps=10, queries=1000, generator=g)
    assert broke == {"apgd-ce": 0, "apgd-t": 0, "fab-t": 0, "square": 6}, broke
    assert (logits(adv).argmax(1) != y).all() and adv.min() >= 0 and adv.max() <= 1
    assert (AA._norm(adv - x, norm) <= eps * (1 + 1e-5)).all()


def test_square_keeps_a_robust_image_clean():
    """When the ball holds no wrong answer, every attack fails and the image comes back clean."""
    logits = _masked_model()
    x = torch.full((2, 1, 8, 8), 0.5)
    adv, broke = AA.auto_attack(logits, x, torch.zeros(2, dtype=torch.long), 0.01, "linf", steps=5, queries=200,
                                generator=torch.Generator().manual_seed(0))
    assert sum(broke.values()) == 0 and torch.equal(adv, x)


def test_autoattack_on_a_trained_classifier(digits_run, tmp_path, cli):
    """The whole ensemble through the command: at least as strong as PGD-10 at the same eps,
    inside the ball, and each image it breaks is counted by the attack that broke it first."""
    import cnnkit

    common = {"split": "test", "limit": 48, "eps": "0.05", "out": str(tmp_path), "verbose": False}
    pgd = cnnkit.attack("classify", digits_run, "digits", method="pgd", **common)
    js = tmp_path / "aa.json"
    r = cli("classify", "attack", "--weights", str(digits_run), "--data", "digits", "--split", "test", "--limit", "48",
            "--eps", "0.05", "--method", "autoattack", "--steps", "10", "--queries", "100", "--out", str(tmp_path),
            "--json", str(js))
    assert r.code == 0, r.err
    aa = json.loads(js.read_text())
    assert aa["attacked"] <= pgd["attacked"] + 1e-9 and aa["attacked"] < aa["clean"] - 0.2
    assert aa["mean_linf"] <= 0.05 + 1e-6 and aa["steps"] == 10 and aa["queries"] == 100
    broken = sum(aa["broken_by"].values())
    assert set(aa["broken_by"]) == set(AA.STAGES) and aa["broken_by"]["apgd-ce"] > 0
    assert broken == round((aa["clean"] - aa["attacked"]) * 48)
    assert "images each attack broke first: apgd-ce" in r.out


def test_autoattack_refuses_a_target(digits_run, tmp_path, cli):
    r = cli("classify", "attack", "--weights", str(digits_run), "--data", "digits", "--limit", "8", "--method",
            "autoattack", "--targeted", "3", "--out", str(tmp_path))
    assert r.code == 2 and "autoattack is untargeted" in r.err and len(r.err.strip().splitlines()) == 1
