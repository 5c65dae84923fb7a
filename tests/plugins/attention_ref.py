"""Random ragged paged-attention batches and a PyTorch reference for them.

Shared by the GPU tests (test_gpu_kernels.py) and the benchmarks (bench/kernels); needs torch
with CUDA. A helper, not a test module: pytest puts this folder on sys.path for the tests
beside it (rootdir-based import mode, no __init__.py), and bench.py adds it itself."""
import math

import torch


def rnd(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def make_batch(lens_new, ctx, hq, hkv, d, bs, dtype, extra_blocks=7):
    """Ragged batch: sequence s has ctx[s] tokens after the step, lens_new[s] of them new.
    Physical blocks are shuffled; unused pool rows hold random garbage."""
    b = len(lens_new)
    mb = max(math.ceil(c / bs) for c in ctx) + 1
    nblocks = sum(math.ceil(c / bs) for c in ctx) + extra_blocks
    perm = torch.randperm(nblocks).tolist()
    tables = torch.zeros(b, mb, dtype=torch.int32)
    for s in range(b):
        for j in range(math.ceil(ctx[s] / bs)):
            tables[s, j] = perm.pop()
    cache = rnd(2, nblocks, hkv, bs, d, dtype=dtype)
    starts = torch.tensor([0] + list(torch.tensor(lens_new).cumsum(0)), dtype=torch.int32)
    t = int(starts[-1])
    q, k, v = (rnd(t, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    ctx_t = torch.tensor(ctx, dtype=torch.int32)
    return (q, k, v, starts.cuda(), ctx_t.cuda(), tables.cuda(), cache)


def ref_attention(q, k, v, starts, ctx, tables, cache, scale, window=0, softcap=0.0,
                  write=True):
    """SDPA on the gathered cache, the new rows written first (so this also states where
    they must land). window > 0: position p sees keys p - window < j <= p (HF Mistral).
    softcap > 0 (Gemma 2): the scaled scores become softcap * tanh(s / softcap) before the
    mask, in fp32 (HF's eager attention; SDPA has no soft-cap). write=False: the cache holds
    the new rows already (k and v unused: an E4M3 pool, which the rope kernel writes)."""
    cache = cache.clone()
    bs = cache.shape[3]
    out = torch.empty_like(q)
    hq, hkv = q.shape[1], cache.shape[2]
    for s in range(len(ctx)):
        a, e = int(starts[s]), int(starts[s + 1])
        n, c = e - a, int(ctx[s])
        for i in range(n if write else 0):
            p = c - n + i
            blk = int(tables[s, p // bs])
            cache[0, blk, :, p % bs] = k[a + i]
            cache[1, blk, :, p % bs] = v[a + i]
        blocks = tables[s, : math.ceil(c / bs)].long()
        kk = cache[0, blocks].permute(1, 0, 2, 3).reshape(hkv, -1, q.shape[2])[:, :c]
        vv = cache[1, blocks].permute(1, 0, 2, 3).reshape(hkv, -1, q.shape[2])[:, :c]
        g = hq // hkv
        kk, vv = kk.repeat_interleave(g, 0), vv.repeat_interleave(g, 0)
        qs = q[a:e].transpose(0, 1)  # [Hq, n, D]
        keys, rows = torch.arange(c, device=q.device), torch.arange(n, device=q.device)
        pos = (c - n + rows)[:, None]
        mask = keys[None, :] <= pos
        if window:
            mask &= keys[None, :] > pos - window
        if softcap:
            s_ = qs.float() @ kk.float().transpose(1, 2) * scale
            s_ = (softcap * torch.tanh(s_ / softcap)).masked_fill(~mask, float("-inf"))
            o = torch.softmax(s_, -1) @ vv.float()
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                qs.float(), kk.float(), vv.float(), attn_mask=mask, scale=scale)
        out[a:e] = o.transpose(0, 1).to(q.dtype)
    return out, cache
