"""The engine manifest: what an engine directory holds, and the checks a loader runs first.

An engine directory is `manifest.json` plus the files it names (graphs, compiler
artifacts). The manifest records the model (preset, config and its hash, weights hash),
the engine's static identity (batch, resolution, latent shape, ring spec, dtype), the
per-block schedule as data, every graph with its backend, files (sha256, bytes), typed IO
(`inputs`/`outputs`; `call_inputs` and `groups` say how a caller's tensors map onto them:
a grouped call input such as `ring_k` [layers, ...] is passed as its dim-0 slices), the
inputs it mutates (`state_outputs` maps a functional graph's extra outputs back to them),
its build check against eager, and the build fingerprint of the machine that built it. A
`manifest_sha256` over the canonical JSON of everything else seals it: a hand edit is
detected (this is an integrity check against accidents, not a signature; `write_manifest`
re-seals on purpose, which tests use to fake a foreign build machine).

Which fingerprint fields must match the loading machine exactly, and why:

* device_type: inductor, aoti, tensorrt (compiled code targets one device type).
* device_name, capability (sm_XY): CUDA engines of inductor, aoti, tensorrt (cubins,
  autotuned tile choices and TensorRT tactics are per GPU).
* capability (`<arch>-<isa>`): CPU engines of inductor, aoti (the generated C++ uses
  the build CPU's vector ISA; an AOTI .so would die of SIGILL elsewhere).
* cuda: CUDA engines of inductor, aoti, tensorrt (kernels and plans link one CUDA runtime).
* torch: inductor, aoti (torch.export format, Inductor cache keys, the AOTI .so's libtorch ABI).
* python (major.minor): inductor (the Inductor/AOTAutograd artifacts hold pickles and code).
* triton: CUDA engines of inductor (cached Triton kernels are keyed by the Triton version).
* tensorrt: tensorrt (a plan only deserializes in the TensorRT version that built it).

Everything else (cuDNN, driver, onnx/onnxruntime versions, CPU model, platform) is
recorded for the record and reported by `fd-build --check`, never enforced. The `onnx`
backend enforces none: ONNX graphs are portable; the runtime only needs onnxruntime with
a provider for the target device.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError, NotFoundError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 3: the block plan replaced the per-block schedule (the model-family seam)
MANIFEST_NAME = "manifest.json"
BACKENDS = ("inductor", "aoti", "onnx", "tensorrt")

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint8: "uint8",
    torch.bool: "bool",
    torch.float8_e4m3fn: "float8_e4m3fn",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidArgumentError(f"dtype {dtype} cannot appear in an engine manifest") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES_BY_NAME[name]
    except KeyError:
        raise EngineIncompatibleError(f"manifest names dtype '{name}', which this FlashDreams does not know") from None


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, static shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(int(s) for s in d["shape"]), dtype_from_name(d["dtype"]))

    def matches(self, t: torch.Tensor) -> bool:
        return tuple(t.shape) == self.shape and t.dtype == self.dtype


# -- fingerprint -----------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tensorrt_version() -> str | None:
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"):
        v = _dist_version(dist)
        if v is not None:
            return v
    return None


def _cpu_info() -> tuple[str, str]:
    """(model name, '<arch>-<vector isa>') of this CPU, from /proc/cpuinfo where there is one."""
    arch = platform.machine() or "unknown"
    name, flags = platform.processor() or arch, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name in (arch, ""):
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        isa = "avx512"
    elif "avx2" in flags:
        isa = "avx2"
    elif "sve" in flags:
        isa = "sve"
    elif "asimd" in flags:
        isa = "neon"
    else:
        isa = "scalar"
    return name, f"{arch}-{isa}"


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return None
    for tok in first.split():
        if tok[:1].isdigit() and "." in tok:
            return tok
    return None


def machine_fingerprint(device: str | torch.device = "cpu") -> dict:
    """The fingerprint of this machine for engines that run on `device`."""
    device = torch.device(device)
    fp = {
        "fd_version": _fd_version(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": None,
        "tensorrt": _tensorrt_version(),
        "onnx": _dist_version("onnx"),
        "onnxruntime": _dist_version("onnxruntime") or _dist_version("onnxruntime-gpu"),
        "driver": _nvidia_driver(),
        "platform": platform.platform(),
        "device_type": device.type,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        fp["device_name"] = torch.cuda.get_device_name(idx)
        fp["capability"] = f"sm_{major}{minor}"
        v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        fp["cudnn"] = str(v) if v is not None else None
    else:
        # A machine without CUDA answers for its CPU, whatever device was asked for.
        fp["device_type"] = "cpu" if device.type == "cuda" else device.type
        fp["device_name"], fp["capability"] = _cpu_info()
    return fp


def _fd_version() -> str:
    import flashdreams

    return flashdreams.__version__


def required_fields(backend: str, device_type: str) -> list[str]:
    """Fingerprint fields that must equal this machine's (see the module docstring)."""
    if backend == "onnx":
        return []
    fields = ["device_type", "capability"]
    if device_type == "cuda":
        fields += ["device_name", "cuda"]
    if backend == "inductor":
        fields += ["torch", "python_minor"]
        if device_type == "cuda":
            fields.append("triton")
    elif backend == "aoti":
        fields.append("torch")
    elif backend == "tensorrt":
        fields.append("tensorrt")
    return fields


def _field_value(fp: dict, name: str):
    if name == "python_minor":
        return ".".join(str(fp.get("python", "")).split(".")[:2])
    return fp.get(name)


def _describe_device(fp: dict) -> str:
    return f"'{fp.get('device_name')}' ({fp.get('capability')})" if fp.get("device_type") == "cuda" else "'cpu'"


def check_fingerprint(built: dict, here: dict, backend: str) -> list[str]:
    """Raise EngineIncompatibleError on the first required field that differs; return what was checked."""
    checked = []
    for name in required_fields(backend, built.get("device_type", "cpu")):
        want, have = _field_value(built, name), _field_value(here, name)
        if want == have:
            checked.append(f"{name} = {want!r}")
            continue
        if name in ("device_type", "device_name", "capability"):
            there = _describe_device(built)
            if built.get("device_type") == "cpu":
                there = f"'cpu' ({built.get('capability')})"
            this = _describe_device(here)
            if here.get("device_type") == "cpu":
                this = f"'cpu' ({here.get('capability')})"
            msg = f"engine built for device {there}, this machine has {this} (field '{name}': {want!r} vs {have!r})"
        else:
            msg = f"engine built with {name} {want!r}, this machine has {have!r}"
        raise EngineIncompatibleError(f"{msg}; rebuild the engine here with fd-build")
    return checked


# -- manifest I/O ----------------------------------------------------------------------


def canonical_json(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """Return a copy of `manifest` with its `manifest_sha256` set."""
    out = copy.deepcopy(manifest)
    out.pop("manifest_sha256", None)
    out["manifest_sha256"] = manifest_digest(out)
    return out


def write_manifest(engine_dir: str | os.PathLike, manifest: dict) -> dict:
    """Seal and write `manifest.json` atomically. Also the test hook for a foreign fingerprint."""
    sealed = seal(manifest)
    path = Path(engine_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(sealed, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return sealed


def read_manifest(engine_dir: str | os.PathLike) -> dict:
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise NotFoundError(
            f"engine '{engine_dir}': no {MANIFEST_NAME}; is this an engine directory built by fd-build?"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineIncompatibleError(f"engine '{engine_dir}': {MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EngineIncompatibleError(f"engine '{engine_dir}': {MANIFEST_NAME} is not a JSON object")
    return data


# Files are hashed as a sha256 tree: the sha256 of each 64 MiB chunk, then the sha256 of
# those digests. Chunks hash in parallel (hashlib releases the GIL), so checking a 2.6 GB
# engine takes a fraction of a second on a many-core host instead of several seconds.
HASH_CHUNK = 64 << 20
HASH_NAME = "sha256-tree-64MiB"


def _chunk_sha256(path: str | os.PathLike, offset: int, size: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.digest()


def file_sha256(path: str | os.PathLike, pool: ThreadPoolExecutor | None = None) -> str:
    """The file's sha256 tree digest (see HASH_NAME); `pool` hashes the chunks in parallel."""
    size = os.path.getsize(path)
    offsets = range(0, max(size, 1), HASH_CHUNK)
    if pool is None:
        parts = [_chunk_sha256(path, o, HASH_CHUNK) for o in offsets]
    else:
        parts = list(pool.map(lambda o: _chunk_sha256(path, o, HASH_CHUNK), offsets))
    return hashlib.sha256(b"".join(parts)).hexdigest()


def file_record(engine_dir: Path, rel: str) -> dict:
    p = engine_dir / rel
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        digest = file_sha256(p, pool)
    return {"file": rel, "sha256": digest, "hash": HASH_NAME, "bytes": p.stat().st_size}


def listed_files(manifest: dict) -> list[dict]:
    """Every file record the manifest names (graphs, their extra files, artifacts)."""
    out = []
    for g in manifest.get("graphs", {}).values():
        out.extend(g.get("files", []))
    for a in manifest.get("artifacts", {}).values():
        out.append(a)
    return out


# -- validation ------------------------------------------------------------------------


@dataclass
class Validation:
    """What `validate_engine` checked, for `fd-build --check` and load-time logs."""

    manifest: dict
    device: torch.device
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def default_device(manifest: dict) -> torch.device:
    """Where an engine runs when no device is named: where it was built (onnx: the CPU)."""
    if manifest.get("backend") == "onnx":
        return torch.device("cpu")
    return torch.device(manifest.get("fingerprint", {}).get("device_type", "cpu"))


def validate_engine(
    engine_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    check_files: bool = True,
) -> Validation:
    """Refuse an engine that this machine must not run; return the manifest and what was checked.

    Order: manifest present and parseable, schema version, seal (tampering), graph files
    present (NotFoundError) and their sha256, then the fingerprint against this machine.
    """
    engine_dir = Path(engine_dir)
    m = read_manifest(engine_dir)
    checks: list[str] = []
    version = m.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EngineIncompatibleError(
            f"engine '{engine_dir}': manifest schema version {version!r}, this FlashDreams "
            f"({_fd_version()}) reads version {SCHEMA_VERSION}; rebuild the engine with fd-build"
        )
    checks.append(f"schema_version = {SCHEMA_VERSION}")
    recorded = m.get("manifest_sha256")
    actual = manifest_digest(m)
    if recorded != actual:
        raise EngineIncompatibleError(
            f"engine '{engine_dir}': {MANIFEST_NAME} was modified after the build (its seal "
            f"{str(recorded)[:12]}... does not match the content {actual[:12]}...); rebuild the engine with fd-build"
        )
    checks.append(f"manifest seal sha256 {actual[:16]}...")
    backend = m.get("backend")
    if backend not in BACKENDS:
        raise EngineIncompatibleError(f"engine '{engine_dir}': backend {backend!r} is unknown; known: {BACKENDS}")
    records = listed_files(m)
    for rec in records:
        p = engine_dir / rec["file"]
        if not p.is_file():
            raise NotFoundError(
                f"engine '{engine_dir}': graph file '{rec['file']}' named by the manifest is missing; "
                "the directory is incomplete, rebuild it with fd-build"
            )
        if p.stat().st_size != rec["bytes"]:
            raise EngineIncompatibleError(
                f"engine '{engine_dir}': '{rec['file']}' has {p.stat().st_size} bytes, the manifest "
                f"recorded {rec['bytes']}; the file was modified or truncated, rebuild the engine"
            )
    if check_files and records:
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            digests = [file_sha256(engine_dir / r["file"], pool) for r in records]
        for rec, digest in zip(records, digests):
            if digest != rec["sha256"]:
                raise EngineIncompatibleError(
                    f"engine '{engine_dir}': '{rec['file']}' was modified after the build (sha256 "
                    f"{digest[:12]}..., manifest {rec['sha256'][:12]}...); rebuild the engine with fd-build"
                )
        checks.append(f"{len(records)} files present, sha256 verified")
    elif records:
        checks.append(f"{len(records)} files present (sizes only, sha256 not verified)")
    dev = torch.device(device) if device is not None else default_device(m)
    built = m.get("fingerprint", {})
    here = machine_fingerprint(dev)
    if backend != "onnx" and dev.type != built.get("device_type"):
        raise EngineIncompatibleError(
            f"engine '{engine_dir}' was built for device type '{built.get('device_type')}' "
            f"({backend} graphs run only there); device '{dev}' was asked for. "
            f"Rebuild with fd-build --device {dev.type}"
        )
    fp_checks = check_fingerprint(built, here, backend)
    checks += fp_checks or [f"fingerprint: {backend} graphs are portable, no field has to match"]
    notes = []
    for name in ("torch", "triton", "cuda", "cudnn", "tensorrt", "onnxruntime", "driver", "device_name"):
        if name not in required_fields(backend, built.get("device_type", "cpu")) and built.get(name) != here.get(name):
            notes.append(f"{name}: built with {built.get(name)!r}, here {here.get(name)!r} (not required to match)")
    return Validation(m, dev, checks, notes)
