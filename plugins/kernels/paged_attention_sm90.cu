// Prefill / ragged paged attention for Hopper (sm_90a): TMA loads of the paged K/V blocks,
// warpgroup MMAs (wgmma), a producer warpgroup and two consumer warpgroups.
//
// Same contract as attn_prefill (paged_attention.cuh): a ragged batch of prefill chunks and
// decode tokens, the paged pool [2, nb, Hkv, bs, D], GQA with the q heads of a kv group packed
// as rows (P heads a token), causal, sliding window, Gemma 2's logit soft-cap (the _softcap
// entries); D = 64 or 128; 16-bit pool. The E4M3 pool keeps the sm_80 kernel.
//
// One CTA per (tile of TM = 128 rows of one sequence, group of P q heads of one kv head):
//  - warpgroup 0, the producer: two threads (one for K, one for V) walk the key tiles
//    (TN = 128 keys), look their blocks up in the block table and have the copy engine bring
//    their rows (a 2-D box of bs rows x 64 columns per 128-byte column atom) into a
//    KV_STAGES-deep ring of stages, each completing on a full barrier; they wait on the
//    stage's empty barrier before reusing it.
//  - warpgroups 1 and 2, the consumers, 64 query rows each: S = Q K^T (wgmma, Q and K from
//    shared memory), the online softmax in registers (softmax_scores: the accumulator layout
//    of a warp's 16 rows is mma.sync's), O += P V (wgmma, P from registers, V read N-major).
//    FlashAttention-3's two overlaps: within a consumer, a tile's softmax runs while the
//    tensor cores do the previous tile's P V; between the two, they take turns issuing
//    their MMAs (ping-pong), so one's softmax runs while the other's MMAs do.
//  Registers: the producer gives most of its share to the consumers (setmaxnreg).
//  Measured on H100 (bench/results/kernels.md): 2k-token causal prefill, 32/8 heads x 128,
//  bf16: 323 TFLOP/s, 1.56x PyTorch SDPA's flash backend; the mma.sync kernel: 174.
//
// Rows past a sequence's context in its last key tile (a block's unused rows, or a stage's
// stale contents where the tile has fewer blocks) are masked in S; in V they are zeroed
// before P V, so no stale NaN reaches the output (0 * NaN).
#include "hopper.cuh"
#include "paged_attention.cuh"

#define TM 128   // query rows a CTA
#define TN 128   // keys a tile
// (#ifndef: a tuning run may set them)
#ifndef KV_STAGES
#define KV_STAGES 2    // K/V stages: 3 measured 2-3% slower
#endif
#ifndef PING_PONG
#define PING_PONG 1    // 0 measured 6% slower
#endif

// Byte layout of the dynamic shared memory (from a 1024-aligned base): Q [2 consumers][D/64
// atoms][64 rows x 128 B], then KV_STAGES stages of K and V [D/64 atoms][TN rows x 128 B]
// each, then the barriers: full K, full V, empty K and empty V, one a stage.
template <int D>
struct Sm90Layout {
  static constexpr int HB = D / 64;              // 128-byte column atoms a row
  static constexpr int QW = HB * 64 * 128;       // one consumer's Q rows
  static constexpr int KV = HB * TN * 128;       // one K (or V) tile
  static constexpr int Q0 = 0, S0 = 2 * QW, STAGE = 2 * KV, BAR = S0 + KV_STAGES * STAGE;
};   // the launch asks BAR + the barriers + 1024 bytes of alignment slack (prefill_smem)

#ifdef SM90A
template <typename T, int D, bool CAP>
__device__ void attn_prefill_sm90(const u16* __restrict__ q, const int* __restrict__ ss,
                                  const int* __restrict__ cl, const int* __restrict__ bt,
                                  int hq, int hkv, int B, int mb, int bs, int nb,
                                  int scale_bits, int win, int P, u16* __restrict__ out,
                                  const TmaDesc* map, int cap_bits) {
  using L = Sm90Layout<D>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 base = (smem_u32(smem_raw) + 1023) & ~1023u;
  const u32 full_k = base + L::BAR, full_v = full_k + 8 * KV_STAGES;
  const u32 empty_k = full_v + 8 * KV_STAGES, empty_v = empty_k + 8 * KV_STAGES;
  auto k_tile = [&](int st) { return base + L::S0 + st * L::STAGE; };
  auto v_tile = [&](int st) { return base + L::S0 + st * L::STAGE + L::KV; };

  // The tile of this CTA, as attn_prefill finds it (heaviest causal tiles first).
  const int hbase = blockIdx.x * P, kvh = hbase / (hq / hkv);
  PrefillTile pt;
  if (!prefill_tile(ss, cl, B, TM / P, P, pt)) return;
  const int s = pt.s, ntok = pt.ntok, tok0 = pt.tok0, nrows = pt.nrows;
  const int p_first = pt.p_first, kv_len = pt.kv_len;
  const int n_tiles = (kv_len + TN - 1) / TN;
  const int j0 = win > 0 ? max(0, p_first - win + 1) / TN : 0;

  if (threadIdx.x == 0) {
    for (int st = 0; st < KV_STAGES; ++st) {
      mbar_init(full_k + 8 * st, 1);
      mbar_init(full_v + 8 * st, 1);
      mbar_init(empty_k + 8 * st, 2 * 128);   // every consumer thread releases it
      mbar_init(empty_v + 8 * st, 2 * 128);
    }
    mbar_fence_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {   // the producer: a thread for K, one for V
    regs_dec<56>();
    if (threadIdx.x >= 64 || threadIdx.x % 32) return;
    constexpr int MAXB = TN / 16;   // blocks a tile spans at most (bs >= 16)
    const int sh = __ffs(bs) - 1;   // block sizes are powers of two
    // The pool blocks of tile j, read a tile ahead (all in flight at once), so no copy
    // waits on a block-table load.
    auto table = [&](int j, int* blk) {
#pragma unroll
      for (int b = 0; b < MAXB; ++b) {
        const int p = j * TN + b * bs;
        blk[b] = j < n_tiles && b * bs < TN && p < kv_len ? kv_block(bt, s, mb, p, bs) : 0;
      }
    };
    // Copies of tile j's K (which 0) or V (which 1) into stage st, once the stage is free.
    auto load = [&](int j, int it, int which, const int* blk) {
      const int st = it % KV_STAGES, k0 = j * TN;
      const int blocks = (min(TN, kv_len - k0) + bs - 1) >> sh;
      const u32 bar = (which ? full_v : full_k) + 8 * st;
      const u32 dst = which ? v_tile(st) : k_tile(st);
      mbar_wait((which ? empty_v : empty_k) + 8 * st, ((it / KV_STAGES) & 1) ^ 1);
      mbar_expect(bar, blocks * bs * D * 2);
#pragma unroll
      for (int b = 0; b < MAXB; ++b) {
        if (b >= blocks) break;
        const int row = ((which * nb + blk[b]) * hkv + kvh) * bs;
#pragma unroll
        for (int h = 0; h < L::HB; ++h)
          tma_load_2d(dst + h * TN * 128 + b * bs * 128, map, h * 64, row, bar);
      }
    };
    // Lane 0 of warp 0 copies K, that of warp 1 V: each runs ahead as far as its stages'
    // releases allow (K's come a tile before V's: once S is done, V once P V is).
    const int which = threadIdx.x / 32;
    int cur[MAXB], nxt[MAXB];
    table(j0, cur);
    for (int j = j0, it = 0; j < n_tiles; ++j, ++it) {
      table(j + 1, nxt);
      load(j, it, which, cur);
#pragma unroll
      for (int b = 0; b < MAXB; ++b) cur[b] = nxt[b];
    }
    return;
  }
  regs_inc<224>();

  // Consumer cw holds rows [64 cw, 64 cw + 64) of the tile; warp w of it rows 16 w.. of those.
  const int cw = wg - 1, tid = threadIdx.x - 128 * wg, warp = tid >> 5, lane = tid & 31;
  const u32 sq = base + L::Q0 + cw * L::QW;
  for (int i = tid; i < 64 * (D / 8); i += 128) {   // Q rows -> the swizzled atoms
    const int r = i / (D / 8), c = i % (D / 8), row = 64 * cw + r;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row < nrows)
      val = *reinterpret_cast<const uint4*>(
          q + ((size_t)(tok0 + row / P) * hq + hbase + row % P) * D + c * 8);
    const u32 at = sq + (c / 8) * 64 * 128 + r * 128 + (((c % 8) ^ (r % 8)) << 4);
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n"
                 :: "r"(at), "r"(val.x), "r"(val.y), "r"(val.z), "r"(val.w) : "memory");
  }
  fence_async_smem();
  bar_sync(1 + cw, 128);

  const float scale_log2 = __int_as_float(scale_bits) * 1.4426950408889634f;
  const float cap_in = CAP ? __int_as_float(scale_bits) / __int_as_float(cap_bits) : 0.f;
  const float cap_out = CAP ? __int_as_float(cap_bits) * 1.4426950408889634f : 0.f;
  const int ra = 64 * cw + warp * 16 + (lane >> 2);
  // Padding rows (r >= nrows) take the last token's limit so no row is fully masked.
  const int lim0 = p_first + min(ra / P, ntok - 1), lim1 = p_first + min((ra + 8) / P, ntok - 1);
  // The consumer's first and last rows bound its causal limits (rows are sorted by token).
  const int lim_lo = p_first + min(64 * cw / P, ntok - 1);
  const int lim_hi = p_first + min((64 * cw + 63) / P, ntok - 1);
  const int wv = win > 0 ? win : 0x7fffffff;
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float sc[TN / 8][4];
  u32 pa[TN / 16][4];   // the previous tile's P, which its P V reads while S of this one runs

  // P V of the tile in stage `st` (pa), as one wgmma group; V read N-major: 16 keys are two
  // 8-row groups (sbo 1024 apart), the next 64 d columns an atom (lbo) apart.
  auto issue_pv = [&](int st) {
#pragma unroll
    for (int kk = 0; kk < TN / 16; ++kk) {
      const u64 vd = smem_desc(v_tile(st) + kk * 16 * 128, TN * 128, 1024);
      wgmma_rs<T, D, 1>(&o[0][0], pa[kk], vd, 1);
    }
  };
  // Ping-pong (FlashAttention-3): the consumers take turns issuing their MMAs, so one's
  // softmax runs while the other's MMAs keep the tensor cores busy. Consumer cw waits on
  // barrier 4 + cw for its turn and hands the turn over on the other's; consumer 1 gives
  // consumer 0 the first turn, and does not hand over after its last.
  auto my_turn = [&]() { if (PING_PONG) bar_sync(4 + cw, 256); };
  auto pass_turn = [&]() { if (PING_PONG) bar_arrive(5 - cw, 256); };
  if (cw == 1) pass_turn();
  // S = Q K^T of the tile in stage `st` into sc, as one wgmma group.
  auto issue_s = [&](int st) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const u32 off = (kk % 4) * 32;   // k16 steps inside a 128-byte atom
      wgmma_ss128<T>(&sc[0][0], smem_desc(sq + (kk / 4) * 64 * 128 + off, 16, 1024),
                     smem_desc(k_tile(st) + (kk / 4) * TN * 128 + off, 16, 1024), kk > 0);
    }
  };
  // The softmax of tile j's scores (its keys from k0). Every tile runs the MMAs, even one
  // that no row of this consumer sees (before the window, past the causal limit): branching
  // around a wgmma makes the compiler serialise them all. Such a tile is fully masked, which
  // leaves m, l and O as they were.
  auto softmax = [&](int k0, float* alpha) {
    const bool live = k0 <= lim_hi && lim_lo - (k0 + TN - 1) < wv;
    softmax_scores<TN / 8, CAP>(sc, m, l, alpha, scale_log2, k0, live ? lim0 : -1,
                                live ? lim1 : -1, wv, !live || k0 + TN - 1 > lim_lo ||
                                lim_hi - k0 >= wv, cap_in, cap_out);
  };
  // The first tile: S, then its softmax.
  {
    mbar_wait(full_k, 0);
    my_turn();
    wgmma_fence();
    issue_s(0);
    wgmma_commit();
    pass_turn();
    wgmma_wait<0>();
    reg_fence<TN / 2>(&sc[0][0]);
    mbar_arrive(empty_k);
    float alpha[2];
    softmax(j0 * TN, alpha);
#pragma unroll
    for (int kk = 0; kk < TN / 16; ++kk) p_frag<T>(pa[kk], sc[2 * kk], sc[2 * kk + 1]);
  }
  // Each later tile: S issued, then the previous tile's P V (FlashAttention-3's
  // intra-warpgroup overlap: this tile's softmax runs while the tensor cores do the previous
  // P V). Groups complete in order, so waiting for all but the newest group means S is done.
  for (int j = j0 + 1, it = 1; j < n_tiles; ++j, ++it) {
    const int st = it % KV_STAGES, pst = (it - 1) % KV_STAGES;
    mbar_wait(full_k + 8 * st, (it / KV_STAGES) & 1);
    mbar_wait(full_v + 8 * pst, ((it - 1) / KV_STAGES) & 1);
    my_turn();
    wgmma_fence();
    issue_s(st);
    wgmma_commit();
    issue_pv(pst);
    wgmma_commit();
    pass_turn();
    wgmma_wait<1>();
    reg_fence<TN / 2>(&sc[0][0]);
    mbar_arrive(empty_k + 8 * st);
    float alpha[2];
    softmax(j * TN, alpha);
    wgmma_wait<0>();
    reg_fence<D / 2>(&o[0][0]);
    mbar_arrive(empty_v + 8 * pst);
    rescale_o<D>(o, alpha);
#pragma unroll
    for (int kk = 0; kk < TN / 16; ++kk) p_frag<T>(pa[kk], sc[2 * kk], sc[2 * kk + 1]);
  }
  // The last tile's P V. It is the context's last tile: zero V's rows past the context first.
  {
    const int it = n_tiles - 1 - j0, st = it % KV_STAGES, k0 = (n_tiles - 1) * TN;
    mbar_wait(full_v + 8 * st, (it / KV_STAGES) & 1);
    if (k0 + TN > kv_len) {
      const int r0 = kv_len - k0;
      for (int i = threadIdx.x - 128; i < (TN - r0) * 8 * L::HB; i += 256) {
        const int r = r0 + i / (8 * L::HB), h = (i / 8) % L::HB, c = i % 8;
        asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n"
                     :: "r"(v_tile(st) + h * TN * 128 + r * 128 + (c << 4)), "r"(0)
                     : "memory");
      }
      fence_async_smem();
      bar_sync(3, 256);
    }
    my_turn();
    wgmma_fence();
    issue_pv(st);
    wgmma_commit();
    if (cw == 0) pass_turn();
    wgmma_wait<0>();
    reg_fence<D / 2>(&o[0][0]);
  }

  store_rows<T, D>(o, l, ra, nrows, tok0, P, hq, hbase, lane, out);
}
#define SM90_BODY(TY, D, CAP, cap)                                                           \
  attn_prefill_sm90<TY, D, CAP>(q, ss, cl, bt, hq, hkv, B, mb, bs, nb, sc, win, pack, out,    \
                                &map, cap)
#else
#define SM90_BODY(TY, D, CAP, cap) __trap()
#endif

// The arguments of attn_prefill's entries (the soft-capped ones: the cap's bits after `win`),
// then the pool's tensor map (2-D: D columns by 2 * nb * Hkv * bs rows, boxes of 64 columns
// by bs rows, 128-byte swizzle).
#define SM90_ENTRY(DT, TY, D)                                                                 \
  extern "C" __global__ void __launch_bounds__(384, 1) attn_prefill_##DT##_d##D##_sm90(      \
      ATTN_IN, ATTN_SC, int pack, u16* out, const __grid_constant__ TmaDesc map) {            \
    SM90_BODY(TY, D, false, 0);                                                               \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(384, 1) attn_prefill_##DT##_d##D##_sm90_softcap( \
      ATTN_IN, ATTN_SC, int cap, int pack, u16* out, const __grid_constant__ TmaDesc map) {   \
    SM90_BODY(TY, D, true, cap);                                                              \
  }

LLMC_F16(SM90_ENTRY(f16, F16, 64))
LLMC_F16(SM90_ENTRY(f16, F16, 128))
LLMC_BF16(SM90_ENTRY(bf16, BF16, 64))
LLMC_BF16(SM90_ENTRY(bf16, BF16, 128))
