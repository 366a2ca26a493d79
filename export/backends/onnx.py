"""The `onnx` backend: the same step programs through `torch.onnx.export(dynamo=True)`.

ONNX has no in-place inputs, so the programs are exported in their functional form: the
updated KV ring (and decoder state) comes back as extra outputs (`ring_k_out`, ...) that
the runtime copies into the session's buffers. The Triton custom ops have no ONNX
form, so the graphs are always traced with attention="sdpa" (their reference twins);
the manifest records that. Run with onnxruntime (CPU, or CUDA where onnxruntime-gpu is
installed); checked against eager on CPU by the test suite. This is also the input of
the `tensorrt` backend.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from flashdreams.errors import EngineIncompatibleError
from flashdreams.export.backends import GraphBackend, GraphFn, rel
from flashdreams.export.manifest import TensorSpec
from flashdreams.kernels import torch_twins_only

log = logging.getLogger(__name__)

# Above this many bytes of weights the protobuf limit (2 GiB) needs external data.
EXTERNAL_DATA_BYTES = 1 << 30


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(prog, path: Path) -> list[Path]:
    """Export a functional step program to `path`; return the files written."""
    external = _param_bytes(prog.module) > EXTERNAL_DATA_BYTES
    names_in = [s.name for s in prog.inputs]
    names_out = [s.name for s in prog.outputs]
    # The Triton custom ops have no ONNX form: the models' device-chosen kernels (the decoders' fused norms
    # and TAEHV's passes on CUDA) are traced as their torch twins, as attention is traced as sdpa.
    with torch.no_grad(), warnings.catch_warnings(), torch_twins_only():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            prog.module,
            prog.fresh_inputs(),
            input_names=names_in,
            output_names=names_out,
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    program.save(str(path), external_data=external)
    files = [path]
    data = path.with_name(path.name + ".data")
    if external and data.exists():
        files.append(data)
    return files


def _np_dtype(dtype: torch.dtype):
    import numpy as np

    table = {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.float64: np.float64,
        torch.int64: np.int64,
        torch.int32: np.int32,
        torch.uint8: np.uint8,
        torch.bool: np.bool_,
    }
    if dtype not in table:
        raise EngineIncompatibleError(
            f"onnxruntime cannot bind {dtype} buffers from Python; build this engine with --dtype float32 "
            "(or float16) for the onnx backend, or use tensorrt"
        )
    return table[dtype]


def ort_session(path: Path, device: torch.device):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineIncompatibleError(
                "onnx engine on CUDA needs onnxruntime-gpu (CUDAExecutionProvider); "
                f"this onnxruntime has {ort.get_available_providers()}"
            )
        idx = device.index if device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(idx).cuda_stream
        providers = [
            ("CUDAExecutionProvider", {"device_id": idx, "user_compute_stream": str(stream)}),
            "CPUExecutionProvider",
        ]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def ort_callable(session, inputs: list[TensorSpec], outputs: list[TensorSpec], device: torch.device) -> GraphFn:
    """Run by IO binding on torch-owned buffers (no copies through numpy)."""
    in_types = [_np_dtype(s.dtype) for s in inputs]
    out_types = [_np_dtype(s.dtype) for s in outputs]
    dev_type = "cuda" if device.type == "cuda" else "cpu"
    dev_id = (device.index or 0) if device.type == "cuda" else 0

    def call(*args):
        binding = session.io_binding()
        keep = []
        for spec, np_t, t in zip(inputs, in_types, args):
            t = t.contiguous()
            keep.append(t)
            binding.bind_input(spec.name, dev_type, dev_id, np_t, list(spec.shape), t.data_ptr())
        outs = []
        for spec, np_t in zip(outputs, out_types):
            o = torch.empty(spec.shape, dtype=spec.dtype, device=device)
            outs.append(o)
            binding.bind_output(spec.name, dev_type, dev_id, np_t, list(spec.shape), o.data_ptr())
        session.run_with_iobinding(binding)
        return tuple(outs)

    return call


class ONNXBackend(GraphBackend):
    name = "onnx"
    functional = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            return f"the onnx backend needs onnx and onnxscript ({exc}); pip install 'flashdreams[onnx]'"
        return None

    def build_attention(self, attention: str) -> str:
        if attention != "sdpa":
            log.warning("onnx: Triton custom ops have no ONNX form; tracing with attention='sdpa' instead")
        return "sdpa"

    def build_graph(self, prog, engine_dir: Path, device: torch.device):
        path = engine_dir / "graphs" / f"{prog.name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        files = export_onnx(prog, path)
        record = {"files": [rel(engine_dir, f) for f in files], "compile": {"exporter": "torch.onnx dynamo"}}
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return record, None
        if device.type == "cuda" or any(s.dtype == torch.bfloat16 for s in prog.inputs):
            return record, None  # checked where it runs; ORT cannot bind bf16 from Python
        return record, ort_callable(ort_session(path, device), prog.inputs, prog.outputs, device)

    def begin_load(self, engine_dir: Path, manifest: dict, device: torch.device) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise EngineIncompatibleError(
                f"engine '{engine_dir}' (onnx) needs onnxruntime, which is not importable here ({exc})"
            ) from None

    def load_graph(self, engine_dir: Path, name: str, record: dict, device: torch.device) -> GraphFn:
        inputs = [TensorSpec.from_dict(d) for d in record["inputs"]]
        outputs = [TensorSpec.from_dict(d) for d in record["outputs"]]
        session = ort_session(engine_dir / record["files"][0]["file"], device)
        return ort_callable(session, inputs, outputs, device)
