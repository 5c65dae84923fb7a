"""The cuda backend's glue kernels (embedding, row gather, logits cast) against PyTorch, and the
GPU sampler against the host sampler's rules (runtime/sampler.py), on the GPU (marked `gpu`;
skipped without CUDA). Outputs are poisoned before each launch (NaN, or -7 for int32), so an
element a kernel skips fails the check."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and torch.cuda"),
    pytest.mark.usefixtures("poison"),
]

from llmc.runtime.sampler import SamplingParams, probabilities  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]


# ---- the launcher -------------------------------------------------------------------------

def test_a_launch_passes_what_the_kernel_declares(K):
    """Functions.launch checks the arguments against the kernel's parameters
    (cuFuncGetParamInfo): too few would be read past the list's end by the driver (a crash
    or garbage pointers), an int where a pointer goes is half a pointer; both are an error
    that names the kernel. One argument more than declared is passed and not read (an engine
    built before a kernel gained a trailing parameter)."""
    from llmc.devices import CudaError
    from llmc.plugins import launch_rules as lr
    from llmc.plugins.launch import DevPtr

    gu = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    ln = lr.gated_launch(4, 128, "float16", "swiglu", K.sm_count)
    out = torch.empty(4, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(CudaError, match=f"kernel {ln.kernel} .* takes 4 parameters of "
                                        r"\[8, 4, 4, 8\] bytes; the launch passes 3"):
        K.launch(ln, [gu, 4, 128])
    with pytest.raises(CudaError, match=r"passes 4 of \[8, 4, 4, 4\]"):
        K.launch(ln, [gu, 4, 128, 5])   # an int for the output pointer
    K.launch(ln, [gu, 4, 128, out, DevPtr(0)])
    torch.cuda.synchronize()
    assert torch.equal(out, K.gated(gu))


# ---- glue ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(1, 576), (37, 576), (300, 4096), (5, 100), (70000, 64)])
def test_embedding(K, dtype, t, h):
    v = 3000
    table = torch.randn(v, h, device="cuda").to(dtype)
    ids = torch.randint(0, v, (t,), device="cuda", dtype=torch.int32)
    ids[-1] = v - 1
    out = K.embedding(ids, table)
    assert out.shape == (t, h)
    assert torch.equal(out, table[ids.long()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h", [576, 4096, 100])
def test_embedding_out_of_range_ids_give_zeros(K, dtype, h):
    v = 1000
    table = torch.randn(v, h, device="cuda").to(dtype)
    ids = torch.tensor([3, -1, v, 7, 2**31 - 1, -2**31, v - 1, 0], device="cuda",
                       dtype=torch.int32)
    out = K.embedding(ids, table)
    bad = (ids < 0) | (ids >= v)
    ref = table[ids.clamp(0, v - 1).long()]
    ref[bad] = 0
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(1, 2304), (37, 256), (300, 3584), (5, 100)])
def test_embedding_scaled(K, dtype, t, h):
    """Gemma: table[ids] * sqrt(hidden), the constant and the product in the dtype as HF has
    them (bit-exact); an out-of-range id still gives a row of zeros."""
    v = 3000
    table = torch.randn(v, h, device="cuda").to(dtype)
    ids = torch.randint(0, v, (t,), device="cuda", dtype=torch.int32)
    ids[0] = -1
    scale = torch.tensor(h ** 0.5, dtype=dtype)
    out = K.embedding(ids, table, scale=float(scale))
    ref = table[ids.clamp(0, v - 1).long()] * scale.cuda()
    ref[0] = 0
    assert torch.equal(out, ref)


@pytest.mark.parametrize("shape", [(3, 256000), (1, 100), (7, 1001)])
@pytest.mark.parametrize("cap", [30.0, 1.5])
def test_softcap(K, shape, cap):
    """Gemma 2's final-logit soft-cap on fp32 logits against torch (precise tanh)."""
    x = torch.randn(*shape, device="cuda") * 40
    out = K.softcap(x, cap)
    torch.testing.assert_close(out, cap * torch.tanh(x / cap), atol=2e-6 * cap, rtol=1e-6)
    assert out.abs().max() <= cap


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h", [(1, 576), (300, 4096), (77, 100)])
def test_gather_rows(K, dtype, n, h):
    x = torch.randn(n, h, device="cuda").to(dtype)
    rows = torch.randint(0, n, (max(1, n // 3),), device="cuda", dtype=torch.int32)
    rows[0] = n - 1
    assert torch.equal(K.gather_rows(x, rows), x[rows.long()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 49152), (1, 100), (7, 1001), (64, 128256)])
def test_cast_f32(K, dtype, shape):
    x = (torch.randn(*shape, device="cuda") * 30).to(dtype)
    x.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), 0.0], dtype=dtype)
    out = K.cast_f32(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, x.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 576), (1, 100), (64, 4096)])
def test_add(K, dtype, shape):
    a, b = (torch.randn(*shape, device="cuda").to(dtype) for _ in range(2))
    assert torch.equal(K.add(a, b), (a.float() + b.float()).to(dtype))


# ---- sampling -----------------------------------------------------------------------------

@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("v", [49152, 50257, 37])
def test_ban_tokens_is_the_bitmask(K, b, v):
    """ban_tokens_f32 against numpy: -inf exactly where the bitmask's bit is clear, every
    other logit as it was; rows of sparse, dense, empty and full masks."""
    rng = np.random.default_rng(b * v)
    logits = rng.standard_normal((b, v)).astype(np.float32)
    allowed = rng.random((b, v)) < np.array([0.01, 0.99, 0.0, 1.0, 0.5])[:b, None]
    bits = np.packbits(allowed, axis=1, bitorder="little")
    words = np.zeros((b, (v + 31) // 32 * 4), np.uint8)
    words[:, :bits.shape[1]] = bits
    got = torch.from_numpy(logits).cuda()
    K.ban_tokens(got, torch.from_numpy(words.view(np.int32)).cuda())
    want = np.where(allowed, logits, np.float32(-np.inf))
    np.testing.assert_array_equal(got.cpu().numpy(), want)

def philox4x32_10(ctr, key):
    """Reference Philox4x32-10 on numpy uint64 arrays (each word a 32-bit value)."""
    m = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in ctr)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & m,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & m)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m, (k1 + np.uint64(0xBB67AE85)) & m
    return c0, c1, c2, c3


def test_philox_reference_matches_random123():
    # Random123 tests/kat_vectors, the three philox4x32 10 lines.
    for ctr, key, want in [
        ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
        ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
        ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
         (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]:
        assert tuple(int(v) for v in philox4x32_10(ctr, key)) == want


def uniforms(seed: int, counters: np.ndarray) -> np.ndarray:
    """The kernel's draw: Philox keyed by the seed, counter (counter, 0, 0, 0), 24 bits."""
    zero = np.zeros_like(counters, dtype=np.uint64)
    r0 = philox4x32_10((counters.astype(np.uint64), zero, zero, zero),
                       (seed & 0xFFFFFFFF, seed >> 32))[0]
    return (r0 >> np.uint64(8)).astype(np.float64) / 2**24


def mixed_logits() -> np.ndarray:
    """50 logits with ties at ranks 4-6 and 20-22 (top-k cuts there) and one -inf."""
    x = np.random.default_rng(0).normal(0, 1.5, 50).astype(np.float32)
    order = np.argsort(-x, kind="stable")
    x[order[4:7]] = x[order[4]]
    x[order[20:23]] = x[order[20]]
    x[order[-1]] = -np.inf
    return x


def mid_tie_top_p(x: np.ndarray) -> float:
    """A top_p whose cut falls inside the tie group at ranks 4-6 (T = 1): two of the three
    tied tokens stay, the lower indices."""
    cum = np.cumsum(np.sort(probabilities(x, SamplingParams(1.0)))[::-1])
    return float(cum[4] + cum[5]) / 2


def row_params(b, temperature, top_k=0, top_p=1.0):
    return dict(temperature=torch.full((b,), temperature, device="cuda"),
                top_k=torch.full((b,), top_k, device="cuda", dtype=torch.int32),
                top_p=torch.full((b,), top_p, device="cuda"))


@pytest.mark.parametrize("b", [1, 7, 64])
@pytest.mark.parametrize("v", [49152, 128256, 50257])   # 16-byte loads, and V % 4 != 0
def test_greedy_is_argmax_lowest_index_on_ties(K, b, v):
    g = torch.Generator(device="cuda").manual_seed(b * v)
    logits = torch.randn(b, v, device="cuda", generator=g) * 4
    rows = torch.arange(b, device="cuda")
    logits[0, : v // 3] = float("-inf")
    # Tied maxima at three places in each row; the first must win.
    first = torch.randint(0, v // 2, (b,), device="cuda", generator=g)
    second = first + torch.randint(1, v // 2, (b,), device="cuda", generator=g)
    logits[rows, second] = 100.0
    logits[rows, first] = 100.0
    logits[rows, v - 1] = 100.0
    if b > 1:
        logits[1] = 0.5  # all equal: index 0
    # temperature 0 is greedy whatever top-k / top-p say
    tok = K.sample(logits, 0.0, 5, 0.5, 7, 3)
    assert torch.equal(tok.long(), torch.argmax(logits, -1))
    assert tok[1 % b].item() == (0 if b > 1 else first[0].item())


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
@pytest.mark.parametrize("v", [50, 49152, 128256])
def test_top_k_1_and_tiny_top_p_are_greedy(K, temperature, v):
    b = 64
    logits = torch.randn(b, v, device="cuda") * 2
    counter = torch.arange(b, device="cuda", dtype=torch.int32)
    want = torch.argmax(logits, -1)
    assert torch.equal(K.sample(logits, temperature, 1, 1.0, 11, counter).long(), want)
    assert torch.equal(K.sample(logits, temperature, 0, 1e-7, 11, counter).long(), want)
    assert torch.equal(K.sample(logits, temperature, 40, 1e-7, 11, counter).long(), want)


def test_same_seed_and_counter_same_token_whatever_the_slot(K):
    b, v = 256, 1000
    logits = torch.randn(v, device="cuda").expand(b, v).contiguous()
    same = K.sample(logits, 1.0, 0, 1.0, 42, 5)
    assert torch.equal(same, same[:1].expand(b)), "rows with one (seed, counter) differ"
    again = K.sample(logits, 1.0, 0, 1.0, 42, 5)
    assert torch.equal(same, again)
    counters = torch.arange(b, device="cuda", dtype=torch.int32)
    steps = K.sample(logits, 1.0, 0, 1.0, 42, counters)
    assert steps.unique().numel() > 50, "different counters must give different draws"
    seeds = torch.arange(b, device="cuda", dtype=torch.int64) * 7919
    assert K.sample(logits, 1.0, 0, 1.0, seeds, 5).unique().numel() > 50
    # A row's draw does not depend on its batch slot or on the other rows.
    for r in (0, 17, 255):
        alone = K.sample(logits[r:r + 1], 1.0, 0, 1.0, 42, counters[r:r + 1])
        assert alone.item() == steps[r].item()


# (temperature, top_k, top_p); top_p None: mid_tie_top_p(x)
DIST_CASES = [
    (1.0, 0, 1.0),
    (0.7, 5, 1.0),      # the 5th largest is tied with the 6th and 7th: all three stay
    (1.3, 0, 0.6),      # top-p cuts mid-list
    (1.0, 10, 0.8),     # top-k, then top-p inside it
    (2.0, 60, 0.95),    # top_k >= V is off
    (0.5, 3, 1.0),
    (1.0, 0, None),     # top-p cuts inside a tie group
    (0.05, 0, 1.0),     # low temperature
]


def top_p_margin(x, temperature, top_k, top_p):
    """Distance of top_p from every cumulative sum the cut compares it with: the GPU sums in
    fp32, the reference in fp64, so a case must not sit on a boundary."""
    probs = probabilities(x, SamplingParams(temperature, top_k))
    return np.abs(np.cumsum(np.sort(probs)[::-1]) - top_p).min()


@pytest.mark.parametrize("case", range(len(DIST_CASES)))
def test_distribution_matches_host_sampler_rules(K, case):
    temperature, top_k, top_p = DIST_CASES[case]
    x = mixed_logits()
    top_p = mid_tie_top_p(x) if top_p is None else top_p
    if top_p < 1:
        assert top_p_margin(x, temperature, top_k, top_p) > 1e-4
    want = probabilities(x, SamplingParams(temperature, top_k, top_p))
    n = 1 << 20
    logits = torch.from_numpy(x).cuda().expand(n, x.size).contiguous()
    counters = torch.arange(n, device="cuda", dtype=torch.int32)
    tok = K.sample(logits, temperature, top_k, top_p, 1234, counters)
    assert tok.min().item() >= 0 and tok.max().item() < x.size
    freq = np.bincount(tok.cpu().numpy(), minlength=x.size) / n
    assert set(np.nonzero(freq)[0]) <= set(np.nonzero(want)[0]), "a token outside the kept set"
    assert 0.5 * np.abs(freq - want).sum() < 0.01


def test_uniform_and_tied_maxima(K):
    n = 1 << 20
    counters = torch.arange(n, device="cuda", dtype=torch.int32)
    flat = torch.zeros(n, 50, device="cuda")
    freq = np.bincount(K.sample(flat, 1.0, 0, 1.0, 9, counters).cpu().numpy(),
                       minlength=50) / n
    assert 0.5 * np.abs(freq - 1 / 50).sum() < 0.01
    # A tiny temperature leaves only the tied maxima, drawn evenly (the host: exp(z - max)).
    two = torch.randn(50, device="cuda")
    two[[8, 31]] = 10.0
    tok = K.sample(two.expand(n, 50).contiguous(), 1e-6, 0, 1.0, 9, counters).cpu().numpy()
    assert set(np.unique(tok)) == {8, 31} and abs((tok == 8).mean() - 0.5) < 0.01


@pytest.mark.parametrize("params", [(1.0, 0, 1.0), (0.8, 20, 0.9)])
def test_draw_is_the_inverse_cdf_of_the_philox_uniform(K, params):
    """Token by token: the kernel's draw equals the host's inverse CDF (index order) at the
    uniform the reference Philox gives, except where u sits within 1e-5 of a CDF step."""
    x = mixed_logits()
    n, seed = 4096, 0x1234_5678_9ABC_DEF0
    counters = np.arange(n, dtype=np.int64) * 3 + 1
    cdf = np.cumsum(probabilities(x, SamplingParams(*params)))
    u = uniforms(seed, counters)
    want = np.searchsorted(cdf, u, side="right")
    clear = np.abs(u[:, None] - cdf[None, :]).min(1) > 1e-5
    logits = torch.from_numpy(x).cuda().expand(n, x.size).contiguous()
    tok = K.sample(logits, *params, seed, torch.from_numpy(counters).int().cuda()).cpu().numpy()
    assert clear.mean() > 0.99
    assert np.array_equal(tok[clear], want[clear])


@pytest.mark.parametrize("v", [50, 128256])
def test_logprob_of_the_sampled_token(K, v):
    b = 64
    logits = torch.randn(b, v, device="cuda") * 3
    temperature = torch.tensor([0.7, 1.0, 1.5, 0.0] * (b // 4), device="cuda")
    top_k = torch.tensor([0, 50, 0, 0] * (b // 4), device="cuda", dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0] * (b // 4), device="cuda")
    counter = torch.arange(b, device="cuda", dtype=torch.int32)
    tok, lp = K.sample(logits, temperature, top_k, top_p, 5, counter, logprobs=True)
    assert torch.equal(tok, K.sample(logits, temperature, top_k, top_p, 5, counter))
    # Greedy rows take the logprob at temperature 1.
    t = torch.where(temperature > 0, temperature, 1.0)
    ref = torch.log_softmax(logits / t[:, None], -1).gather(1, tok.long()[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-5)
    greedy = temperature == 0
    assert torch.equal(tok[greedy].long(), torch.argmax(logits[greedy], -1))
