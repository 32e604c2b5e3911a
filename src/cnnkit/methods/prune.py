"""Structured pruning for any task: whole channels removed through Torch-Pruning's dependency
graph, so residual adds and concatenations stay consistent, and a card that rebuilds the
narrower network.

Steps:

1. the trained network is traced on the core's example input (Torch-Pruning's
   ``DependencyGraph``); the layers that write the model's outputs (the classifier, a
   detector's class and box convolutions, a segmenter's last convolution) are found by
   walking the graph forward: their channels are the task's and are kept;
2. every other group of coupled channels loses ``ratio`` of its channels (rounded to a
   multiple of :data:`ROUND_TO`, which CPU and GPU kernels run faster on), ranked by
   ``l1`` (the L1 norm of the group's weights) or ``taylor`` (``|w * dL/dw|``, first-order
   Taylor, Molchanov et al. 2019, with L the task's loss on ``--data`` images against the
   model's own answers, so no labels are needed);
3. the pruned weights are written with the card; ``card.extra["pruned"]`` records the new
   width of every changed layer and the shape of every changed tensor, so :func:`apply` can
   rebuild the same network from the architecture's name (``cnnkit.load``, ``--init``,
   export, quantize and serve all go through it).

The pruned model loses accuracy until it is fine-tuned: ``cnnkit TASK train --init
pruned.safetensors`` trains the narrower network (its card carries the record on).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.errors import CnnkitError, ModelError

METHODS = ("l1", "taylor")
ROUND_TO = 8  # channels kept per layer are a multiple of this (when the layer has more)
# module attributes that the pruning functions change and the rebuild sets back
ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features", "num_channels",
         "num_groups", "normalized_shape")
RECORD = "_cnnkit_pruned"  # the record, kept on a network rebuilt by apply()
PARAMETRIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def output_layers(core: nn.Module, graph) -> list[nn.Module]:
    """The convolutions and linear layers whose output channels reach an output of ``core``
    without passing another such layer (through activations, reshapes, adds, concatenations):
    their widths are the task's (classes, box sides) and must not change."""
    out = []
    for module, node in graph.module2node.items():
        if not isinstance(module, PARAMETRIC):
            continue
        stack, seen = list(node.outputs), set()
        if not stack:
            out.append(module)
            continue
        while stack:
            n = stack.pop()
            if id(n) in seen or isinstance(n.module, PARAMETRIC):
                continue
            seen.add(id(n))
            if not n.outputs:
                out.append(module)
                break
            stack += n.outputs
    return out


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _attrs(module: nn.Module) -> dict[str, Any]:
    out = {}
    for a in ATTRS:
        v = getattr(module, a, None)
        if isinstance(v, (int, tuple, list)) and not isinstance(v, bool):
            out[a] = list(v) if isinstance(v, tuple) else v
    return out


def record(pruned: nn.Module, fresh: nn.Module, **info: Any) -> dict[str, Any]:
    """What :func:`apply` needs to turn ``fresh`` (the architecture as built) into ``pruned``:
    the changed attributes per module and the changed tensor shapes, plus ``info``."""
    before = dict(fresh.named_modules())
    modules = {}
    for name, m in pruned.named_modules():
        if name in before:
            now, was = _attrs(m), _attrs(before[name])
            changed = {a: v for a, v in now.items() if was.get(a) != v}
            if changed:
                modules[name] = changed
    was = _shapes(fresh)
    tensors = {k: s for k, s in _shapes(pruned).items() if k in was and was[k] != s}  # (not buffers made lazily)
    return {**info, "modules": modules, "tensors": tensors}


def apply(model: nn.Module, rec: dict[str, Any] | None) -> nn.Module:
    """Narrow ``model`` (freshly built, any weights) to the pruned network ``rec`` describes:
    module widths set and tensors of the recorded shapes (their values come from the weights
    loaded next). Does nothing for ``None`` or a network it already narrowed."""
    if not rec or getattr(model, RECORD, None) is not None:
        return model
    modules = dict(model.named_modules())
    for name, attrs in rec.get("modules", {}).items():
        if name not in modules:
            raise ModelError(f"the pruning record names layer '{name}', which this architecture does not have")
        for a, v in attrs.items():
            setattr(modules[name], a, tuple(v) if isinstance(v, list) else v)
    for key, shape in rec.get("tensors", {}).items():
        owner, _, leaf = key.rpartition(".")
        m = modules.get(owner)
        if m is None:
            raise ModelError(f"the pruning record names tensor '{key}', which this architecture does not have")
        t = getattr(m, leaf)
        new = torch.zeros(shape, dtype=t.dtype, device=t.device)
        if isinstance(t, nn.Parameter):
            setattr(m, leaf, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            m._buffers[leaf] = new
    setattr(model, RECORD, rec)
    return model


def init_record(init: str | Path | None) -> dict[str, Any] | None:
    """The pruning record in the card of ``--init`` weights (cnnkit weights only), or None."""
    import json

    from cnnkit.engine.checkpoint import card_path, resolve_weights

    if not init:
        return None
    p = Path(init)
    if p.suffix != ".safetensors" and not p.is_dir():
        return None  # a timm/torchvision state dict
    try:
        cp = card_path(resolve_weights(p))
        return json.loads(cp.read_text(encoding="utf-8")).get("extra", {}).get("pruned")
    except (OSError, ValueError, ModelError):
        return None  # the loader says what is wrong with the file


def _outputs(core: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = core(x)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _latency_ms(core: nn.Module, x: torch.Tensor, runs: int = 20) -> float:
    """Median time of one call at batch 1 (eager, CPU threads as set)."""
    times = []
    with torch.inference_mode():
        for i in range(runs + 3):
            t0 = time.perf_counter()
            core(x)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def _taylor_batches(predictor, data: str, split: str, n: int) -> list[torch.Tensor]:
    from cnnkit.methods.quantize import calibration_inputs

    calib, _ = calibration_inputs(predictor, data, split, n)
    return [torch.stack(calib[i:i + 8]) for i in range(0, len(calib), 8)]


@contextmanager
def _concat_widths():
    """Torch-Pruning infers the widths a ``torch.cat`` joins from the layers before it, and
    fails where a width-agnostic layer comes last (MONAI's U-Nets end each branch in a PReLU
    with one shared slope): the widths are recorded from the real tensors while the graph is
    traced and handed to it where its inference gives up."""
    from torch_pruning.dependency import index_mapping

    seen: dict[Any, list[int]] = {}
    real_cat, real_update = torch.cat, index_mapping.update_concat_index_mapping

    def cat(tensors, dim=0, **kw):
        tensors = list(tensors)
        out = real_cat(tensors, dim, **kw)
        if out.grad_fn is not None and out.dim() > 1 and dim in (1, 1 - out.dim()):
            seen[out.grad_fn] = [int(t.shape[1]) for t in tensors]
        return out

    def update(graph, node):
        sizes = node.module.concat_sizes
        if (sizes is None or None in sizes) and node.grad_fn in seen:
            node.module.concat_sizes = seen[node.grad_fn]
        real_update(graph, node)

    torch.cat, index_mapping.update_concat_index_mapping = cat, update
    try:
        yield
    finally:
        torch.cat, index_mapping.update_concat_index_mapping = real_cat, real_update


def prune_network(model: nn.Module, pipe, ratio: float, method: str = "l1",
                  batches: list[torch.Tensor] | None = None) -> tuple[nn.Module, list[nn.Module]]:
    """Prune ``model`` (as ``pipe.build()`` makes it) in place: ``(its core, the output layers
    kept)``. ``taylor`` needs ``batches`` of core inputs.

    Raises:
        CnnkitError: the output shapes would change (the network is then left as it was).
    """
    import torch_pruning as tp

    core = pipe.core(model.train()).eval()  # built in train mode: fastdet keeps its BatchNorm layers unfused
    x = pipe.example_input(1)
    with torch.no_grad():
        shapes = [t.shape for t in _outputs(core, x)]
    torch.manual_seed(0)
    with _concat_widths():
        graph = tp.DependencyGraph().build_dependency(core, example_inputs=x)
        keep = output_layers(core, graph)
        importance = tp.importance.MagnitudeImportance(p=1) if method == "l1" else tp.importance.TaylorImportance()
        pruner = tp.pruner.MetaPruner(core, x, importance=importance, pruning_ratio=ratio, ignored_layers=keep,
                                      round_to=ROUND_TO)
    if method == "taylor":
        if not batches:
            raise CnnkitError("--method taylor needs images to compute gradients on, and got none")
        for batch in batches:
            with torch.no_grad():
                ref = _outputs(core, batch)
            pipe.attack_loss(_outputs(core, batch), ref).mean().backward()
        for p in core.parameters():  # layers the outputs do not use (a backbone's spare classifier): no gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    pruner.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = [t.shape for t in _outputs(core, x)]
    if after != shapes:
        raise CnnkitError(f"pruning {pipe.card.arch} would change its output shapes ({shapes} -> {after})")
    return core, keep


def prune(weights: str | Path, ratio: float = 0.5, method: str = "l1", data: str | None = None,
          split: str = "train", images: int = 64, out: str | Path | None = None, verbose: bool = True,
          json_path: str | Path | None = None) -> dict[str, Any]:
    """Remove ``ratio`` of the channels of every prunable layer of ``weights`` (any task) and
    write the narrower model (``out``, default ``pruned.safetensors`` beside the weights).

    Args:
        ratio: share of channels removed per layer, in (0, 1).
        method: ``l1`` (weight magnitude) or ``taylor`` (needs ``data``: ``images`` images of
            its ``split``).

    Returns:
        ``{"file", "params_before", "params_after", "latency_ms_before", "latency_ms_after",
        "ratio", "method", "layers_kept"}``.
    """
    from cnnkit.engine.checkpoint import resolve_weights, save_weights
    from cnnkit.runtime.backend import TorchBackend
    from cnnkit.runtime.pipeline import Predictor, load_model

    if not 0 < ratio < 1:
        raise CnnkitError(f"--ratio must be in (0, 1), got {ratio:g}")
    if method not in METHODS:
        raise CnnkitError(f"unknown pruning method '{method}' (choose from {', '.join(METHODS)})")
    if method == "taylor" and not data:
        raise CnnkitError("--method taylor ranks channels by gradients on images: give --data")
    src = resolve_weights(weights)
    out = Path(out) if out else src.parent / "pruned.safetensors"
    if out.suffix != ".safetensors":
        raise CnnkitError(f"--out must be a .safetensors file, got '{out}'")
    if json_path and Path(json_path).resolve() == out.with_suffix(".json").resolve():
        raise CnnkitError(f"--json {json_path} would overwrite the model card of {out}; name another file")
    model, card, pipe = load_model(src)  # a pruned model is pruned further; the record compares with a fresh build
    x = pipe.example_input(1)
    if getattr(pipe, "fixed_batch", False):
        raise CnnkitError(f"{card.arch} (a torchvision detector) cannot be pruned: its graph changes with the "
                          "number of detections; prune fastdet, a classifier or a segmenter")
    full = pipe.core(model.train()).eval()  # (train mode while built: fastdet's BatchNorm stays unfused)
    batches = None
    if method == "taylor":
        predictor = Predictor(card, pipe, TorchBackend(full, torch.device("cpu")), src, model)
        batches = _taylor_batches(predictor, data, split, images)
    params_before = sum(p.numel() for p in model.parameters())
    ms_before = _latency_ms(full, x)
    try:
        core, keep = prune_network(model, pipe, ratio, method, batches)
    except (RuntimeError, IndexError, ValueError, KeyError) as e:
        raise CnnkitError(f"{card.arch} cannot be pruned ({str(e).splitlines()[0][:120]})") from None
    params_after = sum(p.numel() for p in model.parameters())
    ms_after = _latency_ms(core, x)
    names = {m: n for n, m in model.named_modules()}
    rec = record(model, pipe.build(), ratio=ratio, method=method, source=str(src), params_before=params_before,
                 params_after=params_after, kept=sorted(names[m] for m in keep if m in names))
    card.extra["pruned"] = rec
    card.metrics = {}  # measured on the unpruned model; fine-tune and validate again
    save_weights(out, model.state_dict(), card)
    report = {"file": str(out), "ratio": ratio, "method": method, "params_before": params_before,
              "params_after": params_after, "latency_ms_before": round(ms_before, 2),
              "latency_ms_after": round(ms_after, 2), "layers_kept": rec["kept"]}
    if verbose:
        from cnnkit.engine.progress import console

        console().print(f"pruned {card.arch} ({method}, ratio {ratio:g}): {params_before / 1e6:.2f} M -> "
                        f"{params_after / 1e6:.2f} M parameters; batch-1 latency {ms_before:.1f} -> {ms_after:.1f} ms "
                        f"(eager, this machine); output layers kept: {', '.join(rec['kept'])}")
        console().print(f"wrote {out}; fine-tune it: cnnkit {card.task} train --init {out} ...")
    return report
