"""Backends: run a model's core on tensors, ``__call__(*tensors) -> tuple[Tensor, ...]``.

:class:`TorchBackend` runs the eager PyTorch core (optionally under autocast), and
:class:`OrtBackend` an exported ONNX file in ONNX Runtime. Both are stateless after
construction: nothing is mutated per call, so one backend can serve several threads at once
(PyTorch without autograd and ONNX Runtime's ``InferenceSession.run`` are thread-safe).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.errors import DataError, ModelError

ONNX_CARD_KEY = "cnnkit_card"


class TorchBackend:
    """The eager core on ``device``; outputs stay on the device (float32)."""

    name = "torch"

    def __init__(self, core: nn.Module, device: torch.device, amp: torch.dtype | None = None,
                 channels_last: bool = False):
        self.core = core.to(device).eval()
        self.device, self.amp, self.channels_last = device, amp, channels_last

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs = []
        for x in inputs:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            xs.append(x)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                                    enabled=self.amp is not None):
            out = self.core(*xs)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(o.float() if o.is_floating_point() else o for o in out)


class OrtBackend:
    """An ONNX file in ONNX Runtime (CPU, or CUDA when the installed runtime has it and the
    device asks for it); outputs come back as CPU tensors."""

    name = "onnx"

    def __init__(self, path: str | Path, device: torch.device | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            self.options.intra_op_num_threads = threads
        self.providers = ["CPUExecutionProvider"]
        if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            self.providers.insert(0, "CUDAExecutionProvider")
        self.session = self._session(str(self.path))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.input_shapes = [i.shape for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.tapped: str | None = None  # an intermediate tensor also fetched on each call (see tap)
        self.sink: Callable[[torch.Tensor], None] | None = None

    def _session(self, model: str | bytes):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(model, self.options, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types for damaged or unsupported files
            raise ModelError(f"ONNX file '{self.path}' cannot be loaded by ONNX Runtime "
                             f"({str(e).splitlines()[0][:160]})") from None

    def tap(self, tensor: str | None, sink: Callable[[torch.Tensor], None] | None = None) -> None:
        """Also fetch the graph's intermediate ``tensor`` on every call and hand it to ``sink``
        (on the calling thread), as a forward hook does on a torch module; ``None`` stops.
        The session is rebuilt with ``tensor`` as an extra graph output, so call this before
        serving, not while other threads run the backend."""
        if tensor is None:
            self.session, self.tapped, self.sink = self._session(str(self.path)), None, None
            return
        self.session, self.tapped, self.sink = self._session(with_output(self.path, tensor)), tensor, sink

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds: dict[str, Any] = {}
        for name, shape, x in zip(self.inputs, self.input_shapes, inputs):
            arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
            if len(shape) != arr.ndim or any(isinstance(s, int) and s != a for s, a in zip(shape, arr.shape)):
                want = "x".join(str(s) if isinstance(s, int) else "N" for s in shape)
                got = "x".join(map(str, arr.shape))
                raise DataError(f"the ONNX model '{self.path.name}' takes inputs of shape {want}, got {got}")
            feeds[name] = arr
        if self.tapped is None:
            return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))
        *outs, tapped = self.session.run([*self.outputs, self.tapped], feeds)
        if self.sink is not None:
            self.sink(torch.from_numpy(tapped))
        return tuple(torch.from_numpy(o) for o in outs)


def with_output(path: str | Path, tensor: str) -> bytes:
    """The ONNX model at ``path`` with its intermediate ``tensor`` added to the graph outputs
    (serialized, for ``InferenceSession``)."""
    import onnx

    model = onnx.load(str(path))
    if tensor not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def read_onnx_card(path: str | Path) -> dict[str, Any]:
    """The cnnkit model card stored in an ONNX file's metadata (as a dict).

    External-data files must lie inside the model's folder: a path that points elsewhere is
    refused before anything is read.

    Raises:
        ModelError: the file is missing, not a readable ONNX model, has no cnnkit card, or
            names external data outside its folder.
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"ONNX file '{p}' does not exist")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends for a corrupt file
        raise ModelError(f"'{p}' is not a readable ONNX model ({str(e).splitlines()[0][:120]})") from None
    check_external_data(model, p)
    meta = {m.key: m.value for m in model.metadata_props}
    if ONNX_CARD_KEY not in meta:
        raise ModelError(f"ONNX file '{p}' has no cnnkit model card in its metadata; export it with "
                         "`cnnkit export`, which stores the card it needs")
    try:
        return json.loads(meta[ONNX_CARD_KEY])
    except json.JSONDecodeError:
        raise ModelError(f"the model card inside '{p}' is not valid JSON") from None


def check_external_data(model, path: Path) -> None:
    """Refuse ONNX external-data locations that are absolute or leave the model's folder."""
    from onnx.external_data_helper import _get_all_tensors

    root = path.resolve().parent
    for t in _get_all_tensors(model):
        if t.data_location != 1:  # onnx.TensorProto.EXTERNAL
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (root / loc).resolve()
        if Path(loc).is_absolute() or root not in target.parents:
            raise ModelError(f"ONNX file '{path}' keeps tensor data at '{loc}', outside its folder; "
                             "refusing to read it")
