"""Matrix-Game's action-module kernels (norm + RoPE + ring write, short ring attention) against their
torch twins, the twins against the module's own functions, and the module's Triton path against its
torch path over a stream of calls that wraps the rings.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before triton is
imported), which truncates fp32 -> bf16 instead of rounding to nearest even: bf16 is held to 2e-2
there, fp32 to 1e-5. Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import (  # noqa: E402
    action_norm_rope,
    action_norm_rope_cache_write,
    action_norm_rope_cache_write_reference,
    action_norm_rope_reference,
    short_ring_attention,
    short_ring_attention_reference,
    triton_available,
)
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.models.action_module import (  # noqa: E402
    ActionConfig,
    ActionModule,
    action_rope_tables,
    apply_action_rope,
    head_rms,
    ring_attend,
)
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = (torch.float32, torch.bfloat16)


def rand(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def tables(first_frame: int, frames: int, rope_dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return action_rope_tables(torch.arange(first_frame, first_frame + frames, device=DEVICE), rope_dim, 256.0)


def qkv_views(B, T, S, A, hd, g, dtype):
    """q, k, v [B, T, S, A, hd] as the module has them: chunks of one projection (strided rows)."""
    qkv = rand(B, T, S, 3 * A * hd, g=g, dtype=dtype, scale=3.0)
    return tuple(p.unflatten(-1, (A, hd)) for p in qkv.chunk(3, dim=-1))


# ----------------------------------------------------------------------------- norm + RoPE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,rope_dim",
    [
        ((2, 3, 5, 2, 16), 8),  # per position [B, T, S, A, hd]
        ((1, 2, 3, 3, 24), 8),  # head_dim 24 is padded to 32
        ((2, 12, 2, 16), 8),  # shared [B, N, A, hd], 3 frames of 4 tokens
        ((1, 3, 2, 16), 16),  # every channel rotated
    ],
)
def test_norm_rope_matches_twin_and_module(dtype, shape, rope_dim):
    g = torch.Generator().manual_seed(sum(shape) + rope_dim)
    frames = 3 if shape[1] % 3 == 0 else shape[1]
    x = qkv_views(*shape, g, dtype)[1] if len(shape) == 5 else rand(*shape, g=g, dtype=dtype, scale=3.0)
    cos, sin = tables(5, frames, rope_dim)
    with poisoned_outputs():
        out = action_norm_rope(x, cos, sin)
    ref = action_norm_rope_reference(x, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert rel_l2(out, ref) < TOL[dtype]
    # The twin is the module's own chain, bit for bit (frame axis of its own).
    xf = x.unflatten(1, (frames, -1))
    module = apply_action_rope(head_rms(xf), cos, sin, 1).flatten(1, 2)
    assert torch.equal(ref, module)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_position", [True, False])
@pytest.mark.parametrize("slots", [[4, 5, 0], [1, 2, 3]])  # wrapped ring; inside
def test_cache_write_matches_twin(dtype, per_position, slots):
    g = torch.Generator().manual_seed(len(slots) + 7 * per_position + slots[0])
    B, T, S, A, hd, L = 2, 3, 4, 2, 16, 6
    if per_position:
        _, k, v = qkv_views(B, T, S, A, hd, g, dtype)
        cache_shape = (B, S, L, A, hd)
    else:
        kv = rand(B, T, 2 * A * hd, g=g, dtype=dtype, scale=3.0)
        k, v = (p.unflatten(-1, (A, hd)) for p in kv.chunk(2, dim=-1))
        cache_shape = (B, L, A, hd)
    cos, sin = tables(9, T)
    kc, vc = rand(*cache_shape, g=g, dtype=dtype), rand(*cache_shape, g=g, dtype=dtype)
    kt, vt = kc.clone(), vc.clone()
    slot_t = torch.tensor(slots, device=DEVICE)
    action_norm_rope_cache_write(k, v, cos, sin, kc, vc, slot_t)
    action_norm_rope_cache_write_reference(k, v, cos, sin, kt, vt, slot_t)
    dim = 2 if per_position else 1
    written = kc.index_select(dim, slot_t)
    assert rel_l2(written, kt.index_select(dim, slot_t)) < TOL[dtype]
    assert torch.equal(vc, vt)  # raw values bit for bit; the other slots untouched
    rest = torch.tensor([i for i in range(L) if i not in slots], device=DEVICE)
    assert torch.equal(kc.index_select(dim, rest), kt.index_select(dim, rest))


def test_cache_write_into_float32_cache_of_bf16_heads():
    """k is rounded to its own dtype first, then stored in the cache's (as write_frames does)."""
    g = torch.Generator().manual_seed(3)
    _, k, v = qkv_views(1, 2, 3, 2, 16, g, torch.bfloat16)
    cos, sin = tables(0, 2)
    kc, vc = torch.zeros(1, 3, 4, 2, 16, device=DEVICE), torch.zeros(1, 3, 4, 2, 16, device=DEVICE)
    kt, vt = kc.clone(), vc.clone()
    slots = torch.tensor([3, 0], device=DEVICE)
    action_norm_rope_cache_write(k, v, cos, sin, kc, vc, slots)
    action_norm_rope_cache_write_reference(k, v, cos, sin, kt, vt, slots)
    assert rel_l2(kc, kt) < 2e-2 and torch.equal(vc, vt)
    assert torch.equal(kc.to(torch.bfloat16).float(), kc)  # values are bf16's


# ----------------------------------------------------------------------------- short ring attention


def _poison_past(cache: torch.Tensor, valid: int, dim: int, value: float) -> None:
    cache.narrow(dim, valid, cache.shape[dim] - valid).fill_(value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("valid", [2, 6])  # valid < capacity (poisoned slots after), valid == capacity
@pytest.mark.parametrize("norm_rope", [True, False])
def test_per_position_attention_matches_twin(dtype, valid, norm_rope):
    g = torch.Generator().manual_seed(valid + 10 * norm_rope)
    B, T, S, A, hd, L = 2, 3, 5, 2, 16, 6
    q = qkv_views(B, T, S, A, hd, g, dtype)[0]
    # Caches with non-standard strides: [B, S, L, A, hd] views of [B, L, S, A, hd] storage.
    kc = rand(B, L, S, A, hd, g=g, dtype=dtype).transpose(1, 2)
    vc = rand(B, L, S, A, hd, g=g, dtype=dtype).transpose(1, 2)
    _poison_past(kc, valid, 2, 1e4)
    _poison_past(vc, valid, 2, -1e4)
    cos, sin = tables(4, T) if norm_rope else (None, None)
    valid_t = torch.tensor(valid, device=DEVICE)
    with poisoned_outputs():
        out = short_ring_attention(q, kc, vc, valid_t, cos, sin)
    ref = short_ring_attention_reference(q, kc, vc, valid_t, cos, sin)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert rel_l2(out, ref) < TOL[dtype]
    assert out.abs().max() < 100  # nothing of the poisoned slots leaked in


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("valid", [1, 4, 5])
def test_shared_attention_matches_twin(dtype, valid):
    g = torch.Generator().manual_seed(40 + valid)
    B, T, S, A, hd, L = 1, 3, 7, 2, 24, 5  # head_dim 24 padded to 32; 21 queries per head
    q = rand(B, T * S, 3 * A * hd, g=g, dtype=dtype, scale=2.0)[..., A * hd : 2 * A * hd].unflatten(-1, (A, hd))
    kc, vc = rand(B, L, A, hd, g=g, dtype=dtype), rand(B, L, A, hd, g=g, dtype=dtype)
    _poison_past(kc, valid, 1, 1e4)
    _poison_past(vc, valid, 1, -1e4)
    cos, sin = tables(7, T)
    valid_t = torch.tensor([valid], device=DEVICE)
    with poisoned_outputs():
        out = short_ring_attention(q, kc, vc, valid_t, cos, sin)
        plain = short_ring_attention(q, kc, vc, valid_t)
    assert rel_l2(out, short_ring_attention_reference(q, kc, vc, valid_t, cos, sin)) < TOL[dtype]
    assert rel_l2(plain, short_ring_attention_reference(q, kc, vc, valid_t)) < TOL[dtype]


def test_attention_twin_is_the_module_path():
    """The twin equals the module's `ring_attend` on the module's permuted layouts (float32 scores)."""
    g = torch.Generator().manual_seed(11)
    B, T, S, A, hd, L = 1, 3, 4, 2, 16, 6
    q = rand(B, T, S, A, hd, g=g)
    kc, vc = rand(B, S, L, A, hd, g=g), rand(B, S, L, A, hd, g=g)
    valid = torch.tensor(4, device=DEVICE)
    module = ring_attend(q.permute(0, 2, 3, 1, 4), kc.permute(0, 1, 3, 2, 4), vc.permute(0, 1, 3, 2, 4), valid)
    twin = short_ring_attention_reference(q, kc, vc, valid)
    assert rel_l2(twin, module.permute(0, 3, 1, 2, 4)) < 1e-6
    qs = rand(B, T * S, A, hd, g=g)
    ks, vs = rand(B, L, A, hd, g=g), rand(B, L, A, hd, g=g)
    module = ring_attend(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), valid)  # SDPA path
    assert rel_l2(short_ring_attention_reference(qs, ks, vs, valid), module.transpose(1, 2)) < 1e-5


def test_custom_op_exports():
    g = torch.Generator().manual_seed(12)
    q, k, v = qkv_views(1, 3, 2, 2, 16, g, torch.float32)
    kc, vc = rand(1, 2, 4, 2, 16, g=g), rand(1, 2, 4, 2, 16, g=g)
    cos, sin = tables(0, 3)

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, kc, vc, slots, valid):
            action_norm_rope_cache_write(k, v, cos, sin, kc, vc, slots)
            return short_ring_attention(q, kc, vc, valid, cos, sin)

    args = (q, k, v, kc.clone(), vc.clone(), torch.tensor([1, 2, 3], device=DEVICE), torch.tensor(3, device=DEVICE))
    ep = torch.export.export(Attend(), args)
    assert "flashdreams.short_ring_attention" in str(ep.graph)
    assert "flashdreams.action_norm_rope_cache_write" in str(ep.graph)
    kt, vt = kc.clone(), vc.clone()
    action_norm_rope_cache_write_reference(k, v, cos, sin, kt, vt, args[5])
    out = ep.module()(q, k, v, kc, vc, args[5], args[6])
    assert rel_l2(out, short_ring_attention_reference(q, kt, vt, args[6], cos, sin)) < 1e-5
    assert rel_l2(kc, kt) < 1e-5 and torch.equal(vc, vt)


def test_bad_arguments_name_the_argument():
    g = torch.Generator().manual_seed(13)
    q, k, v = qkv_views(1, 3, 2, 2, 16, g, torch.float32)
    kc, vc = rand(1, 2, 4, 2, 16, g=g), rand(1, 2, 4, 2, 16, g=g)
    cos, sin = tables(0, 3)
    slots, valid = torch.tensor([0, 1, 2], device=DEVICE), torch.tensor(3, device=DEVICE)
    kc_before, vc_before = kc.clone(), vc.clone()
    write = action_norm_rope_cache_write
    with pytest.raises(InvalidArgumentError, match="k_cache"):
        write(k, v, cos, sin, kc[:, :1], vc, slots)  # another position count
    with pytest.raises(InvalidArgumentError, match="v_cache"):
        write(k, v, cos, sin, kc, vc[..., :8], slots)
    with pytest.raises(InvalidArgumentError, match="slots"):
        write(k, v, cos, sin, kc, vc, slots[:2])
    with pytest.raises(InvalidArgumentError, match="slots"):
        write(k, v, cos, sin, kc, vc, slots.float())
    with pytest.raises(InvalidArgumentError, match="cos"):
        write(k, v, cos[:1], sin[:1], kc, vc, slots)  # one angle row for three frames
    with pytest.raises(InvalidArgumentError, match="cos"):
        write(k, v, cos.double(), sin, kc, vc, slots)
    with pytest.raises(InvalidArgumentError, match="v"):
        write(k, v[:, :2], cos, sin, kc, vc, slots)
    with pytest.raises(InvalidArgumentError, match="k"):
        write(k.transpose(-1, -2), v, cos, sin, kc, vc, slots)  # last dim not contiguous
    assert torch.equal(kc, kc_before) and torch.equal(vc, vc_before)  # refused before any write
    with pytest.raises(InvalidArgumentError, match="valid"):
        short_ring_attention(q, kc, vc, torch.tensor([3, 3], device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="valid"):
        short_ring_attention(q, kc, vc, torch.tensor(3.0, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="cos/sin"):
        short_ring_attention(q, kc, vc, valid, cos, None)
    with pytest.raises(InvalidArgumentError, match="cos"):
        short_ring_attention(q, kc, vc, valid, torch.ones(3, 9, device=DEVICE), torch.ones(3, 9, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="q"):
        short_ring_attention(q.flatten(2), kc, vc, valid)  # [B, T, S*A*hd]: no head axes
    with pytest.raises(InvalidArgumentError, match="k_cache"):
        short_ring_attention(q, kc[:, :, :, :1], vc, valid)
    with pytest.raises(InvalidArgumentError, match="x"):
        action_norm_rope(q.int(), cos, sin)


# ----------------------------------------------------------------------------- the module


TINY = ActionConfig(heads_num=2, hidden_size=8, img_hidden_size=32, keyboard_hidden_dim=32, mouse_hidden_dim=32)
RING = 6  # cached latent frames
T, S = 3, 4  # latent frames per call, tokens per frame


def _module(cfg: ActionConfig, dtype: torch.dtype, seed: int = 0) -> ActionModule:
    torch.manual_seed(seed)
    m = ActionModule(cfg)
    with torch.no_grad():
        for p in m.parameters():  # LayerNorm's ones/zeros too: every weight matters
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return m.to(DEVICE, dtype).eval()


def _caches(cfg: ActionConfig, dtype: torch.dtype) -> list[torch.Tensor | None]:
    kb, ms = (1, RING, cfg.heads_num, cfg.head_dim), (1, S, RING, cfg.heads_num, cfg.head_dim)
    z = lambda shape: torch.zeros(shape, dtype=dtype, device=DEVICE)  # noqa: E731
    return [z(kb), z(kb), z(ms) if cfg.enable_mouse else None, z(ms) if cfg.enable_mouse else None]


def _calls(cfg: ActionConfig, dtype: torch.dtype, blocks: int = 4, per_block: int = 2):
    """Per call: (x, frame_positions, slots, valid, keyboard_win, mouse_win). Blocks of T frames,
    `per_block` calls each (denoising steps rewriting the same slots); the ring wraps at block 2."""
    g = torch.Generator().manual_seed(21)
    for blk in range(blocks):
        pos = torch.arange(T * blk, T * blk + T, device=DEVICE)
        for _ in range(per_block):
            x = rand(1, T * S, cfg.img_hidden_size, g=g, dtype=dtype)
            kw = (torch.rand(1, T, cfg.window, cfg.keyboard_dim_in, generator=g) > 0.5).float().to(DEVICE)
            mw = rand(1, T, cfg.window, cfg.mouse_dim_in, g=g, scale=0.5) if cfg.enable_mouse else None
            yield x, pos, pos % RING, torch.tensor(min(T * blk + T, RING), device=DEVICE), kw, mw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mouse", [True, False])
def test_module_triton_path_matches_torch_path(dtype, mouse):
    cfg = TINY if mouse else ActionConfig(**{**TINY.to_dict(), "enable_mouse": False, "keyboard_dim_in": 7})
    """Over blocks of calls that wrap the rings: outputs, caches and traced intermediates agree. In bf16
    (where the fused path rounds differently: the mouse MLP's first Linear split into a per-token and a
    per-frame GEMM, the residual inside the projection's GEMM) both paths are held against a float64
    run of the same weights, and the fused one may not be worse than the torch one."""
    module = _module(cfg, dtype)
    truth = copy.deepcopy(module).double()
    torch_caches, triton_caches = _caches(cfg, dtype), _caches(cfg, dtype)
    truth_caches = _caches(cfg, torch.float64)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    with torch.no_grad():
        for i, (x, pos, slots, valid, kw, mw) in enumerate(_calls(cfg, dtype)):
            trace_t: dict = {}
            want = module(x, pos, slots, valid, kw, mw, *torch_caches, trace=trace_t)
            got = module(x, pos, slots, valid, kw, mw, *triton_caches, impl="triton")
            assert got.shape == want.shape and got.dtype == dtype
            assert rel_l2(got, want) < tol, f"call {i}: {rel_l2(got, want):.2e}"
            exact = truth(x.double(), pos, slots, valid, kw, mw.double() if mw is not None else None, *truth_caches)
            err_torch, err_fused = rel_l2(want.double(), exact), rel_l2(got.double(), exact)
            assert err_fused < 1.5 * err_torch + 1e-7, f"call {i}: fused {err_fused:.2e} vs torch {err_torch:.2e}"
            for ours, theirs in zip(triton_caches, torch_caches):
                if ours is not None:
                    assert rel_l2(ours, theirs) < tol, f"call {i}: caches differ"
            # The fused path with a trace (unfused projections) gives the same intermediates; its
            # writes repeat this call's (same slots, same values), so it runs on copies.
            fused_trace: dict = {}
            again = [c.clone() if c is not None else None for c in triton_caches]
            traced = module(x, pos, slots, valid, kw, mw, *again, impl="triton", trace=fused_trace)
            assert rel_l2(traced, want) < tol
            assert fused_trace.keys() == trace_t.keys()
            for name, value in trace_t.items():
                assert rel_l2(fused_trace[name], value) < tol, f"call {i}: trace {name}"


def test_module_refuses_unknown_impl():
    module = _module(TINY, torch.float32)
    x, pos, slots, valid, kw, mw = next(_calls(TINY, torch.float32))
    with pytest.raises(InvalidArgumentError, match="implementation"):
        module(x, pos, slots, valid, kw, mw, *_caches(TINY, torch.float32), impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_triton_path_in_a_cuda_graph(dtype):
    """The fused path on CUDA, captured once in a CUDA graph and replayed over a wrapping stream of
    calls (new frame positions, slots and valid counts copied into the captured inputs), equals the
    torch path run eagerly."""
    cfg = dataclass_tiny_for_gpu()
    module = _module(cfg, dtype)
    calls = list(_calls(cfg, dtype))
    static = [t.clone() for t in calls[0]]
    torch_caches, graph_caches = _caches(cfg, dtype), _caches(cfg, dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up compiles the kernels outside the capture
            module(*static, *[c.clone() if c is not None else None for c in graph_caches], impl="triton")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = module(*static, *graph_caches, impl="triton")
        for i, call in enumerate(calls):
            for dst, src in zip(static, call):
                dst.copy_(src)
            graph.replay()
            want = module(*call, *torch_caches)
            torch.cuda.synchronize()
            assert rel_l2(out, want) < tol, f"call {i}: {rel_l2(out, want):.2e}"
            for ours, theirs in zip(graph_caches, torch_caches):
                assert rel_l2(ours, theirs) < tol, f"call {i}: caches differ"


def dataclass_tiny_for_gpu() -> ActionConfig:
    """Matrix-Game's head shape (64-wide heads, 8 rotated channels) at a small width."""
    return ActionConfig(heads_num=4, hidden_size=16, img_hidden_size=128, keyboard_hidden_dim=256, mouse_hidden_dim=256)
