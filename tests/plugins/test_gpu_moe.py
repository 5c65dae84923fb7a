"""The mixture-of-experts kernels (plugins/kernels/moe.cu, moe_fp8b.cu) against PyTorch on
the GPU (marked `gpu`; skipped without CUDA). Outputs are poisoned (NaN, or -7 for
integers) before each launch, so anything a kernel leaves unwritten fails the check.

What is held, and how closely:
- routing: each token's experts equal a stable-sorted softmax's top k (ties to the lower
  index, as ONNX TopK) wherever the k-th and (k+1)-th probabilities differ by more than
  1e-5 (softmax implementations differ in the last bits; the logits are distinct values, so
  that is every row but those built to tie, which must take the lower index); their
  weights within 1e-6;
- grouping, exactly: offsets are the counts' prefix sums, each expert's positions hold its
  tokens in ascending order, pos_of and perm agree, the tiles cover every position once and
  stay within launch_rules.moe_max_tiles;
- the grouped GEMMs, each against its own inputs (the kernels' routing and activations):
  max |got - ref| / max |ref| < 1e-2 (the 16-bit rounding of the outputs, as
  test_gpu_gemv.py holds the GEMV to), the reference in fp32 with the graph's roundings;
- the combine: < 5e-3 against the fp32 sum of the kernel's own rows (the same products and
  sums in the same order: a bf16 output may differ by one rounding);
- the layer end to end against a reference built from scratch, < 2e-2;
- a CUDA graph of the layer replays other routings (no size comes from the host);
- the grouping over 33, 200 and 256 experts (the scan of the counts a CTA's width at a
  time), and from launch_rules.MOE_GRID_ROUTE_ROWS routed rows over a grid of chunks (the
  same positions, checked exactly).
Shapes: T = 1 .. 1000 (the 8-row tiles of decode steps and of steps whose experts hold
few rows, Qwen3-MoE-like up to 64 tokens, and the 64- and 128-row tiles of the
shared-memory tiled GEMM, at the sizes where the launch rules switch; on sm_90a its wgmma
form, which the layer takes there, and the mma.sync form too over uneven loads),
Mixtral-like (8 experts, top 2, renormalised), Qwen2-MoE-like (60, top 4, not
renormalised, an intermediate size that is not a multiple of 32), Qwen3-MoE-like (128, top
8), each with
even loads and with skewed ones where one expert takes most tokens and half the experts
none (their weights NaN, so reading them into any output fails the test). The tiled GEMM
also over uneven loads (counts that are no multiple of a tile, a quarter of the experts
empty, NaN weights) at hidden and intermediate sizes that leave partial k steps and N
blocks (multiples of 8 only).
Block-wise FP8 experts (moe_fp8b.cu): the same GEMM bounds against the same references run
on the weights dequantized as the graph's DequantizeLinear does (q * s rounded once to the
dtype), blocks of 128, 64 and 32, a K that is an odd number of 32s (a half chunk of the
decode kernel), partial N blocks, NaN experts no token chose.
"""
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and torch.cuda"),
    pytest.mark.usefixtures("poison"),
]

from llmc.plugins import launch_rules as lr  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
TOKENS = (1, 2, 5, 8, 9, 64, 128, 129, 300, 1000)
# (experts, top_k, renormalise, hidden, inter)
CONFIGS = [(8, 2, True, 256, 384), (60, 4, False, 128, 176), (128, 8, True, 128, 64)]
TOL, COMBINE_TOL, LAYER_TOL, MARGIN = 1e-2, 5e-3, 2e-2, 1e-5


def tied_top(experts, k):
    """Row 2's experts: k - 1 clear winners below experts / 2, then expert 0 tied with
    expert experts / 2 - k for the last place (ONNX TopK takes the lower index)."""
    return sorted([0] + [experts // 2 - 1 - i for i in range(k - 1)])


def make(t, experts, hidden, inter, dtype, load, seed=0, k=2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, hidden, generator=g, device="cuda").to(dtype)
    # each token's logits a random permutation of distinct values, exact in fp16 and bf16
    # (random 16-bit logits tie often among 128 experts: the k-th and (k+1)-th would be a
    # coin toss for any implementation)
    step = 0.5 if experts <= 32 else 0.0625
    order = torch.rand(t, experts, generator=g, device="cuda").argsort(-1)
    logits = (order - experts // 2).float() * step
    if load == "skewed":   # expert 0 takes most tokens; the upper half takes none
        logits[:, 0] += 6
        logits[:, experts // 2:] -= 40
    if t >= 3:             # all equal (the top k are experts 0 .. k-1), and a two-way tie
        logits[1] = 0.5
        logits[2] = -5.0
        for i in range(k - 1):
            logits[2, experts // 2 - 1 - i] = 3.0 + 0.5 * i
        logits[2, 0] = logits[2, experts // 2 - k] = 1.0
    logits = logits.to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g, device="cuda")
               * hidden ** -0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=g, device="cuda")
            * inter ** -0.5).to(dtype)
    if load == "skewed":   # experts no token chose: NaN weights must not reach any output
        gate_up[experts // 2:] = float("nan")
        down[experts // 2:] = float("nan")
    return x, logits, gate_up, down


def route_ref(logits, k, renormalise):
    """(ids ascending, weights, margin) of each token: ONNX TopK's order on fp32 softmax."""
    p = torch.softmax(logits.float(), dim=-1)
    sp, order = torch.sort(p, dim=-1, descending=True, stable=True)   # ties: lower index
    ids, w = order[:, :k], sp[:, :k]
    if renormalise:
        w = w / w.sum(-1, keepdim=True)
    margin = (sp[:, k - 1] - sp[:, k]) if k < p.shape[1] else torch.ones_like(sp[:, 0])
    ids, perm = torch.sort(ids, dim=-1)
    return ids.int(), torch.gather(w, 1, perm), margin


def rnd(v, dtype):
    return v.to(dtype).float()


def expert_rows(ids, e):
    return (ids == e).any(-1).nonzero().flatten()


def relerr(got, ref):
    assert not got.isnan().any(), "unwritten (poisoned) or NaN output"
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_grouping(ids, pos_of, perm, meta, t, experts, k, bm):
    ids, pos_of, perm, meta = (a.cpu().long() for a in (ids, pos_of, perm, meta))
    counts = torch.bincount(ids.flatten(), minlength=experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    assert meta[1:experts + 2].tolist() == offsets.tolist()
    for e in range(experts):
        tokens = (ids == e).any(-1).nonzero().flatten()
        assert perm[offsets[e]:offsets[e + 1]].tolist() == tokens.tolist(), e
    rows = torch.arange(t)[:, None].expand(t, k)
    assert (perm[pos_of] == rows).all()
    assert sorted(pos_of.flatten().tolist()) == list(range(t * k))
    tiles = [(e, int(r0), int(min(r0 + bm, offsets[e + 1])))
             for e in range(experts) for r0 in range(int(offsets[e]), int(offsets[e + 1]), bm)]
    n = int(meta[0])
    assert n == len(tiles) <= lr.moe_max_tiles(t, experts, k, bm)
    got = meta[experts + 2:experts + 2 + 3 * n].view(-1, 3).tolist()
    assert [tuple(x) for x in got] == tiles


def gate_up_ref(x, gate_up, ids, pos_of, dtype):
    """The graph's roundings: the gate-up product rounded, silu(gate) rounded, times up."""
    t, k = ids.shape
    inter = gate_up.shape[1] // 2
    out = torch.zeros(t * k, inter, device="cuda")
    for e in ids.unique().tolist():
        tok, j = (ids == e).nonzero(as_tuple=True)
        gu = rnd(x[tok].float() @ gate_up[e].float().T, dtype)
        act = rnd(torch.nn.functional.silu(gu[:, :inter]), dtype) * gu[:, inter:]
        out[pos_of[tok, j].long()] = act
    return out


def down_ref(act, down, ids, pos_of):
    t, k = ids.shape
    out = torch.zeros(t * k, down.shape[1], device="cuda")
    for e in ids.unique().tolist():
        pos = pos_of[ids == e].long()
        out[pos] = act[pos].float() @ down[e].float().T
    return out


def combine_ref(y, pos_of, wts, dtype, gate=None, shared=None):
    acc = torch.zeros(pos_of.shape[0], y.shape[1], device="cuda")
    for j in range(pos_of.shape[1]):
        acc = acc + wts[:, j:j + 1] * y[pos_of[:, j].long()].float()
    if shared is None:
        return acc
    share = rnd(torch.sigmoid(gate.float()), dtype)
    return rnd(acc, dtype) + rnd(share * shared.float(), dtype)


@pytest.mark.parametrize("load", ["even", "skewed"])
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("experts,k,renorm,hidden,inter", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_kernels(K, dtype, experts, k, renorm, hidden, inter, t, load):
    x, logits, gate_up, down = make(t, experts, hidden, inter, dtype, load, k=k)
    out, parts = K.moe(x, logits, gate_up, down, k, renorm)
    ids, wts = parts["ids"], parts["wts"]

    want_ids, want_w, margin = route_ref(logits, k, renorm)
    clear = margin > MARGIN
    if t >= 3:
        clear[1:3] = True            # the tied rows: exactly ONNX's lower-index choice
        assert ids[1].tolist() == list(range(k))
        assert ids[2].tolist() == tied_top(experts, k)
    assert (ids[clear] == want_ids[clear]).all(), "routing differs from softmax top-k"
    assert clear.float().mean() >= 0.8   # near-ties are few (one row in 9 at most, seen)
    torch.testing.assert_close(wts[clear], want_w[clear], rtol=0, atol=1e-6)
    if load == "skewed":
        assert not (ids >= experts // 2).any()   # half the experts: no tokens at all

    check_grouping(ids, parts["pos_of"], parts["perm"], parts["meta"], t, experts, k,
                   parts["bm"])
    pos_of = parts["pos_of"]
    assert relerr(parts["act"], gate_up_ref(x, gate_up, ids, pos_of, dtype)) < TOL
    assert relerr(parts["y"], down_ref(parts["act"], down, ids, pos_of)) < TOL
    assert relerr(out, combine_ref(parts["y"], pos_of, wts, dtype)) < COMBINE_TOL

    # the layer from scratch, on the tokens whose routing is not a near-tie
    pos_of_ref = _positions(want_ids, experts)
    ref_act = gate_up_ref(x, gate_up, want_ids, pos_of_ref, dtype)
    ref_y = rnd(down_ref(rnd(ref_act, dtype), down, want_ids, pos_of_ref), dtype)
    ref = combine_ref(ref_y, pos_of_ref, want_w, dtype)
    assert relerr(out[clear], ref[clear]) < LAYER_TOL


def _positions(ids, experts):
    """The grouped positions of a routing (expert-major, tokens ascending), for the
    reference."""
    t, k = ids.shape
    pos = torch.empty_like(ids)
    at = 0
    for e in range(experts):
        tok, j = (ids == e).nonzero(as_tuple=True)
        pos[tok, j] = torch.arange(at, at + len(tok), device=ids.device, dtype=ids.dtype)
        at += len(tok)
    return pos


@pytest.mark.parametrize("load", ["even", "skewed"])
@pytest.mark.parametrize("t", (1, 4, 5, 40, 300, 1100))
@pytest.mark.parametrize("experts,k", [(256, 8), (200, 6), (33, 2)])
def test_routing_scans_more_experts_than_threads(K, experts, k, t, load):
    """The routing's scan of the counts runs over the experts a CTA's width at a time: 256
    and 200 experts are two chunks of a decode step's 128 threads (the carry between them),
    33 one warp and a lane of the next; 40 and 300 tokens take wider CTAs. From
    launch_rules.MOE_GRID_ROUTE_ROWS routed rows (300 tokens of top 8; 1100 of top 8, 6 and
    2) the rows are counted and placed over a grid of chunks, the last one partial."""
    x, logits, gate_up, down = make(t, experts, 64, 32, torch.bfloat16, load, k=k)
    out, parts = K.moe(x, logits, gate_up, down, k, True)
    ids = parts["ids"]
    want_ids, _, margin = route_ref(logits, k, True)
    clear = margin > MARGIN
    assert (ids[clear] == want_ids[clear]).all(), "routing differs from softmax top-k"
    check_grouping(ids, parts["pos_of"], parts["perm"], parts["meta"], t, experts, k,
                   parts["bm"])
    assert not out.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", (1, 7, 40))
def test_combine_with_the_shared_expert(K, dtype, t):
    """Qwen2-MoE: routed + sigmoid(gate) * shared, each op rounded as the graph does."""
    x, logits, gate_up, down = make(t, 8, 256, 128, dtype, "even", seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    gate = (torch.randn(t, 1, generator=g, device="cuda") * 2).to(dtype)
    shared = torch.randn(t, 256, generator=g, device="cuda").to(dtype)
    out, parts = K.moe(x, logits, gate_up, down, 4, False, gate, shared)
    ref = combine_ref(parts["y"], parts["pos_of"], parts["wts"], dtype, gate, shared)
    assert relerr(out, ref) < COMBINE_TOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_of_two_inputs_equals_the_fused_form(K, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, inter in ((1, 80), (37, 5632), (5, 13)):
        gate, up = (torch.randn(rows, inter, generator=g, device="cuda").to(dtype)
                    for _ in range(2))
        torch.testing.assert_close(K.gated2(gate, up), K.gated(torch.cat([gate, up], 1)),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("sm90", [False, True], ids=["mma", "wgmma"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,inter", [(200, 72), (136, 328), (264, 1000)])
@pytest.mark.parametrize("t", (9, 33, 128, 129, 517, 1000))
def test_gemms_past_decode_over_uneven_loads(K, t, hidden, inter, dtype, sm90):
    """The GEMMs of steps past 8 tokens (the tiled ones, mma.sync and, on sm_90a, wgmma; at 9
    tokens the 8-row kernel, its experts holding 18 / 16 rows on average, the first ones more
    than a tile): experts' row counts skewed (expert e's logits biased down by 0.7 e, so the
    counts fall off and are rarely a multiple of 8, 64 or 128), the last quarter of the
    experts with no tokens and NaN weights; hidden and intermediate sizes that leave a
    partial k step (32 or 64 wide) and a partial 128-row (gate-up: 64-output) N block."""
    if sm90 and K.arch != "sm_90a":
        pytest.skip("the wgmma kernel needs sm_90a (an H100 or H200)")
    experts, k = 16, 2
    bm = lr.moe_block_m(t, experts, k, sm90)
    assert (bm == 8) if t == 9 else (bm in lr.MOE_TC_BLOCK_M)
    x, logits, gate_up, down = make(t, experts, hidden, inter, dtype, "even", seed=t, k=k)
    bias = -0.7 * torch.arange(experts, device="cuda").float()
    bias[3 * experts // 4:] = -60
    logits = (logits.float() + bias).to(dtype)
    gate_up[3 * experts // 4:] = float("nan")
    down[3 * experts // 4:] = float("nan")
    out, parts = K.moe(x, logits, gate_up, down, k, True, sm90=sm90)
    ids, pos_of = parts["ids"], parts["pos_of"]
    assert not (ids >= 3 * experts // 4).any()
    counts = torch.bincount(ids.flatten(), minlength=experts)
    assert counts.max() > counts[:3 * experts // 4].min()   # uneven loads
    assert parts["bm"] == bm
    check_grouping(ids, pos_of, parts["perm"], parts["meta"], t, experts, k, bm)
    assert relerr(parts["act"], gate_up_ref(x, gate_up, ids, pos_of, dtype)) < TOL
    assert relerr(parts["y"], down_ref(parts["act"], down, ids, pos_of)) < TOL
    assert relerr(out, combine_ref(parts["y"], pos_of, parts["wts"], dtype)) < COMBINE_TOL


@pytest.mark.parametrize("t", (4, 64, 300, 1100))
def test_a_cuda_graph_of_the_layer_replays_other_routings(K, t):
    """Captured once, the layer replays with new logits and inputs: its counts, offsets and
    tiles are computed on the GPU each time, and the result equals an uncaptured run (1100
    tokens of top 2: the grouping over a grid)."""
    dtype = torch.bfloat16
    x, logits, gate_up, down = make(t, 8, 256, 384, dtype, "even")
    K.moe(x, logits, gate_up, down, 2, True)            # load the module outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = K.moe(x, logits, gate_up, down, 2, True)
    for seed, load in ((3, "skewed"), (4, "even"), (5, "skewed")):
        x2, logits2, _, _ = make(t, 8, 256, 384, dtype, load, seed=seed)
        x.copy_(x2)
        logits.copy_(logits2)
        graph.replay()
        want, _ = K.moe(x2, logits2, gate_up, down, 2, True)
        torch.cuda.synchronize()
        assert torch.equal(out, want), load


def fp8_blocks(w, block, dtype):
    """w [E, N, K] -> (E4M3 bytes [E, N, K], scales [E, K / block, N] in dtype, the weight
    as DequantizeLinear gives it back in dtype): |max| / 448 a block of k and row."""
    e, n, k = w.shape
    g = w.float().reshape(e, n, k // block, block)
    scale = (g.abs().amax(-1) / 448).clamp_min(2.0 ** -14).to(dtype)        # [E, N, K / B]
    s = scale.float()[..., None]
    q = (g / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    dq = (q.float() * s).reshape(e, n, k).to(dtype)
    return q.reshape(e, n, k).view(torch.uint8), scale.transpose(1, 2).contiguous(), dq


# (experts, top_k, renormalise, hidden, inter, block)
FP8B_CONFIGS = [(8, 2, True, 256, 384, 128), (8, 2, True, 256, 384, 32),
                (16, 2, True, 160, 96, 32), (128, 8, True, 128, 64, 64),
                (8, 2, True, 1024, 512, 128)]   # 8-16 k steps a tile


@pytest.mark.parametrize("sm90", [False, True], ids=["mma", "wgmma"])
@pytest.mark.parametrize("load", ["even", "skewed"])
@pytest.mark.parametrize("t", (1, 5, 8, 9, 64, 129, 300, 600))
@pytest.mark.parametrize("experts,k,renorm,hidden,inter,block", FP8B_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_block_experts(K, dtype, experts, k, renorm, hidden, inter, block, t, load, sm90):
    """The grouped GEMMs over E4M3 experts (8-row tiles while moe_block_m says, tiled past
    that: mma.sync, and on sm_90a wgmma, there bit for bit the 16-bit kernel's outputs)
    equal the 16-bit ones' references on the dequantized weights; a step of FP8 gate-up and
    16-bit down, and the reverse, take each GEMM's own kernel."""
    if sm90 and K.arch != "sm_90a":
        pytest.skip("the wgmma kernel needs sm_90a (an H100 or H200)")
    x, logits, gate_up, down = make(t, experts, hidden, inter, dtype, load, k=k)
    (gq, gs, gdq), (dq8, ds, ddq) = (fp8_blocks(w, block, dtype) for w in (gate_up, down))
    out, parts = K.moe(x, logits, gq, dq8, k, renorm, scales=(gs, ds), sm90=sm90)
    ids, pos_of = parts["ids"], parts["pos_of"]
    if load == "skewed":
        assert not (ids >= experts // 2).any()
    assert relerr(parts["act"], gate_up_ref(x, gdq, ids, pos_of, dtype)) < TOL
    assert relerr(parts["y"], down_ref(parts["act"], ddq, ids, pos_of)) < TOL
    assert relerr(out, combine_ref(parts["y"], pos_of, parts["wts"], dtype)) < COMBINE_TOL
    if sm90 and lr.moe_block_m(t, experts, k, sm90) > 8:
        # wgmma: the FP8 kernel's sums are the 16-bit kernel's on the dequantized weights
        _, r16 = K.moe(x, logits, gdq, ddq, k, renorm, sm90=True)
        assert torch.equal(parts["act"], r16["act"]) and torch.equal(parts["y"], r16["y"])
    if t in (5, 129):   # one GEMM FP8, the other 16-bit (--quant-exclude, a K no block divides)
        _, mixed = K.moe(x, logits, gq, ddq, k, renorm, scales=(gs, None), sm90=sm90)
        assert torch.equal(mixed["act"], parts["act"])
        assert relerr(mixed["y"], down_ref(mixed["act"], ddq, ids, pos_of)) < TOL
        _, mixed = K.moe(x, logits, gdq, dq8, k, renorm, scales=(None, ds), sm90=sm90)
        assert relerr(mixed["act"], gate_up_ref(x, gdq, ids, pos_of, dtype)) < TOL


@pytest.mark.parametrize("load", ["even", "skewed"])
@pytest.mark.parametrize("experts,k,renorm,hidden,inter,block",
                         [c for c in FP8B_CONFIGS if c[:2] == (8, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_block_experts_on_256_position_tiles(K, monkeypatch, dtype, experts, k, renorm,
                                                 hidden, inter, block, load):
    """The FP8 wgmma kernel's 256-position tiles, which a layer takes past
    MOE_WG8_M256_ROWS routed rows an expert (8 experts, top 2: from 1537 tokens), at 600
    tokens with the switch lowered to 128 rows: test_fp8_block_experts' checks, the 16-bit
    kernel's outputs bit for bit among them."""
    if K.arch != "sm_90a":
        pytest.skip("the wgmma kernel needs sm_90a (an H100 or H200)")
    monkeypatch.setattr(lr, "MOE_WG8_M256_ROWS", 128)
    assert lr.moe_block_m(600, experts, k, True, True) == 256
    test_fp8_block_experts(K, dtype, experts, k, renorm, hidden, inter, block, 600, load, True)
