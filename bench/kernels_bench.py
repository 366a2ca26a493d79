"""Benchmark the Triton kernels at Self-Forcing shapes, with the machine's own ceilings in the same run.

Shapes: B 1, one block of 3 latent frames (4680 query tokens, 1560 per frame), 12 heads
of d 128, bf16, the KV ring holding 4680..32760 valid tokens (blocks 0..6 of a rollout).

Reported, all medians of `triton.testing.do_bench` (which wipes the L2 with a 256 MB
memset before every timed call, so memory-bound kernels are timed cold, as in the model):
  * ceilings: bf16 matmul 8192^3 (TFLOP/s) and a device-to-device copy of 1 GiB (GB/s,
    read + write);
  * ring attention per KV length, TFLOP/s (4 * Lq * Lkv * d * N per call), beside
    `scaled_dot_product_attention` with each backend on the same sliced cache views;
  * a sweep of `ring_attention_configs.SWEEP_CONFIGS` at three KV lengths (the best is
    printed, so CUDA_CONFIGS can be set from it); each config's output is checked against
    the twin, and one that fails to compile is recorded, not fatal;
  * the memory-bound kernels' GB/s (bytes each must move / time) against the copy rate,
    their eager torch twins' time, and a sweep of the row-tile size for five of them;
  * correctness of every kernel against its twin on the GPU (rel. L2), a CUDA-graph
    capture/replay check and a torch.compile (Inductor) check of the custom ops.

    python bench/kernels_bench.py                       # H100: writes bench/results/kernels-h100.json
    python bench/kernels_bench.py --no-sweep --no-compile-check     # the quick version (~1 min)
    python bench/kernels_bench.py --smoke               # CPU, tiny shapes, Triton interpreter (~30 s)
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdreams import kernels as K  # noqa: E402
from flashdreams.kernels import _common  # noqa: E402
from flashdreams.kernels import ring_attention_configs as configs  # noqa: E402
from flashdreams.kernels.ring_attention import launch_ring_attention  # noqa: E402
from flashdreams.kernels.ring_attention_configs import SWEEP_CONFIGS, AttnConfig, pick_config  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shapes:
    batch: int
    frames: int  # latent frames per block
    fs: int  # tokens per latent frame
    heads: int
    head_dim: int
    ring_frames: int  # frames the ring holds (the largest KV length / fs)
    check_rows: int  # query rows checked against the fp32 twin (the twin's scores are Lq x Lkv)

    @property
    def L(self) -> int:
        return self.frames * self.fs

    @property
    def D(self) -> int:
        return self.heads * self.head_dim

    def kv_lengths(self) -> list[int]:
        return [self.L * i for i in range(1, self.ring_frames // self.frames + 1)]


SELF_FORCING = Shapes(1, 3, 1560, 12, 128, 21, 512)
SMOKE = Shapes(1, 3, 15, 2, 32, 9, 45)


GRAPH_FALLBACKS: list[str] = []  # calls that could not be captured and were timed host-launched


def timer(smoke: bool) -> Callable[..., float]:
    """Median ms of fn: on a GPU, fn captured once in a CUDA graph and replayed by do_bench.

    do_bench wipes the L2 before each replay, and the graph removes the host's launch
    overhead (Python wrappers, argument checks), which would otherwise dominate the
    memory-bound kernels' 5-40 us. Where capture fails, fn is timed as launched.
    In the CPU smoke test: a few perf_counter runs.
    """
    if not smoke:
        import triton.testing

        def gpu_ms(fn: Callable[[], object], label: str = "") -> float:
            fn()  # compile / autotune outside the capture
            torch.cuda.synchronize()
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                run = graph.replay
            except Exception as e:  # noqa: BLE001
                GRAPH_FALLBACKS.append(f"{label}: {type(e).__name__}: {str(e)[:120]}")
                graph, run = None, fn
            t = float(triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"))
            del graph, run
            torch.cuda.empty_cache()
            return t

        return gpu_ms

    def cpu_ms(fn: Callable[[], object], label: str = "") -> float:
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return cpu_ms


def attempt(fn: Callable[[], dict]) -> dict:
    """Run one measurement; a failure is recorded, not fatal (a config may not compile)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the bench records and goes on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def environment(dev: torch.device) -> dict:
    import triton

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(dev),
        "interpreted": _common.interpreted(),
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(
            name=p.name,
            sm_count=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_bytes=getattr(p, "L2_cache_size", None),
        )
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            env["nvidia_smi"] = out.stdout.strip().splitlines()[dev.index or 0]
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = f"unavailable: {e}"
    return env


def ceilings(dev: torch.device, ms: Callable, smoke: bool) -> dict:
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t_mm = ms(lambda: a @ b, "matmul")
    nbytes = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(nbytes, device=dev, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    t_cp = ms(lambda: dst.copy_(src), "copy")
    return {
        "matmul_bf16_n": n,
        "matmul_ms": t_mm,
        "matmul_tflops": 2 * n**3 / t_mm / 1e9,
        "copy_bytes": nbytes,
        "copy_ms": t_cp,
        "copy_gbps": 2 * nbytes / t_cp / 1e6,
    }


def attention(sh: Shapes, dev: torch.device, ms: Callable, smoke: bool) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    S = sh.ring_frames * sh.fs
    dt = torch.bfloat16
    q = torch.randn(sh.batch, sh.L, sh.heads, sh.head_dim, device=dev, generator=g).to(dt)
    kc = torch.randn(sh.batch, S, sh.heads, sh.head_dim, device=dev, generator=g).to(dt)
    vc = torch.randn(sh.batch, S, sh.heads, sh.head_dim, device=dev, generator=g).to(dt)
    scale = 1.0 / math.sqrt(sh.head_dim)
    kvs = sh.kv_lengths()

    def flops(kv: int) -> float:
        return 4.0 * sh.batch * sh.L * kv * sh.head_dim * sh.heads

    def vl(kv: int) -> torch.Tensor:
        return torch.tensor([kv], device=dev, dtype=torch.int32)

    # Correctness: the first check_rows queries against the fp32 twin at the longest ring.
    rows, kv_max = sh.check_rows, kvs[-1]
    twin = K.ring_attention_reference(q[:, :rows], kc, vc, vl(kv_max), scale)
    res: dict = {"kv_lengths": kvs, "default_config": dataclasses.asdict(pick_config(q, S))}
    out = K.ring_attention(q, kc, vc, vl(kv_max))
    res["rel_l2_vs_twin"] = rel_l2(out[:, :rows], twin)

    def ours(kv: int) -> dict:
        lens = vl(kv)
        t = ms(lambda: launch_ring_attention(q, kc, vc, lens, scale), f"ours kv {kv}")
        return {"kv": kv, "ms": t, "tflops": flops(kv) / t / 1e9}

    res["ours"] = [attempt(lambda kv=kv: ours(kv)) for kv in kvs]

    backends = (
        {"math": "MATH"}
        if smoke
        else {
            "cudnn": "CUDNN_ATTENTION",
            "cudnn_contiguous": "CUDNN_ATTENTION",  # [B, N, L, d] copies, outside the timing
            "flash": "FLASH_ATTENTION",
            "efficient": "EFFICIENT_ATTENTION",
            "math": "MATH",
        }
    )
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt = q.transpose(1, 2)
    res["sdpa"] = {}
    for name, backend in backends.items():

        def one(kv: int, name: str = name, backend: str = backend) -> dict:
            qb, kt, vt = qt, kc[:, :kv].transpose(1, 2), vc[:, :kv].transpose(1, 2)
            if name.endswith("_contiguous"):
                qb, kt, vt = qb.contiguous(), kt.contiguous(), vt.contiguous()
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                t = ms(lambda: F.scaled_dot_product_attention(qb, kt, vt), f"sdpa {name} kv {kv}")
                o = F.scaled_dot_product_attention(qb[:, :, :rows], kt, vt).transpose(1, 2)
            return {
                "kv": kv,
                "ms": t,
                "tflops": flops(kv) / t / 1e9,
                "rel_l2_vs_twin": rel_l2(o, twin) if kv == kv_max else None,
            }

        res["sdpa"][name] = [attempt(lambda kv=kv: one(kv)) for kv in kvs]
    return res


def sweep(sh: Shapes, dev: torch.device, ms: Callable) -> dict:
    """Every config of SWEEP_CONFIGS at three KV lengths, each checked against the twin."""
    g = torch.Generator(device=dev).manual_seed(1)
    S = sh.ring_frames * sh.fs
    q = torch.randn(sh.batch, sh.L, sh.heads, sh.head_dim, device=dev, generator=g).to(torch.bfloat16)
    kc = torch.randn(sh.batch, S, sh.heads, sh.head_dim, device=dev, generator=g).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    kvs = sh.kv_lengths()
    points = sorted({kvs[0], kvs[len(kvs) // 2], kvs[-1]})
    scale = 1.0 / math.sqrt(sh.head_dim)
    vls = {kv: torch.tensor([kv], device=dev) for kv in points}
    twin = K.ring_attention_reference(q[:, : sh.check_rows], kc, vc, vls[points[-1]], scale)
    rows = []
    for cfg in SWEEP_CONFIGS:

        def run(cfg: AttnConfig = cfg) -> dict:
            out, _ = launch_ring_attention(q, kc, vc, vls[points[-1]], scale, cfg)
            err = rel_l2(out[:, : sh.check_rows], twin)
            tf = []
            for kv in points:
                t = ms(lambda kv=kv: launch_ring_attention(q, kc, vc, vls[kv], scale, cfg), f"{cfg} kv {kv}")
                tf.append(4.0 * sh.batch * sh.L * kv * sh.head_dim * sh.heads / t / 1e9)
            return {"tflops": tf, "mean_tflops": statistics.mean(tf), "rel_l2_vs_twin": err}

        rows.append({"config": dataclasses.asdict(cfg), **attempt(run)})
    good = [r for r in rows if "mean_tflops" in r and r["rel_l2_vs_twin"] < 2e-2]
    best = max(good, key=lambda r: r["mean_tflops"]) if good else None
    return {"kv_points": points, "configs": rows, "best": best}


TILE_SWEEP = (2048, 8192, 16384)  # beside the default ROW_TILE_ELEMS (4096)
TILE_SWEEP_CASES = (
    "rope_cache_write",
    "qk_norm_rope_cache_write",
    "rms_norm",
    "adaln_modulate[x_fp32]",
    "gated_residual_adaln[x_fp32]",
)


def memory_bound(sh: Shapes, dev: torch.device, ms: Callable, copy_gbps: float, tile_sweep: bool) -> dict:
    """GB/s of the row kernels and the fused RoPE cache writers, beside their eager twins.

    With `tile_sweep`, also the GB/s at each `_common.ROW_TILE_ELEMS` in TILE_SWEEP.
    """
    g = torch.Generator(device=dev).manual_seed(2)
    bf, f32 = torch.bfloat16, torch.float32
    B, L, N, d, D, F_ = sh.batch, sh.L, sh.heads, sh.head_dim, sh.D, sh.frames
    S = sh.ring_frames * sh.fs

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    def nb(*ts: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    q4, k4, v4 = rnd(B, L, N, d), rnd(B, L, N, d), rnd(B, L, N, d)
    q3, k3, v3 = q4.view(B, L, D), k4.view(B, L, D), v4.view(B, L, D)
    ang = torch.rand(L, d // 2, device=dev, generator=g) * 6.283
    cos, sin = ang.cos(), ang.sin()
    kc, vc = rnd(B, S, N, d), rnd(B, S, N, d)
    slots = torch.arange(sh.ring_frames - F_, sh.ring_frames, device=dev)
    wq, wk = rnd(D), rnd(D)
    shift, scale, gate = rnd(B, F_, D, dtype=f32), rnd(B, F_, D, dtype=f32), rnd(B, F_, D, dtype=f32)
    w_ln, b_ln = rnd(D, dtype=f32), rnd(D, dtype=f32)
    rope_bytes = 6 * nb(q4) + nb(cos, sin)

    cases: dict[str, tuple[Callable, Callable, int]] = {
        "rope_cache_write": (
            lambda c: K.rope_cache_write(q4, k4, v4, cos, sin, c[0], c[1], slots, sh.fs),
            lambda c: K.rope_cache_write_reference(q4, k4, v4, cos, sin, c[0], c[1], slots, sh.fs),
            rope_bytes,
        ),
        "qk_norm_rope_cache_write": (
            lambda c: K.qk_norm_rope_cache_write(q3, k3, v3, wq, wk, 1e-6, cos, sin, c[0], c[1], slots, sh.fs),
            lambda c: K.qk_norm_rope_cache_write_reference(
                q3, k3, v3, wq, wk, 1e-6, cos, sin, c[0], c[1], slots, sh.fs
            ),
            rope_bytes + nb(wq, wk),
        ),
        "rms_norm": (
            lambda c: K.rms_norm(q3, wq, 1e-6),
            lambda c: K.rms_norm_reference(q3, wq, 1e-6),
            2 * nb(q3) + nb(wq),
        ),
    }
    tsc, tsh = rnd(B, L, D), rnd(B, L, D)  # LingBot's camera scale/shift, per token (bf16)
    for x_dt in (bf, f32):  # Wan's residual stream is float32 after the first block
        x, y = rnd(B, L, D, dtype=x_dt), rnd(B, L, D)
        tag = "bf16" if x_dt == bf else "x_fp32"
        mods = nb(shift, scale)
        cases[f"adaln_modulate[{tag}]"] = (
            lambda c, x=x: K.adaln_modulate(x, shift, scale, 1e-6, bf),
            lambda c, x=x: K.adaln_modulate_reference(x, shift, scale, 1e-6, bf),
            nb(x) + nb(q3) + mods,
        )
        cases[f"gated_residual[{tag}]"] = (
            lambda c, x=x, y=y: K.gated_residual(x, y, gate),
            lambda c, x=x, y=y: K.gated_residual_reference(x, y, gate),
            2 * nb(x) + nb(y) + nb(gate),
        )
        cases[f"gated_residual_adaln[{tag}]"] = (
            lambda c, x=x, y=y: K.gated_residual_adaln(x, y, gate, shift, scale, 1e-6, bf),
            lambda c, x=x, y=y: K.gated_residual_adaln_reference(x, y, gate, shift, scale, 1e-6, bf),
            2 * nb(x) + nb(y) + nb(q3) + mods + nb(gate),
        )
        cases[f"gated_residual_modulate_layer_norm[{tag}]"] = (
            lambda c, x=x, y=y: K.gated_residual_modulate_layer_norm(x, y, gate, tsc, tsh, w_ln, b_ln, 1e-6, bf),
            lambda c, x=x, y=y: K.gated_residual_modulate_layer_norm_reference(
                x, y, gate, tsc, tsh, w_ln, b_ln, 1e-6, bf
            ),
            2 * nb(x) + nb(y) + nb(q3) + nb(gate) + nb(tsc, tsh) + nb(w_ln, b_ln),
        )
        cases[f"layer_norm_affine[{tag}]"] = (
            lambda c, x=x: K.layer_norm_affine(x, w_ln, b_ln, 1e-6, bf),
            lambda c, x=x: K.layer_norm_affine_reference(x, w_ln, b_ln, 1e-6, bf),
            nb(x) + nb(q3) + nb(w_ln, b_ln),
        )

    # The AdaLN kernels with their per-frame vectors loaded per row, as before they were loaded once
    # per program (kernels/adaln.py ONE_FRAME_LOADS): the same run's ratio of the two.
    from flashdreams.kernels import adaln as adaln_module

    def per_row_loads(fn: Callable) -> Callable:
        def run(c):
            adaln_module.ONE_FRAME_LOADS = False
            try:
                return fn(c)
            finally:
                adaln_module.ONE_FRAME_LOADS = True

        return run

    for name in ("adaln_modulate[x_fp32]", "gated_residual[x_fp32]", "gated_residual_adaln[x_fp32]"):
        ours, twin, nbytes = cases[name]
        cases[name.replace("]", ", per-row loads]")] = (per_row_loads(ours), twin, nbytes)

    res = {}
    for name, (ours, twin, nbytes) in cases.items():

        def one(name=name, ours=ours, twin=twin, nbytes=nbytes) -> dict:
            c1, c2 = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
            got, want = ours(c1), twin(c2)
            got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
            errs = [rel_l2(a, b) for a, b in zip(got, want)] + [rel_l2(c1[0], c2[0]), rel_l2(c1[1], c2[1])]
            t, t_twin = ms(lambda: ours(c1), name), ms(lambda: twin(c2), f"{name} twin")
            gbps = nbytes / t / 1e6
            row = {
                "ms": t,
                "bytes": nbytes,
                "gbps": gbps,
                "fraction_of_copy": gbps / copy_gbps,
                "twin_ms": t_twin,
                "speedup_vs_twin": t_twin / t,
                "max_rel_l2_vs_twin": max(errs),
                "row_tile_elems": _common.ROW_TILE_ELEMS,
            }
            if tile_sweep and name in TILE_SWEEP_CASES:
                default, row["tile_sweep_gbps"] = _common.ROW_TILE_ELEMS, {}
                try:
                    for te in TILE_SWEEP:
                        _common.ROW_TILE_ELEMS = te
                        row["tile_sweep_gbps"][te] = nbytes / ms(lambda: ours(c1), f"{name} tile {te}") / 1e6
                finally:
                    _common.ROW_TILE_ELEMS = default
            return row

        res[name] = attempt(one)
    return res


@contextlib.contextmanager
def use_config(cfg: AttnConfig | None, head_dim: int):
    """Make `cfg` the attention config the custom op picks (on CUDA and in the interpreter)."""
    if cfg is None:
        yield
        return
    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    saved = configs.CUDA_CONFIGS[d_pad], configs.CPU_CONFIG
    configs.CUDA_CONFIGS[d_pad], configs.CPU_CONFIG = cfg, cfg
    try:
        yield
    finally:
        configs.CUDA_CONFIGS[d_pad], configs.CPU_CONFIG = saved


def graph_and_compile_checks(dev: torch.device, compile_check: bool) -> dict:
    """A block step (fused norm/RoPE write + ring attention) in a CUDA graph and under torch.compile.

    The graph is captured once and replayed with new slots / valid_len written into its
    device tensors; each replay must match the twins. Run with the default attention
    config and with a TMA one (whose tensor descriptors need scratch memory at launch).
    """
    g = torch.Generator(device=dev).manual_seed(3)
    B, N, d, fs, L = 1, 2, 128, 64, 128
    S = 4 * fs
    q, k, v = (torch.randn(B, L, N * d, device=dev, generator=g).to(torch.bfloat16) for _ in range(3))
    w = torch.randn(N * d, device=dev, generator=g).to(torch.bfloat16)
    ang = torch.rand(L, d // 2, device=dev, generator=g)
    cos, sin = ang.cos(), ang.sin()
    kc = torch.zeros(B, S, N, d, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([0, 1], device=dev)
    valid = torch.tensor([2 * fs], device=dev)

    def twin_step():
        kt, vt = kc.clone(), vc.clone()
        qr = K.qk_norm_rope_cache_write_reference(q, k, v, w, w, 1e-6, cos, sin, kt, vt, slots, fs)
        return K.ring_attention_reference(qr, kt, vt, valid)

    out: dict = {}
    for tag, cfg in (("default", None), ("tma", AttnConfig(128, 64, 8, 3, splits=2, use_tma=True))):

        def step():
            qr = K.qk_norm_rope_cache_write(q, k, v, w, w, 1e-6, cos, sin, kc, vc, slots, fs)
            return K.ring_attention(qr, kc, vc, valid)

        with use_config(cfg, d):
            if dev.type == "cuda":

                def graph() -> dict:
                    kc.zero_()
                    vc.zero_()
                    slots.copy_(torch.tensor([0, 1], device=dev))
                    valid.fill_(2 * fs)
                    step()  # warm-up: compiles the kernels outside capture
                    torch.cuda.synchronize()
                    gr = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(gr):
                        o = step()
                    errs = []
                    for s, vlen in (([2, 3], 4 * fs), ([1, 0], 4 * fs), ([3, 2], 3 * fs)):
                        slots.copy_(torch.tensor(s, device=dev))
                        valid.fill_(vlen)
                        want = twin_step()
                        gr.replay()
                        errs.append(rel_l2(o, want))
                    return {"replay_rel_l2": errs}

                out[f"cuda_graph_{tag}"] = attempt(graph)
            if compile_check:

                def compiled() -> dict:
                    backend = "inductor" if dev.type == "cuda" else "eager"
                    kc.zero_()
                    vc.zero_()
                    want = twin_step()
                    t0 = time.perf_counter()
                    got = torch.compile(step, backend=backend, fullgraph=True)()
                    return {"backend": backend, "rel_l2": rel_l2(got, want), "compile_s": time.perf_counter() - t0}

                out[f"torch_compile_{tag}"] = attempt(compiled)
    return out


def print_table(r: dict) -> None:
    c = r["ceilings"]
    print(
        f"\n{r['env'].get('name', r['env']['device'])}: matmul {c['matmul_tflops']:.0f} TFLOP/s, "
        f"copy {c['copy_gbps']:.0f} GB/s"
    )
    a = r["attention"]
    print(f"ring attention (rel L2 vs twin {a['rel_l2_vs_twin']:.1e}), TFLOP/s:")
    names = ["ours", *a["sdpa"]]
    print("  kv     " + "".join(f"{n:>10}" for n in names))
    for i, kv in enumerate(a["kv_lengths"]):
        cells = [a["ours"][i], *(a["sdpa"][n][i] for n in a["sdpa"])]
        print(f"  {kv:<7}" + "".join(f"{x['tflops']:>10.1f}" if "tflops" in x else f"{'err':>10}" for x in cells))
    if r.get("sweep"):
        print("sweep (mean TFLOP/s over kv", r["sweep"]["kv_points"], "):")
        for row in r["sweep"]["configs"]:
            cfg = " ".join(f"{k}={v}" for k, v in row["config"].items())
            val = (
                f"{row['mean_tflops']:.1f} (rel L2 {row['rel_l2_vs_twin']:.1e})"
                if "mean_tflops" in row
                else row["error"][:80]
            )
            print(f"  {cfg:<90} {val}")
        best = r["sweep"]["best"]
        print("  best:", best["config"] if best else None)
    print("memory-bound kernels:")
    for name, m in r["memory_bound"].items():
        if "error" in m:
            print(f"  {name:<34} {m['error'][:100]}")
        else:
            sweep = " ".join(f"{k}:{v:.0f}" for k, v in m.get("tile_sweep_gbps", {}).items())
            print(
                f"  {name:<30} {m['ms'] * 1e3:8.1f} us {m['gbps']:6.0f} GB/s ({m['fraction_of_copy']:4.0%} of copy)"
                f"  twin {m['twin_ms'] * 1e3:8.1f} us  rel L2 {m['max_rel_l2_vs_twin']:.1e}  tiles {sweep}"
            )
    print("checks:", json.dumps(r["checks"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-h100.json)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the ring-attention config sweep")
    ap.add_argument("--no-compile-check", action="store_true", help="skip the torch.compile check")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    K.require_triton(dev)
    sh = SMOKE if args.smoke else SELF_FORCING
    ms = timer(args.smoke)
    t0 = time.perf_counter()
    r: dict = {"env": environment(dev), "shapes": dataclasses.asdict(sh), "section_s": {}}

    def section(name: str, fn: Callable[[], object]) -> None:
        t = time.perf_counter()
        r[name] = fn()
        r["section_s"][name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {r['section_s'][name]} s", flush=True)

    section("ceilings", lambda: ceilings(dev, ms, args.smoke))
    section("attention", lambda: attention(sh, dev, ms, args.smoke))
    section("sweep", lambda: None if args.no_sweep else sweep(sh, dev, ms))
    section("memory_bound", lambda: memory_bound(sh, dev, ms, r["ceilings"]["copy_gbps"], not args.no_sweep))
    section("checks", lambda: graph_and_compile_checks(dev, not args.no_compile_check))
    r["graph_capture_fallbacks"] = GRAPH_FALLBACKS
    r["wall_s"] = time.perf_counter() - t0
    default = (
        Path(tempfile.gettempdir()) / "kernels-smoke.json" if args.smoke else Path("bench/results/kernels-h100.json")
    )
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1, default=str))
    print_table(r)
    print(f"\nwrote {out} ({r['wall_s']:.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
