"""FlashVSR's block-sparse attention kernel against its torch twin, and the block selection rule.

On a CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); shapes are tiny (16-token windows) because the interpreter is slow.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs, triton_available  # noqa: E402
from flashdreams.kernels.block_sparse_attention import (  # noqa: E402
    SPARSE_RATIOS,
    block_sparse_attention,
    block_sparse_attention_reference,
    local_window_mask,
    mask_to_lists,
    select_blocks,
    topk_budget,
    topk_ratio_for,
)
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)


def make_case(B, H, d, block, nq, nk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nq * block, H, d, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(B, nk * block, H, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(B, nk * block, H, d, generator=g).to(dtype).to(DEVICE)
    return q, k, v


def brute_force_mask(q, k, block, gh, gw, local_range, topk):
    """The selection rule written out loop by loop (an independent twin of `select_blocks`)."""
    B, _, H, d = q.shape
    S = gh * gw
    nq, nk = q.shape[1] // block, k.shape[1] // block
    out = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    half = local_range // 2
    for b in range(B):
        for h in range(H):
            qbar = [q[b, i * block : (i + 1) * block, h].double().mean(0) for i in range(nq)]
            kbar = [k[b, j * block : (j + 1) * block, h].double().mean(0) for j in range(nk)]
            probs = torch.zeros(nq, nk, dtype=torch.float64)
            for i in range(nq):
                ri, ci = divmod(i % S, gw)
                row = []
                for j in range(nk):
                    rj, cj = divmod(j % S, gw)
                    ok = (
                        ri - half <= rj <= ri - half + local_range - 1
                        and ci - half <= cj <= ci - half + local_range - 1
                    )
                    row.append(float(qbar[i] @ kbar[j]) / math.sqrt(d) if ok else -math.inf)
                probs[i] = torch.softmax(torch.tensor(row, dtype=torch.float64), 0)
            for s in range(nq // S):
                flat = probs[s * S : (s + 1) * S].reshape(-1)
                kk = min(flat.numel() - 1, topk)
                thr = flat.sort(descending=True).values[kk]
                out[b, h, s * S : (s + 1) * S] = (flat > thr).reshape(S, nk)
    return out


def test_local_window_mask_has_no_border_clamp():
    m = local_window_mask(3, 4, 3)  # 3x4 grid, range 3: a window sees its 3x3 neighbourhood, cut at the borders
    assert m.shape == (12, 12) and m.dtype == torch.bool
    assert int(m[0].sum()) == 4  # corner: 2x2
    assert int(m[5].sum()) == 9  # (1, 1): full 3x3
    assert torch.equal(m, m.T)
    even = local_window_mask(1, 6, 2)  # an even range is asymmetric: columns c-1 .. c
    assert even[3].nonzero().flatten().tolist() == [2, 3]


@pytest.mark.parametrize("gh,gw,local_range,slabs_q,slabs_k,ratio", [(2, 3, 3, 1, 3, 1.5), (3, 2, 2, 2, 2, 0.9)])
def test_select_blocks_matches_brute_force(gh, gw, local_range, slabs_q, slabs_k, ratio):
    block, S = 16, gh * gw
    q, k, _ = make_case(2, 2, 8, block, slabs_q * S, slabs_k * S, torch.float32, seed=gh)
    topk = topk_budget(S, ratio)
    mask = select_blocks(q.cpu(), k.cpu(), block, (gh, gw), local_range, topk)
    expect = brute_force_mask(q.cpu(), k.cpu(), block, gh, gw, local_range, topk)
    assert torch.equal(mask, expect)
    # Per head and query slab: at most topk blocks, all inside the local range.
    per_slab = mask.reshape(2, 2, slabs_q, -1).sum(-1)
    assert int(per_slab.max()) <= topk and int(per_slab.min()) > 0
    allowed = local_window_mask(gh, gw, local_range).repeat(slabs_q, slabs_k)
    assert not bool((mask & ~allowed).any())


def test_sparse_ratios_and_budget():
    """'faster' keeps fewer blocks than 'stable'; the budget follows the reference's int(S*S*ratio) - 1."""
    assert SPARSE_RATIOS == {"stable": 2.0, "faster": 1.5}
    r = topk_ratio_for(2.0, 128, 128)
    assert r == 120.0 and topk_budget(1, r) == 119
    s = 66  # 768x1408: 6 x 11 windows per slab
    stable, faster = (topk_budget(s, topk_ratio_for(x, 768, 1408)) for x in (2.0, 1.5))
    assert faster < stable < s * 4 * s
    q, k, _ = make_case(1, 2, 8, 16, 6, 24, torch.float32, seed=3)
    dense = select_blocks(q, k, 16, (2, 3), 5, topk_budget(6, 4.0)).float().mean()
    sparse = select_blocks(q, k, 16, (2, 3), 5, topk_budget(6, 1.0)).float().mean()
    assert sparse < dense


def test_mask_to_lists():
    mask = torch.tensor([[[[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]]], dtype=torch.bool)
    counts, idx = mask_to_lists(mask)
    assert counts.tolist() == [[[2, 0, 4]]]
    assert idx[0, 0, 0, :2].tolist() == [1, 3] and idx[0, 0, 2].tolist() == [0, 1, 2, 3]


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_kernel_matches_twin(dtype, tol):
    """A selection from the real rule, one query window left with no key (zeros), NaN-poisoned output."""
    B, H, d, block, gh, gw = 1, 2, 24, 16, 2, 2  # d padded to 32 inside the kernel
    q, k, v = make_case(B, H, d, block, 4, 12, dtype, seed=7)
    mask = select_blocks(q, k, block, (gh, gw), 3, topk_budget(4, 1.5))
    mask[0, 1, 2] = False
    with poisoned_outputs():
        out = block_sparse_attention(q, k, v, mask, block)
    ref = block_sparse_attention_reference(q, k, v, mask, block)
    assert out.shape == q.shape and out.dtype == dtype and bool(torch.isfinite(out).all())
    assert rel_l2(out, ref) < tol
    assert torch.equal(out[0, 2 * block : 3 * block, 1].float(), torch.zeros(block, d))


@needs_triton
def test_full_mask_is_dense_attention():
    q, k, v = make_case(2, 1, 16, 32, 2, 3, torch.float32, seed=9)
    mask = torch.ones(2, 1, 2, 3, dtype=torch.bool, device=DEVICE)
    out = block_sparse_attention(q, k, v, mask, 32)
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert rel_l2(out, dense.transpose(1, 2)) < 1e-5


def test_bad_arguments_name_the_argument():
    q, k, v = make_case(1, 2, 16, 16, 2, 2, torch.float32)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="mask"):
        block_sparse_attention(q, k, v, mask[:, :, :1], 16)
    with pytest.raises(InvalidArgumentError, match="block"):
        block_sparse_attention(q, k, v, mask, 24)
    with pytest.raises(InvalidArgumentError, match="k"):
        block_sparse_attention(q, k.half(), v, mask, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_at_flashvsr_shapes_on_gpu(dtype):
    """128-token windows, 12 heads of 128 (the 1.3B DiT), 4 key slabs of a 3x4 window grid."""
    q, k, v = make_case(1, 12, 128, 128, 12, 48, dtype, seed=11)
    mask = select_blocks(q, k, 128, (3, 4), 3, topk_budget(12, 2.0))
    with poisoned_outputs():
        out = block_sparse_attention(q, k, v, mask, 128)
    assert rel_l2(out, block_sparse_attention_reference(q, k, v, mask, 128)) < 1e-2
