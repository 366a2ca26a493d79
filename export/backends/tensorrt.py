"""The `tensorrt` backend: the ONNX step graphs built into serialized TensorRT plans.

Only where `import tensorrt` works and the device is CUDA; everywhere else build and
load refuse with the reason (TensorRT's libraries are not on our package registry, and
TensorRT-RTX refuses compute capability 9.0, so this is NOT verified on our machines).

Build: the functional ONNX export of each step program (see onnx.py), parsed by
TensorRT's ONNX parser into a strongly typed network (the ONNX dtypes are kept), built
with one timing cache shared by all graphs, serialized to `graphs/<name>.plan`; the
timing cache is kept as `timing.cache` (its sha256 is in the manifest like every file).
The TensorRT version is part of the fingerprint: a plan only loads in the version that
built it. Load: deserialize each plan, one execution context per graph and thread, IO
bound by name with `set_tensor_address` on torch-owned buffers, `execute_async_v3` on
torch's current stream (no host sync: capturable in a CUDA graph after a warm-up call).
The state is input and output buffers: updated rings come back as `<name>_out` and the
runtime copies them into the session's buffers.

Known risk, unverified: the DiT computes RoPE angles and the timestep sinusoid in float64
(reference parity); TensorRT has limited FP64 support, so parsing may need those casts
moved to float32 for this backend.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import torch

from flashdreams.errors import DeviceError, EngineIncompatibleError, InvalidArgumentError
from flashdreams.export.backends import GraphBackend, GraphFn, rel
from flashdreams.export.backends.onnx import export_onnx
from flashdreams.export.build_config import BuildConfig
from flashdreams.export.manifest import TensorSpec

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"


def import_tensorrt():
    """The tensorrt module, or EngineIncompatibleError saying why it is not usable here."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install raising OSError
        raise EngineIncompatibleError(
            f"the tensorrt backend needs the TensorRT Python package, and `import tensorrt` fails here ({exc}); "
            "install NVIDIA's TensorRT wheels, or use --backend inductor"
        ) from None
    return trt


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.UINT8: torch.uint8,
    }
    for attr, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, attr):
            table[getattr(trt.DataType, attr)] = tdt
    return table.get(dt)


class TensorRTBackend(GraphBackend):
    name = "tensorrt"
    functional = True

    def __init__(self, config: BuildConfig | None = None) -> None:
        super().__init__(config)
        self._logger = None
        self._timing_cache = None

    def _trt_logger(self, trt):
        if self._logger is None:
            self._logger = trt.Logger(trt.Logger.WARNING)
        return self._logger

    def unavailable_reason(self, device: torch.device) -> str | None:
        try:
            import_tensorrt()
        except EngineIncompatibleError as exc:
            return str(exc)
        if device.type != "cuda":
            return f"TensorRT runs on CUDA devices only; device '{device}' was asked for"
        return None

    def build_attention(self, attention: str) -> str:
        if attention != "sdpa":
            log.warning("tensorrt: Triton custom ops have no ONNX form; tracing with attention='sdpa' instead")
        return "sdpa"

    def begin_build(self, engine_dir: Path, device: torch.device) -> None:
        reason = self.unavailable_reason(device)
        if reason:
            raise InvalidArgumentError(reason)
        self._timing_cache = None

    def build_graph(self, prog, engine_dir: Path, device: torch.device):
        trt = import_tensorrt()
        scratch = engine_dir / ".onnx"
        scratch.mkdir(parents=True, exist_ok=True)
        onnx_path = scratch / f"{prog.name}.onnx"
        export_onnx(prog, onnx_path)
        logger = self._trt_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise InvalidArgumentError(f"TensorRT could not parse the ONNX graph '{prog.name}': {errors}")
        config = builder.create_builder_config()
        if self._timing_cache is None:
            self._timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(self._timing_cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise InvalidArgumentError(f"TensorRT failed to build the plan of graph '{prog.name}' (see its log)")
        path = engine_dir / "graphs" / f"{prog.name}.plan"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(plan))
        shutil.rmtree(scratch, ignore_errors=True)
        record = {"files": [rel(engine_dir, path)], "compile": {"strongly_typed": True, "tensorrt": trt.__version__}}
        return record, self._runner(trt, bytes(plan), prog.name, prog.inputs, prog.outputs, device)

    def finish_build(self, engine_dir: Path) -> dict[str, str]:
        if self._timing_cache is None:
            return {}
        (engine_dir / TIMING_CACHE).write_bytes(bytes(self._timing_cache.serialize()))
        return {"timing_cache": TIMING_CACHE}

    def begin_load(self, engine_dir: Path, manifest: dict, device: torch.device) -> None:
        import_tensorrt()
        if device.type != "cuda":
            raise EngineIncompatibleError(f"engine '{engine_dir}' (tensorrt) runs on CUDA only; device '{device}'")

    def load_graph(self, engine_dir: Path, name: str, record: dict, device: torch.device) -> GraphFn:
        trt = import_tensorrt()
        inputs = [TensorSpec.from_dict(d) for d in record["inputs"]]
        outputs = [TensorSpec.from_dict(d) for d in record["outputs"]]
        plan = (engine_dir / record["files"][0]["file"]).read_bytes()
        return self._runner(trt, plan, name, inputs, outputs, device)

    def _runner(self, trt, plan: bytes, name: str, inputs, outputs, device: torch.device) -> GraphFn:
        runtime = trt.Runtime(self._trt_logger(trt))
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineIncompatibleError(
                f"TensorRT {trt.__version__} could not deserialize the plan of graph '{name}' "
                "(built by another TensorRT version or for another GPU?); rebuild with fd-build"
            )
        io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        for spec in [*inputs, *outputs]:
            if spec.name not in io:
                raise EngineIncompatibleError(f"TensorRT plan '{name}' has no tensor '{spec.name}' (has {sorted(io)})")
            got = _torch_dtype(trt, engine.get_tensor_dtype(spec.name))
            if got != spec.dtype:
                raise EngineIncompatibleError(
                    f"TensorRT plan '{name}': tensor '{spec.name}' is {got}, the manifest says {spec.dtype}"
                )
        local = threading.local()

        def call(*args):
            ctx = getattr(local, "ctx", None)
            if ctx is None:  # an execution context is not reentrant: one per thread
                ctx = local.ctx = engine.create_execution_context()
            stream = torch.cuda.current_stream(device)
            keep = []
            for spec, t in zip(inputs, args):
                t = t.contiguous()
                keep.append(t)
                ctx.set_tensor_address(spec.name, t.data_ptr())
            outs = [torch.empty(spec.shape, dtype=spec.dtype, device=device) for spec in outputs]
            for spec, o in zip(outputs, outs):
                ctx.set_tensor_address(spec.name, o.data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise DeviceError(f"TensorRT refused to enqueue graph '{name}'")
            return tuple(outs)

        call.engine = engine  # keep the engine alive with its callable
        return call
