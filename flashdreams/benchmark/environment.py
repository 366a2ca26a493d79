"""What a benchmark ran on: versions, device, and the machine's measured ceilings.

Numbers are only comparable with the ceilings measured in the same run (machines of
one kind differ by several percent), so fd-bench measures a bf16 matmul peak and a
device-to-device copy bandwidth itself.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import torch


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    """Versions and device description for results.json."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": git_commit(),
        "host_cpu": platform.processor() or platform.machine(),
        "device_type": device.type,
        # The FD_* switches a run was made under (FD_FP8_ATTN_SPLITS, FD_FP8_FAST_ACCUM, ...): they change
        # what the numbers mean.
        "fd_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FD_")},
        # as the process started (None: unset); an FP8 load may set it later, and each run records what its load left
        "cublaslt_workspace_kib": os.environ.get("CUBLASLT_WORKSPACE_SIZE"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gb=round(props.total_memory / 2**30, 1),
        )
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # NVML is optional: the numbers stand without it
            env["driver"] = None
    else:
        env["device_name"] = "cpu"
    return env


def time_calls_ms(fn, device: torch.device, reps: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of `reps` calls: CUDA events on a GPU, the host clock on a CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _median_ms(fn, device: torch.device, reps: int) -> float:
    times = sorted(time_calls_ms(fn, device, reps))
    return times[len(times) // 2]


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    """bf16 (or the run's dtype) matmul TFLOP/s and device copy GB/s (bytes read + written)."""
    n = 1024 if device.type == "cpu" or quick else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    ms = _median_ms(lambda: torch.matmul(a, b), device, 5 if quick else 20)
    size = (64 if device.type == "cpu" or quick else 1024) * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, 5 if quick else 20)
    return {"matmul_n": n, "matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": 2 * size / copy_ms / 1e6}


class NvmlSampler:
    """Samples SM clock, memory clock, power and temperature in a background thread (NVML)."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.samples: list[dict] = []
        self.interval = interval_s
        self._stop = threading.Event()
        self._thread = None
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self._nvml = pynvml
        except Exception:
            self.handle = None

    def _run(self) -> None:
        nv = self._nvml
        while not self._stop.is_set():
            try:
                self.samples.append(
                    {
                        "t": time.perf_counter(),
                        "sm_mhz": nv.nvmlDeviceGetClockInfo(self.handle, nv.NVML_CLOCK_SM),
                        "mem_mhz": nv.nvmlDeviceGetClockInfo(self.handle, nv.NVML_CLOCK_MEM),
                        "power_w": nv.nvmlDeviceGetPowerUsage(self.handle) / 1e3,
                        "temp_c": nv.nvmlDeviceGetTemperature(self.handle, nv.NVML_TEMPERATURE_GPU),
                    }
                )
            except Exception:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> NvmlSampler:
        if self.handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        out = {"samples": len(self.samples)}
        for key in ("sm_mhz", "mem_mhz", "power_w", "temp_c"):
            vals = sorted(s[key] for s in self.samples)
            out[key] = {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1]}
        return out
