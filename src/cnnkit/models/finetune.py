"""Fine-tuning controls that work on any registry model: stages, freezing, layer-wise LR decay.

A model's parameters are split into depth groups from its ``feature_info`` (timm's and
smallcnn's list of stage modules): the stem (everything before the first stage), one group
per stage (anything between stages joins the stage before it, e.g. densenet transitions), and
the head (the classifier from ``get_classifier()``; layers after the last stage, such as
efficientnet's ``conv_head``, join the last stage).

A model built around a registry classifier (a segmenter's encoder, a detector's backbone) has
no ``feature_info`` of its own: its groups are that classifier's stem and stages, and the head
is everything outside it (decoder, FPN, RPN, prediction heads), so ``--freeze backbone``
freezes the encoder and trains the rest.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cnnkit.errors import CnnkitError, ModelError


def _feature_modules(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    entries = info.info if hasattr(info, "info") else info  # timm FeatureInfo or a list of dicts
    modules = dict(model.named_modules())
    out = []
    for e in entries:
        name = e.get("module") if isinstance(e, dict) else None
        m = modules.get(name)
        # a stem's closing norm/activation (resnet 'act1', mobilenet 'bn1', densenet 'norm0') is
        # listed as a feature stage by timm, but it is part of the stem
        if m is not None and any(isinstance(c, nn.Conv2d) for c in m.modules()):
            out.append(name)
    return out


def _head_prefix(model: nn.Module) -> str | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return None
    return next((n + "." for n, m in model.named_modules() if m is head and n), None)


def _inner_body(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the registry classifier inside a wrapper without ``feature_info``."""
    if getattr(model, "feature_info", None) is not None or hasattr(model, "get_classifier"):
        return None  # a classifier itself
    return next(((n, m) for n, m in model.named_modules() if n and getattr(m, "feature_info", None) is not None),
                None)


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names by depth: ``[stem, stage 1, ..., stage S, head]`` (S >= 1).

    A wrapper around a registry classifier gets that classifier's groups (its own unused
    classifier joins the last stage) and everything outside it as the head. Other models
    without ``feature_info`` get ``[all but the head, head]``.
    """
    inner = _inner_body(model)
    if inner is not None:
        prefix, body = inner
        *groups, own_head = [[f"{prefix}.{n}" for n in g] for g in parameter_groups(body)]
        groups[-1] = groups[-1] + own_head  # the classifier's own head is never run inside the wrapper
        return groups + [[n for n, _ in model.named_parameters() if not n.startswith(prefix + ".")]]
    stages = _feature_modules(model)
    head = _head_prefix(model)
    names = [n for n, _ in model.named_parameters()]
    body = [n for n in names if not (head and n.startswith(head))]
    heads = [n for n in names if head and n.startswith(head)]
    groups: list[list[str]] = [[] for _ in range(len(stages) + 1)]
    current = 0
    for n in body:
        for i, mod in enumerate(stages):
            if n.startswith(mod + "."):
                current = max(current, i + 1)
                break
        groups[current].append(n)
    groups = [groups[0]] + [g for g in groups[1:] if g]  # stages without parameters (timm 'act1')
    if len(groups) == 1:
        groups.append([])
    return groups + [heads]


def num_stages(model: nn.Module) -> int:
    """How many stages ``--freeze N`` can count (the stem is frozen with the first)."""
    return len(parameter_groups(model)) - 2


def frozen_names(model: nn.Module, spec: str | int | None) -> set[str]:
    """Parameter names that ``--freeze`` turns off.

    ``backbone`` (or ``all``): everything but the classifier head. ``N``: the stem and the first
    ``N`` stages. ``0``/None: nothing.
    """
    if spec in (None, "", "none", 0, "0"):
        return set()
    groups = parameter_groups(model)
    if str(spec) in ("backbone", "all"):
        names = {n for g in groups[:-1] for n in g}
        _check_trainable(model, names, spec)
        return names
    try:
        n = int(spec)
    except (TypeError, ValueError):
        raise CnnkitError(f"--freeze must be 'backbone' or a number of stages, got '{spec}'") from None
    stages = len(groups) - 2
    if not 0 <= n <= stages:
        raise CnnkitError(f"--freeze {n}: this model has {stages} stages; use 0-{stages} or 'backbone'")
    names = {name for g in groups[: n + 1] for name in g}
    _check_trainable(model, names, spec)
    return names


def _check_trainable(model: nn.Module, names: set[str], spec: str | int) -> None:
    """Refuse a freeze that leaves nothing to train (a model whose head cannot be told apart)."""
    if names and all(n in names for n, _ in model.named_parameters()):
        raise CnnkitError(f"--freeze {spec} would freeze every parameter of this model (it has no separate "
                          "head to train); use a number of stages")


def set_frozen(model: nn.Module, names: set[str]) -> None:
    """Turn gradients off for ``names`` (and on for every other parameter)."""
    for n, p in model.named_parameters():
        p.requires_grad_(n not in names)


def freeze_norm_stats(model: nn.Module, names: set[str]) -> None:
    """Put batch-norm layers whose weights are frozen into eval mode (running stats fixed).

    Call after ``model.train()``; a frozen backbone whose BN statistics keep moving is not
    frozen (the classic linear-probe mistake).
    """
    if not names:
        return
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            w = f"{mod_name}.weight" if mod_name else "weight"
            if w in names or (m.weight is None and any(n.startswith(mod_name + ".") for n in names)):
                m.eval()


def layer_decay_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """LR multiplier per parameter for layer-wise LR decay: the head 1, each group below ``decay`` times less."""
    groups = parameter_groups(model)
    depth = len(groups) - 1
    return {n: decay ** (depth - i) for i, g in enumerate(groups) for n in g}


def feature_stages(model: nn.Module) -> dict[str, nn.Module]:
    """The named feature stages of a registry model, shallow to deep (``feature_info``): of the
    model itself, or of the registry classifier inside a wrapper (a segmenter's encoder, a
    detector's backbone), named by their full path in ``model``."""
    prefix, body = "", model
    inner = _inner_body(model)
    if inner is not None:
        prefix, body = inner[0] + ".", inner[1]
    modules = dict(body.named_modules())
    return {prefix + n: modules[n] for n in _feature_modules(body)}


def load_init(model: nn.Module, path: str, in_chans: int, num_classes: int) -> str:
    """Load a classifier's starting weights (``--init``: cnnkit weights or a timm/torchvision
    state dict); the head is rebuilt when the class count differs. Returns the note to print."""
    import torch

    from cnnkit.core.card import ModelCard
    from cnnkit.engine.checkpoint import load_weights

    p = Path(path)
    if p.suffix == ".safetensors" or p.is_dir():
        state, card = load_weights(p)
        chans = ModelCard.from_dict(card, f"the model card of '{path}'").input.channels if "classes" in card else in_chans
        if chans != in_chans:
            raise ModelError(f"--init weights '{path}' take {chans}-channel images but the "
                             f"data has {in_chans} channel(s); pass --channels {chans}")
    elif p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    else:
        raise ModelError(f"--init weights '{path}' do not exist")
    arch = getattr(model, "cnnkit_arch", "?")
    from cnnkit.methods.prune import apply, init_record

    apply(model, init_record(path))  # pruned weights: the network is narrowed to them first
    own = model.state_dict()
    if not set(state) & set(own):
        raise ModelError(f"--init weights '{path}' share no parameter names with model '{arch}'")
    head = model.get_classifier()
    head_prefix = next(n for n, m in model.named_modules() if m is head) + "."
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    body = [k for k in mismatched if not k.startswith(head_prefix)]
    if body:
        raise ModelError(f"--init weights '{path}' do not fit model '{arch}' (shape mismatch in "
                         f"{body[0]}); use the architecture they were trained with")
    note = ""
    if mismatched:
        state = {k: v for k, v in state.items() if k not in mismatched}
        note = f"the classifier head was rebuilt for {num_classes} classes"
    model.load_state_dict(state, strict=False)
    return note


def copy_matching_weights(model, init: str | Path, prefixes: tuple[str, ...] = ("",)) -> str:
    """``--init`` for models that embed a classifier: copy every tensor of ``init`` whose name
    (tried with each of ``prefixes`` in front) and shape match a tensor of ``model``, so a
    classifier checkpoint fills a detector's backbone or a segmenter's encoder. Returns the
    note to print.

    Raises:
        CnnkitError: nothing in ``init`` matches.
    """
    from cnnkit.engine.checkpoint import load_weights
    from cnnkit.errors import CnnkitError
    from cnnkit.methods.prune import apply

    state, card = load_weights(init)
    rec = card.get("extra", {}).get("pruned")
    if rec and set(rec["modules"]) <= {n for n, _ in model.named_modules()}:
        apply(model, rec)  # pruned weights of this network: it is narrowed to them first
        own = model.state_dict()
        odd = next((k for k, v in state.items() if k in own and own[k].shape != v.shape), None)
        if odd is not None:
            from cnnkit.errors import ModelError

            kwargs = ", ".join(f"{k}={v}" for k, v in card.get("model_kwargs", {}).items()) or "its defaults"
            raise ModelError(f"--init '{init}' is a pruned {card.get('arch')} built with {kwargs}, and this model "
                             f"differs ({odd}); train with the same model options")
    own = model.state_dict()
    copied = {}
    for k, v in state.items():
        for p in prefixes:
            if p + k in own and own[p + k].shape == v.shape:
                copied[p + k] = v
                break
    if not copied:
        raise CnnkitError(f"no tensor of --init '{init}' matches this model's layers")
    model.load_state_dict(copied, strict=False)
    return f"--init copied {len(copied)} of {len(own)} tensors from '{init}' ({card.get('task')} {card.get('arch')})"
