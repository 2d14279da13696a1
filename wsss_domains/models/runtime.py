"""Running a network's forward pass fast at inference time: ONNX Runtime on the CPU.

Pseudo-labelling and prediction spend nearly all their time in the network's convolutions and
batch norms. Exported to ONNX, the same network runs in ONNX Runtime, which folds the batch norms
into the convolutions and uses its own CPU kernels: about 4x the images per second of eager
PyTorch on this project's 2-core machines (``benchmarks/inference_speed.py``). On a GPU the
network stays in PyTorch (with mixed precision).

The export uses PyTorch's TorchScript-based exporter: about a second for EfficientNet-Lite0, where
the ``torch.export``-based one takes minutes. Exported files are cached by a digest of the weights,
and every fresh export is checked against PyTorch on its example input; a mismatch above
:data:`TOLERANCE` is reported and the network runs in PyTorch instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from wsss_domains.data.io import atomic_write
from wsss_domains.errors import UserError

RUNTIMES = ("auto", "torch", "onnx")
# Largest difference from PyTorch accepted, relative to the output's largest magnitude (at least 1).
TOLERANCE = 1e-4
OPSET = 17


def resolve_runtime(runtime: str, device: str) -> str:
    """``auto``: ONNX Runtime on the CPU where it is installed, PyTorch elsewhere."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime '{runtime}' ({', '.join(RUNTIMES)})")
    on_cpu = str(device).startswith("cpu")
    if runtime == "auto":
        return "onnx" if on_cpu and importlib.util.find_spec("onnxruntime") is not None else "torch"
    if runtime == "onnx":
        if not on_cpu:
            raise UserError(
                "--runtime onnx runs on the CPU; use --runtime torch (or auto) with --device cuda"
            )
        if importlib.util.find_spec("onnxruntime") is None:
            raise UserError("--runtime onnx needs the onnxruntime package (pip install onnxruntime)")
    return runtime


def module_digest(module: nn.Module) -> str:
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class OnnxRunner:
    """``module``'s forward of one tensor, exported once to ONNX and run by ONNX Runtime.

    ``dynamic``: the input axes that may change size between calls (0 batch, 2 height, 3 width).
    ``cache``: folder for the exported file (a temporary folder when None). ``arena``: ONNX Runtime's
    memory arena, which keeps its largest allocation for reuse (faster for inputs of changing sizes;
    off, peak memory is lower).
    """

    def __init__(
        self,
        module: nn.Module,
        example: Tensor,
        *,
        dynamic: tuple[int, ...] = (0,),
        cache: Path | None = None,
        threads: int | None = None,
        arena: bool = True,
    ) -> None:
        import onnxruntime as ort

        module = module.eval()
        key = hashlib.sha256(
            f"{module_digest(module)}|{tuple(example.shape)}|{dynamic}|{torch.__version__}|{OPSET}".encode()
        ).hexdigest()[:24]
        folder = Path(cache) if cache is not None else Path(tempfile.gettempdir()) / "wsss-domains-onnx"
        path = folder / f"{key}.onnx"
        fresh = not path.is_file()
        if fresh:
            atomic_write(path, lambda tmp: _export(module, example, tmp, dynamic))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = arena
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        if fresh:
            with torch.inference_mode():
                reference = module(example)
            error = (self(example) - reference).abs().max().item()
            scale = max(1.0, reference.abs().max().item())
            if error > TOLERANCE * scale:
                path.unlink(missing_ok=True)
                raise ValueError(f"ONNX Runtime differs from PyTorch by {error:.2e} on the example input")

    def __call__(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def _export(module: nn.Module, example: Tensor, path: Path, dynamic: tuple[int, ...]) -> None:
    names = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {axis: names[axis] for axis in dynamic}},
            opset_version=OPSET,
            dynamo=False,
        )


def fast_forward(
    module: nn.Module,
    example: Tensor,
    runtime: str,
    *,
    dynamic: tuple[int, ...] = (0,),
    cache: Path | None = None,
    arena: bool = True,
    log: Callable[[str], None] = print,
) -> Callable[[Tensor], Tensor] | None:
    """An ONNX Runtime forward of ``module`` where ``runtime`` is ``onnx``; None means: run PyTorch.

    A network the exporter cannot handle (or whose export disagrees with PyTorch) is reported
    through ``log`` and left to PyTorch: slower, never different.
    """
    if runtime != "onnx":
        return None
    try:
        return OnnxRunner(module, example, dynamic=dynamic, cache=cache, arena=arena)
    except Exception as exc:  # noqa: BLE001 - any exporter failure: fall back to the reference runtime
        log(f"note: ONNX Runtime not used ({type(exc).__name__}: {str(exc)[:200]}); running PyTorch")
        return None


class CamsForward(nn.Module):
    """The classifier's CAM pass as a plain forward, the shape an exporter needs."""

    def __init__(self, model: nn.Module, rectify: bool) -> None:
        super().__init__()
        self.model = model
        self.rectify = rectify

    def forward(self, x: Tensor) -> Tensor:
        maps = self.model.head(self.model.features(x))
        return torch.relu(maps) if self.rectify else maps
