// Paged attention over a ragged batch (see docs/kernels.md for the I/O contract).
//  kv_write:        new K/V rows -> their cache slots (run first; separate launch so no block
//                   reads a row another block of the same launch is still writing).
//  attn_prefill:    one CTA per (query tile of one sequence, q heads of one kv head), FA2-style
//                   with mma.sync m16n8k16 tensor-core tiles, online softmax, causal mask.
//                   Handles any mix of prefill chunks and decode tokens in one launch.
//  attn_decode:     one CTA per (token, kv head, context split): the G = Hq/Hkv query heads
//                   of a kv group are the rows of one 16-row mma tile, so every K/V byte is
//                   read from HBM once; 4 warps split each 64-key tile, each loading its
//                   own rows; NST-stage cp.async pipeline (3, or 2 where 3 exceed the
//                   device's shared memory per block).
//                   The splits come either from the grid (each token's own context over
//                   n_split) or from a schedule the host writes each step (`sched`,
//                   attention_plan.decode_schedule: long contexts split more, the longest
//                   pieces first), one CTA per (kv head, item).
//                   Roofline: bytes = sum over tokens of 2*ctx*Hkv*D*2.
//  Sliding window (`win` > 0, HF Mistral): the token at position p sees keys p - win < j <= p.
//  Both attention kernels start at the first key tile holding a visible key, so a window
//  bounds the work and the bytes read, not only the result.
//  Logit soft-cap (CAP, Gemma 2): the scaled score s becomes cap * tanh(s / cap) before the
//  mask and the softmax; `cap` is one more argument.
//  attn_reduce:     flash-decoding combine of the per-split partial results, for callers
//                   without split counters (the TensorRT plugin); with them the decode
//                   kernel's last split combines (combine_splits).
//  E4M3 pool (C = u8, --kv-cache-dtype fp8; entries in the *_e4m3 modules): the pool holds
//  E4M3 bytes of x / scale, one K and one V scale a layer. The K/V tiles travel the same
//  cp.async pipeline at one byte an element. Prefill dequantizes them in shared memory into
//  the 16-bit tiles its MMAs read (x * scale rounded to T: the graph's DequantizeLinear).
//  Decode, where the pass over each tile cost as much as the bytes saved, converts the bytes
//  of its MMA fragments in registers (E4M3 -> fp16 is exact) and applies the scales in fp32:
//  K's to the scores, V's to the output (decode_e4m3_qk, decode_e4m3_pv).
// The kernels' bodies; paged_attention.cu instantiates the entry points without the
// soft-cap, paged_attention_softcap.cu those with it (a module of its own, compiled only for
// the models that have one).
#pragma once
#include "common.cuh"

#define BM 64
#define BN 64
#define NWARPS 4

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
  if constexpr (T::is_bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x on the special-function unit (what exp2f becomes, without its denormal handling).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Tiles of rows x D halfs, 16-byte chunks XOR-swizzled by row so ldmatrix is conflict-free.
template <int D> __device__ __forceinline__ int swz(int r, int c) {
  return (r * (D / 8) + (c ^ (r & 7))) * 8;
}

// Tiles of rows x D bytes (an E4M3 pool's): the 16-byte chunk c of row r sits at chunk
// c ^ (r * CPR / 8) of the row's CPR, so the decode's fragment reads (8 bytes of 8 rows, 4
// bytes of 4 rows) spread over the banks. Byte b of row r: r * D + e4m3_at<D>(r, b).
template <int D> __device__ __forceinline__ int e4m3_at(int r, int b) {
  constexpr int CPR = D / 16;  // chunks a row; rows a 128-byte bank line: 8 / CPR
  return ((((b >> 4) ^ (r * CPR / 8)) & (CPR - 1)) << 4) + (b & 15);
}

// The pool block that holds key position p of sequence s (its block-table entry).
__device__ __forceinline__ int kv_block(const int* bt, int s, int mb, int p, int bs) {
  return bt[(size_t)s * mb + (p >> (__ffs(bs) - 1))];  // block sizes are powers of two
}

// Offset (in elements) of key position p's row of pool block blk, kv head kvh, inside the
// pool [2, nb, Hkv, bs, D] (which: 0 = K, 1 = V).
__device__ __forceinline__ size_t pool_row(int blk, int p, int bs, int which, int nb, int hkv,
                                           int kvh, int d) {
  return ((((size_t)which * nb + blk) * hkv + kvh) * bs + (p & (bs - 1))) * d;
}

// Row of key position p of (seq s, kv head) inside the pool.
__device__ __forceinline__ size_t kv_row(const int* bt, int s, int mb, int p, int bs, int which,
                                         int nb, int hkv, int kvh, int d) {
  return pool_row(kv_block(bt, s, mb, p, bs), p, bs, which, nb, hkv, kvh, d);
}

// Loads keys [k0, k0+BN) of one kv head (K or V) into a smem tile; rows at or past kv_end are
// zero-filled (and masked by the caller) so no stale NaN reaches P·V. A 16-bit pool (C = u16)
// lands in the swizzled tile the MMA reads; an E4M3 pool (C = u8) in a plain [BN][D]-byte
// tile, which dequant_tile turns into one.
template <int D, int NT = NWARPS * 32, typename C = u16>
__device__ __forceinline__ void load_kv_tile(C* dst, const C* cache, const int* bt, int s,
                                             int mb, int bs, int which, int nb, int hkv, int kvh,
                                             int k0, int kv_end) {
  constexpr int EPC = 16 / sizeof(C);         // elements a 16-byte copy moves
  constexpr int CH = D / EPC, RP = NT / CH;  // each thread keeps one 16-byte column
  const int c = threadIdx.x % CH;
#pragma unroll
  for (int r = threadIdx.x / CH; r < BN; r += RP) {
    const int p = k0 + r;
    const bool ok = p < kv_end;
    const C* src = ok ? cache + kv_row(bt, s, mb, p, bs, which, nb, hkv, kvh, D) + c * EPC
                      : cache;
    const int at = sizeof(C) == 2 ? swz<D>(r, c) : r * D + e4m3_at<D>(r, c * EPC);
    cp_async16(smem_u32(dst + at), src, ok ? 16 : 0);
  }
}

// The decode kernel's loads: warp w brings rows [16 w, 16 w + 16) of a key tile, K's then
// V's, the only rows its MMAs read, so a warp waits on its own copies alone (cp_wait and
// __syncwarp, not a CTA barrier) and the 4 warps run their tiles out of step. The 16 rows lie
// in one block (a block holds 16 or more keys; tiles start at multiples of 64), so one
// block-table read a tile serves K and V. Same layouts as load_kv_tile.
template <int D, typename C = u16>
__device__ __forceinline__ void load_kv_rows(C* dst, const C* cache, const int* bt, int s,
                                             int mb, int bs, int nb, int hkv, int kvh, int k0,
                                             int kv_end, int warp, int lane) {
  constexpr int EPC = 16 / sizeof(C);        // elements a 16-byte copy moves
  constexpr int CH = D / EPC, RP = 32 / CH;  // 16-byte columns a row; rows a pass
  static_assert(32 % CH == 0 && 16 % RP == 0, "a warp's 16 rows in whole passes");
  const int p0 = k0 + warp * 16, c = lane % CH;
  // past the keys: block 0, an address in the pool, and no byte read from it (zero-fill)
  const int blk = p0 < kv_end ? kv_block(bt, s, mb, p0, bs) : 0;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    const C* src = cache + pool_row(blk, p0, bs, which, nb, hkv, kvh, D) + c * EPC;
#pragma unroll
    for (int r = lane / CH; r < 16; r += RP) {
      const int row = warp * 16 + r;
      const int at = sizeof(C) == 2 ? swz<D>(row, c) : row * D + e4m3_at<D>(row, c * EPC);
      cp_async16(smem_u32(dst + which * BN * D + at), src + r * D, p0 + r < kv_end ? 16 : 0);
    }
  }
}

// Rows [r0, r0 + rows) of a staged E4M3 tile ([BN][D] bytes) -> the swizzled tile of T the
// MMA reads, x * scale rounded to T once: what the graph's DequantizeLinear gives (scale is
// the graph's, a value of T). Threads tid, tid + nt, ... share the rows; zero bytes (the
// zero-filled rows past the context) stay zero.
template <typename T, int D>
__device__ __forceinline__ void dequant_tile(u16* dst, const u8* src, float scale, int r0,
                                             int rows, int tid, int nt) {
  constexpr int CH = D / 8;  // 8 values a step: 8 bytes in, 16 bytes out
  const u32 s2 = F16::pack2(scale, scale);  // fp16's multiplier (unused for bf16)
  for (int i = tid; i < rows * CH; i += nt) {
    const int r = r0 + i / CH, c = i % CH;
    const uint2 raw = *reinterpret_cast<const uint2*>(src + r * D + e4m3_at<D>(r, c * 8));
    uint4 h;
    h.x = e4m3x2_scaled<T>((unsigned short)(raw.x & 0xffffu), scale, s2);
    h.y = e4m3x2_scaled<T>((unsigned short)(raw.x >> 16), scale, s2);
    h.z = e4m3x2_scaled<T>((unsigned short)(raw.y & 0xffffu), scale, s2);
    h.w = e4m3x2_scaled<T>((unsigned short)(raw.y >> 16), scale, s2);
    *reinterpret_cast<uint4*>(dst + swz<D>(r, c)) = h;
  }
}

// Online-softmax update of one 16-row tile's S fragments (NB n-blocks of 8 keys): keeps keys
// with 0 <= lim - key < wv (lim: the row's position; wv: the window, INT_MAX for none: one
// unsigned compare does both bounds, so the window adds no compare per element), updates the
// rows' max m and sum l, leaves exp2'd probabilities in s and the factor alpha by which the
// rows' O must be rescaled. CAP: the score is soft-capped, cap * tanh(s * scale / cap), in log2
// units: cap_out * tanh(s * cap_in).
template <int NB, bool CAP = false>
__device__ __forceinline__ void softmax_scores(float (*s)[4], float* m, float* l, float* alpha,
                                               float scale_log2, int kbase, int lim0, int lim1,
                                               int wv, bool mask = true, float cap_in = 0.f,
                                               float cap_out = 0.f) {
  const int lane = threadIdx.x & 31;
  // Without a cap the max is taken on the raw scores and the scale goes into the exponent's
  // FMA (one multiply an element fewer; the scale is positive, so the max is the same).
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kc = kbase + nb * 8 + (lane & 3) * 2 + (e & 1);
      const bool ok = (unsigned)((e < 2 ? lim0 : lim1) - kc) < (unsigned)wv;
      float v;
      if constexpr (CAP) v = !mask || ok ? cap_out * tanhf(s[nb][e] * cap_in) : -INFINITY;
      else v = !mask || ok ? s[nb][e] : -INFINITY;
      s[nb][e] = v;
      mx[e >> 1] = fmaxf(mx[e >> 1], v);
    }
  const float k = CAP ? 1.f : scale_log2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float mn = fmaxf(m[r], mx[r] * k);
    const float base = mn == -INFINITY ? 0.f : mn;  // a fully masked row must not make NaN
    alpha[r] = ex2(m[r] - base);
    m[r] = mn;
    mx[r] = base;
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = ex2(fmaf(s[nb][e], k, -mx[e >> 1]));
      s[nb][e] = p;
      l[e >> 1] += p;
    }
}

// O rows (g and g + 8 of the warp's 16) times their softmax factors; skipped while no row's
// max moved (most key tiles after the first few).
template <int D>
__device__ __forceinline__ void rescale_o(float (*o)[4], const float* alpha) {
  if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
  }
}

// softmax_scores, then O rescaled at once (the kernels whose O is not in flight).
template <int NB, int D, bool CAP = false>
__device__ __forceinline__ void softmax_step(float (*s)[4], float (*o)[4], float* m, float* l,
                                             float scale_log2, int kbase, int lim0, int lim1,
                                             int wv, bool mask = true, float cap_in = 0.f,
                                             float cap_out = 0.f) {
  float alpha[2];
  softmax_scores<NB, CAP>(s, m, l, alpha, scale_log2, kbase, lim0, lim1, wv, mask, cap_in,
                          cap_out);
  rescale_o<D>(o, alpha);
}

template <typename T>
__device__ __forceinline__ void p_frag(u32* a, const float* s0, const float* s1) {
  a[0] = T::pack2(s0[0], s0[1]);
  a[1] = T::pack2(s0[2], s0[3]);
  a[2] = T::pack2(s1[0], s1[1]);
  a[3] = T::pack2(s1[2], s1[3]);
}

// o += P (one 16-key A fragment) x V rows [row0, row0 + 16) of the swizzled V tile in SMEM.
template <typename T, int D>
__device__ __forceinline__ void pv_mma(float (*o)[4], const u32* pa, const u16* sV, int row0,
                                       int lane) {
  const int kr = row0 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
  for (int jj = 0; jj < D / 16; ++jj) {
    u32 b[4];
    ldsm_x4_t(b, smem_u32(sV + swz<D>(kr, 2 * jj + (lane >> 4))));
    mma16816<T>(o[2 * jj], pa, b[0], b[1]);
    mma16816<T>(o[2 * jj + 1], pa, b[2], b[3]);
  }
}

// The query tile of this CTA (grid y): tiles of `tpt` tokens (tpt * P rows), sequence after
// sequence, run in reverse: within a sequence later tiles see more keys (causal), and
// starting the heaviest first keeps them out of the last wave. False past the last tile.
struct PrefillTile {
  int s;        // the sequence
  int tok0;     // its first token's row in q
  int ntok;     // tokens in the tile
  int nrows;    // ntok * P
  int p_first;  // the position of its first token
  int kv_len;   // keys its last token sees
};
__device__ __forceinline__ bool prefill_tile(const int* ss, const int* cl, int B, int tpt, int P,
                                             PrefillTile& pt) {
  int tile = gridDim.y - 1 - blockIdx.y;
  pt.s = -1;
  for (int i = 0; i < B; ++i) {
    const int nt = (ss[i + 1] - ss[i] + tpt - 1) / tpt;
    if (tile < nt) { pt.s = i; break; }
    tile -= nt;
  }
  if (pt.s < 0) return false;
  const int n_new = ss[pt.s + 1] - ss[pt.s], t0 = tile * tpt;
  pt.ntok = min(tpt, n_new - t0);
  pt.tok0 = ss[pt.s] + t0;
  pt.nrows = pt.ntok * P;
  pt.p_first = cl[pt.s] - n_new + t0;
  pt.kv_len = pt.p_first + pt.ntok;
  return true;
}

// A prefill tile's output: a lane holds rows ra and ra + 8 of O (the MMA accumulator layout,
// columns 8j + 2 (lane & 3) and + 1) and their partial l; l is summed over the quad and the
// tile's real rows (row < nrows: token tok0 + row / P, query head hbase + row % P) get O / l.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&o)[D / 8][4], float (&l)[2], int ra,
                                           int nrows, int tok0, int P, int hq, int hbase,
                                           int lane, u16* __restrict__ out) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int row = ra + 8 * r;
    if (row < nrows) {
      const float inv = 1.f / l[r];
      const size_t head = (size_t)(tok0 + row / P) * hq + hbase + row % P;
      u16* dst = out + head * D + (lane & 3) * 2;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<u32*>(dst + j * 8) = T::pack2(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
    }
  }
}

// One CTA per (tile of BMR = 16*NW query rows of one sequence, group of P query heads sharing a
// kv head). Row r of the tile is token r / P, query head r % P of the group: with P = G the G
// heads of a kv group share each K/V tile read, and a decode token in a mixed batch fills G
// rows instead of one. Variants (bench/results/kernels.md has the numbers on H100):
//  _w4:  4 warps, 64-row tiles, Q fragments held in registers (168 regs, 3 CTAs/SM).
//  _w8s: 8 warps, 128-row tiles, so each K/V tile in SMEM feeds twice the rows; Q fragments
//        re-read from SMEM each key tile to fit 128 regs and 2 CTAs (16 warps) per SM (Q in
//        registers needs 220 regs, so only one CTA of 8 warps fits, and was no faster than _w4).
// C: the pool's element (u16, or u8 for an E4M3 pool with scales k_scale and v_scale).
template <typename T, int D, int NW, bool QREG, bool CAP = false, typename C = u16>
__device__ void attn_prefill(const u16* __restrict__ q, const int* __restrict__ ss,
                             const int* __restrict__ cl, const int* __restrict__ bt,
                             const C* __restrict__ cache, int T_, int B, int hq, int hkv,
                             int mb, int bs, int nb, int scale_bits, int win, int P,
                             u16* __restrict__ out, int cap_bits = 0, float k_scale = 1.f,
                             float v_scale = 1.f) {
  constexpr int BMR = 16 * NW, NT = 32 * NW, CH = D / 8;
  constexpr bool E4M3 = sizeof(C) == 1;
  extern __shared__ __align__(16) u16 smem[];
  u16* sQ = smem;
  u16* sK = sQ + BMR * D;
  u16* sV = sK + BN * D;
  // Where the K/V tiles land: sK / sV themselves, or (E4M3 pool) a byte tile each after sV,
  // dequantized into them once it has arrived.
  u8* const raw = reinterpret_cast<u8*>(sV + BN * D);
  C* const ldK = E4M3 ? reinterpret_cast<C*>(raw) : reinterpret_cast<C*>(sK);
  C* const ldV = E4M3 ? reinterpret_cast<C*>(raw + BN * D) : reinterpret_cast<C*>(sV);
  const int hbase = blockIdx.x * P, kvh = hbase / (hq / hkv);
  PrefillTile pt;
  if (!prefill_tile(ss, cl, B, BMR / P, P, pt)) return;
  const int s = pt.s, ntok = pt.ntok, tok0 = pt.tok0, nrows = pt.nrows;
  const int p_first = pt.p_first, kv_len = pt.kv_len;
  const int n_tiles = (kv_len + BN - 1) / BN;
  // Key tiles wholly below the first row's window are seen by no row: start past them.
  const int j0 = win > 0 ? max(0, p_first - win + 1) / BN : 0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < BMR * CH; i += NT) {
    const int r = i / CH, c = i % CH;
    const bool ok = r < nrows;
    const u16* src = ok ? q + ((size_t)(tok0 + r / P) * hq + hbase + r % P) * D + c * 8 : q;
    cp_async16(smem_u32(sQ + swz<D>(r, c)), src, ok ? 16 : 0);
  }
  load_kv_tile<D, NT>(ldK, cache, bt, s, mb, bs, 0, nb, hkv, kvh, j0 * BN, kv_len);
  cp_commit();
  load_kv_tile<D, NT>(ldV, cache, bt, s, mb, bs, 1, nb, hkv, kvh, j0 * BN, kv_len);
  cp_commit();
  const float scale_log2 = __int_as_float(scale_bits) * 1.4426950408889634f;
  const float cap_in = CAP ? __int_as_float(scale_bits) / __int_as_float(cap_bits) : 0.f;
  const float cap_out = CAP ? __int_as_float(cap_bits) * 1.4426950408889634f : 0.f;
  const int ra = warp * 16 + (lane >> 2);
  // Padding rows (r >= nrows) take the last token's limit so no row is fully masked.
  const int lim0 = p_first + min(ra / P, ntok - 1), lim1 = p_first + min((ra + 8) / P, ntok - 1);
  // Rows are sorted by token, so the warp's first and last rows bound its causal limits: key
  // tiles wholly below lim_lo need no mask, tiles wholly above lim_hi no work at all.
  const int lim_lo = p_first + min(warp * 16 / P, ntok - 1);
  const int lim_hi = p_first + min((warp * 16 + 15) / P, ntok - 1);
  // Row p sees keys p - wv < j <= p: a key tile ending below the window of the warp's first
  // row is dead, one starting below that of its last row needs the mask.
  const int wv = win > 0 ? win : 0x7fffffff;
  u32 qf[QREG ? D / 16 : 1][4];
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  for (int j = j0; j < n_tiles; ++j) {
    const int k0 = j * BN;
    const bool live = k0 <= lim_hi && lim_lo - (k0 + BN - 1) < wv;
    cp_wait<1>();
    __syncthreads();
    if constexpr (E4M3) {
      dequant_tile<T, D>(sK, raw, k_scale, 0, BN, threadIdx.x, NT);
      __syncthreads();
    }
    if (QREG && j == j0) {
#pragma unroll
      for (int kk = 0; kk < (QREG ? D / 16 : 0); ++kk)
        ldsm_x4(qf[kk], smem_u32(sQ + swz<D>(warp * 16 + (lane & 15), 2 * kk + (lane >> 4))));
    }
    float sc[BN / 8][4];
    if (live) {
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        u32 qa[4];
        if constexpr (!QREG)
          ldsm_x4(qa, smem_u32(sQ + swz<D>(warp * 16 + (lane & 15), 2 * kk + (lane >> 4))));
        const u32* a = QREG ? qf[QREG ? kk : 0] : qa;
#pragma unroll
        for (int n2 = 0; n2 < BN / 16; ++n2) {
          u32 b[4];
          const int kr = n2 * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldsm_x4(b, smem_u32(sK + swz<D>(kr, 2 * kk + ((lane >> 3) & 1))));
          mma16816<T>(sc[2 * n2], a, b[0], b[1]);
          mma16816<T>(sc[2 * n2 + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();
    if (j + 1 < n_tiles)
      load_kv_tile<D, NT>(ldK, cache, bt, s, mb, bs, 0, nb, hkv, kvh, k0 + BN, kv_len);
    cp_commit();
    if (live) {
      softmax_step<BN / 8, D, CAP>(sc, o, m, l, scale_log2, k0, lim0, lim1, wv,
                                   k0 + BN - 1 > lim_lo || lim_hi - k0 >= wv, cap_in, cap_out);
    }
    cp_wait<1>();
    __syncthreads();
    if constexpr (E4M3) {
      dequant_tile<T, D>(sV, raw + BN * D, v_scale, 0, BN, threadIdx.x, NT);
      __syncthreads();
    }
    if (live) {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        u32 pa[4];
        p_frag<T>(pa, sc[2 * kk], sc[2 * kk + 1]);
        pv_mma<T, D>(o, pa, sV, kk * 16, lane);
      }
    }
    __syncthreads();
    if (j + 1 < n_tiles)
      load_kv_tile<D, NT>(ldV, cache, bt, s, mb, bs, 1, nb, hkv, kvh, k0 + BN, kv_len);
    cp_commit();
  }
  cp_wait<0>();
  store_rows<T, D>(o, l, ra, nrows, tok0, P, hq, hbase, lane, out);
}

// Where a decode CTA's partial results go in the workspace: q head r of split i is row
// first + r * rs + i * ss of ws_o (D floats) and of ws_lse (one). Grid splits keep a q head's
// splits together (rs = n_split, ss = 1, as attn_reduce reads them); scheduled ones are rows
// of slot-major tiles of all Hq heads (rs = 1, ss = Hq), a token's slots consecutive.
struct SplitRows {
  size_t first;
  int rs, ss;
  __device__ __forceinline__ size_t at(int r, int i) const {
    return first + (size_t)r * rs + (size_t)i * ss;
  }
};

// The flash-decoding combine inside the decode kernel: each split's CTA counts itself in on
// its (token, kv head) counter once its partials are written (last_to_arrive), and the last of
// `arrivals` to arrive sums the live splits' partials into out, so no attn_reduce launch
// follows. G q heads of one token; the live splits are the first n_live (attn_decode divides
// the token's own context, or the schedule lists only live ones). Shared memory, free by now:
// wgt, G x n_live floats (the K/V stages); sc, 17 words (the Q tile). No static __shared__
// here: with 80 bytes of it every 16-bit decode launch ran about 10% slower at batch 64 on
// the H100, splits or not (bench/results/kernels.md). Not inlined: its two call sites share
// one copy, and the decode loop compiles as it did without it.
template <typename T>
__device__ __noinline__ void combine_splits(const float* __restrict__ ws_o,
                                            const float* __restrict__ ws_lse,
                                            int* __restrict__ counter, int arrivals, int n_live,
                                            SplitRows rows, size_t head0, int G, int d,
                                            u16* __restrict__ out, float* __restrict__ wgt,
                                            float* __restrict__ sc) {
  float* const inv_den = sc;
  if (!last_to_arrive(counter, arrivals, reinterpret_cast<int*>(sc + 16))) return;
  // One CTA now does what attn_reduce's T * Hq CTAs did, so its loads must overlap: a warp
  // per q head for the weights, then 16-byte loads of the partials, 8 splits in flight.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < G; r += blockDim.x >> 5) {
    const float* lse = ws_lse + rows.at(r, 0);
    float mx = -INFINITY, den = 0.f;
    for (int i = lane; i < n_live; i += 32) mx = fmaxf(mx, __ldcg(lse + (size_t)i * rows.ss));
    mx = warp_max(mx);
    for (int i = lane; i < n_live; i += 32) {
      const float w = exp2f(__ldcg(lse + (size_t)i * rows.ss) - mx);
      wgt[r * n_live + i] = w;
      den += w;
    }
    den = warp_sum(den);
    if (lane == 0) inv_den[r] = 1.f / den;
  }
  __syncthreads();
  const int q4 = d / 4;
  for (int i = threadIdx.x; i < G * q4; i += blockDim.x) {
    const int r = i / q4, c = (i % q4) * 4;
    const float4* o = reinterpret_cast<const float4*>(ws_o + rows.at(r, 0) * d + c);
    const size_t step = (size_t)rows.ss * q4;
    const float* w = wgt + r * n_live;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll 8
    for (int j = 0; j < n_live; ++j) {
      const float4 v = __ldcg(o + j * step);
      a0 += w[j] * v.x;
      a1 += w[j] * v.y;
      a2 += w[j] * v.z;
      a3 += w[j] * v.w;
    }
    const float inv = inv_den[r];
    u16* dst = out + (head0 + r) * d + c;
    *reinterpret_cast<uint2*>(dst) =
        make_uint2((u32)T::from_f(a0 * inv) | ((u32)T::from_f(a1 * inv) << 16),
                   (u32)T::from_f(a2 * inv) | ((u32)T::from_f(a3 * inv) << 16));
  }
}

// ---- Decode over an E4M3 pool: MMA fragments straight from the byte tiles ---------------------
// The MMAs run in fp16 whatever T is: E4M3 -> fp16 is exact (cvt.rn.f16x2.e4m3x2, two values
// an instruction), Q is converted once (bf16 -> fp16, saturated at 65504), P is rounded to
// fp16. The pool's scales stay out of the tiles: S = (Q . k8) * k_scale goes into the softmax's
// scale, O = (P . v8) * v_scale into the output. Against the graph's DequantizeLinear
// (k8 * k_scale rounded to T) that skips one rounding of each K and V element.
//
// Q . K^T: a dot product's terms may be summed in any order, so the k slots of the MMA need not
// be head dims in order. Lane (g, t) reads 8 bytes, dims 32i + 8t .. + 7, of key g of an
// 8-key block: as loaded they are the B fragments of two k16 steps (dims 8t, 8t+1 in logical
// slots 2t, 2t+1 and 8t+2, 8t+3 in 2t+8, 2t+9 of the first; the next four of the second), and
// Q's A fragments are built once in that order (decode_e4m3_q).
__device__ __forceinline__ u32 f16x2_sat(float a, float b) {
  return F16::pack2(fminf(fmaxf(a, -65504.f), 65504.f), fminf(fmaxf(b, -65504.f), 65504.f));
}

// Q's fragments for the D / 16 k16 steps of S = Q K^T, rows g and g + 8 of the G real ones.
template <typename T, int D>
__device__ __forceinline__ void decode_e4m3_q(u32 (&qf)[D / 16][4], const u16* __restrict__ q,
                                              size_t head0, int G, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = g + 8 * h;
#pragma unroll
    for (int i = 0; i < D / 32; ++i) {
      uint4 v = make_uint4(0, 0, 0, 0);
      if (row < G) v = *reinterpret_cast<const uint4*>(q + (head0 + row) * D + 32 * i + 8 * t);
      u32 w[4] = {v.x, v.y, v.z, v.w};
      if constexpr (T::is_bf16) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          w[e] = f16x2_sat(T::to_f((u16)(w[e] & 0xffffu)), T::to_f((u16)(w[e] >> 16)));
      }
      qf[2 * i][h] = w[0]; qf[2 * i][2 + h] = w[1];
      qf[2 * i + 1][h] = w[2]; qf[2 * i + 1][2 + h] = w[3];
    }
  }
}

// S (two 8-key blocks: keys row0 .. row0 + 15 of the byte tile sK) = Q . K^T, unscaled.
template <int D>
__device__ __forceinline__ void decode_e4m3_qk(float (&sc)[2][4], const u32 (&qf)[D / 16][4],
                                               const u8* sK, int row0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) {
    const int r = row0 + nb * 8 + g;
#pragma unroll
    for (int i = 0; i < D / 32; ++i) {
      const uint2 k8 =
          *reinterpret_cast<const uint2*>(sK + r * D + e4m3_at<D>(r, 32 * i + 8 * t));
      mma16816<F16>(sc[nb], qf[2 * i], e4m3x2_to_f16x2(k8.x & 0xffffu),
                    e4m3x2_to_f16x2(k8.x >> 16));
      mma16816<F16>(sc[nb], qf[2 * i + 1], e4m3x2_to_f16x2(k8.y & 0xffffu),
                    e4m3x2_to_f16x2(k8.y >> 16));
    }
  }
}

// O += P . V over keys row0 .. row0 + 15 of the byte tile sV. V's B fragment pairs two keys
// of one dim, bytes D apart in the tile: lane (g, t) reads 4 bytes, dims 32i + 4g .. + 3, of
// each of its keys 2t, 2t + 1, 2t + 8, 2t + 9, and byte permutes pair them key by key. So the
// n slot g of O's tile 4i + d is dim 32i + 4g + d (decode_e4m3_col).
template <int D>
__device__ __forceinline__ void decode_e4m3_pv(float (*o)[4], const u32 (&pa)[4], const u8* sV,
                                               int row0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int r0 = row0 + 2 * t, r1 = r0 + 1, r2 = r0 + 8, r3 = r0 + 9;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    const int b = 32 * i + 4 * g;
    const u32 w0 = *reinterpret_cast<const u32*>(sV + r0 * D + e4m3_at<D>(r0, b));
    const u32 w1 = *reinterpret_cast<const u32*>(sV + r1 * D + e4m3_at<D>(r1, b));
    const u32 w2 = *reinterpret_cast<const u32*>(sV + r2 * D + e4m3_at<D>(r2, b));
    const u32 w3 = *reinterpret_cast<const u32*>(sV + r3 * D + e4m3_at<D>(r3, b));
    // [dim d of key a, dim d of key a + 1] pairs: dims 0, 1 and dims 2, 3 of the four
    const u32 lo01 = __byte_perm(w0, w1, 0x5140), hi01 = __byte_perm(w0, w1, 0x7362);
    const u32 lo23 = __byte_perm(w2, w3, 0x5140), hi23 = __byte_perm(w2, w3, 0x7362);
    const u32 pair01[4] = {lo01 & 0xffffu, lo01 >> 16, hi01 & 0xffffu, hi01 >> 16};
    const u32 pair23[4] = {lo23 & 0xffffu, lo23 >> 16, hi23 & 0xffffu, hi23 >> 16};
#pragma unroll
    for (int d = 0; d < 4; ++d)
      mma16816<F16>(o[4 * i + d], pa, e4m3x2_to_f16x2((unsigned short)pair01[d]),
                    e4m3x2_to_f16x2((unsigned short)pair23[d]));
  }
}

// The dim of O's accumulator column 2t + e (e = 0, 1) of tile j in decode_e4m3_pv's order.
__device__ __forceinline__ int decode_e4m3_col(int j, int t, int e) {
  return 32 * (j >> 2) + 4 * (2 * t + e) + (j & 3);
}

// C: the pool's element (u16, or u8 for an E4M3 pool with scales k_scale and v_scale).
template <typename T, int D, int NST, bool CAP = false, typename C = u16>
__device__ void attn_decode(const u16* __restrict__ q, const int* __restrict__ ss,
                            const int* __restrict__ cl, const int* __restrict__ bt,
                            const C* __restrict__ cache, int T_, int B, int hq, int hkv,
                            int mb, int bs, int nb, int scale_bits, int win, int n_split,
                            int chunk,
                            u16* __restrict__ out, float* __restrict__ ws_o,
                            float* __restrict__ ws_lse, int* __restrict__ arrived,
                            const int4* __restrict__ sched,
                            int cap_bits = 0, float k_scale = 1.f, float v_scale = 1.f) {
  constexpr bool E4M3 = sizeof(C) == 1;
  extern __shared__ __align__(16) u16 smem[];
  u16* sQ = smem;
  // NST stages of [K tile, V tile], read by the MMAs where they land (16-bit: swizzled for
  // ldmatrix; E4M3: bytes, by decode_e4m3_*). The E4M3 path keeps Q in registers only; sQ
  // stays the combine's scratch.
  u16* sKV = sQ + 16 * D;
  auto stage = [&](int st) { return reinterpret_cast<C*>(sKV) + st * 2 * BN * D; };
  const int G = hq / hkv;
  // This CTA's keys [k_begin, k_end) of token t, how many CTAs share the token's kv head
  // (arrivals) and how many of them hold keys (n_live), and where its partials go.
  int t, kvh, s, pos, k_begin, k_end, arrivals, n_live;
  SplitRows rows;
  size_t part;   // this CTA's row of q head 0 in the workspace
  if (sched != nullptr) {
    // The host's schedule (attention_plan.decode_schedule): a grid row's item {token,
    // k_begin, k_end, slot} and its token's {sequence, position, first slot, items}; rows
    // past the step's items have token -1. Every item holds keys. Both halves are read at
    // once, so the K/V loads wait on one read, not on find_seq's chain of them.
    const int4 it = sched[2 * blockIdx.y], tok = sched[2 * blockIdx.y + 1];
    if (it.x < 0) return;
    t = it.x, kvh = blockIdx.x, k_begin = it.y, k_end = it.z;
    s = tok.x, pos = tok.y;
    arrivals = n_live = tok.w;
    rows = SplitRows{(size_t)tok.z * hq + kvh * G, 1, hq};
    part = (size_t)it.w * hq + kvh * G;
  } else {
    t = blockIdx.x, kvh = blockIdx.y;
    if (T_ == B) {   // a token a sequence (each sequence has one or more): no search
      s = t, pos = cl[t] - 1;
    } else {
      s = find_seq(ss, B, t);
      pos = cl[s] - (ss[s + 1] - ss[s]) + (t - ss[s]);
    }
    const int split = blockIdx.z;
    // Splits cover this token's keys from the tile holding its window's first key (0 without
    // a window) to pos, in equal whole tiles of at least `chunk` keys: sized from the token's
    // own context, so a graph captured for the longest context still spreads a short one
    // over every split.
    const int first = win > 0 ? max(0, pos - win + 1) / BN * BN : 0;
    const int per_split = max(chunk, (pos + 1 - first + n_split * BN - 1) / (n_split * BN) * BN);
    k_begin = first + split * per_split, k_end = min(pos + 1, k_begin + per_split);
    arrivals = n_split;
    n_live = (pos + 1 - first + per_split - 1) / per_split;
    const size_t q0 = (size_t)t * hq + kvh * G;
    rows = SplitRows{q0 * n_split, n_split, 1};
    part = q0 * n_split + split;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const size_t head0 = (size_t)t * hq + kvh * G;
  // arrived: the splits combine in the last CTA; null: attn_reduce combines them after
  auto combine = [&]() {
    if (arrived == nullptr || arrivals == 1) return;
    combine_splits<T>(ws_o, ws_lse, arrived + (size_t)t * hkv + kvh, arrivals, n_live, rows,
                      head0, G, D, out, reinterpret_cast<float*>(sKV),
                      reinterpret_cast<float*>(sQ));
  };
  if (k_begin >= k_end) {  // past this token's context: an empty partial
    if (threadIdx.x < G) ws_lse[part + (size_t)threadIdx.x * rows.rs] = -INFINITY;
    combine();
    return;
  }
  const int n_tiles = (k_end - k_begin + BN - 1) / BN;
  constexpr int CH = D / 8;
  if constexpr (!E4M3) {
    for (int i = threadIdx.x; i < 16 * CH; i += NWARPS * 32) {
      const int r = i / CH, c = i % CH;
      const bool ok = r < G;
      cp_async16(smem_u32(sQ + swz<D>(r, c)), ok ? q + (head0 + r) * D + c * 8 : q,
                 ok ? 16 : 0);
    }
  }
  // The tiles are loaded a warp's own rows at a time (load_kv_rows), so no tile needs a CTA
  // barrier: on the H100 0-2% less time than CTA-wide loads at batch 64 over a 16-bit pool,
  // 2-6% on batches of mixed lengths, 5-25% over an E4M3 pool (bench/results/kernels.md).
  auto load = [&](int st, int k0) {   // stage st: keys from k0
    load_kv_rows<D, C>(stage(st), cache, bt, s, mb, bs, nb, hkv, kvh, k0, k_end, warp, lane);
  };
#pragma unroll
  for (int st = 0; st < NST; ++st) {
    if (st < n_tiles) load(st, k_begin + st * BN);
    cp_commit();
  }
  // An E4M3 pool's K scale multiplies the scores (decode_e4m3_qk leaves them unscaled).
  const float ks = E4M3 ? k_scale : 1.f;
  const float scale_log2 = __int_as_float(scale_bits) * ks * 1.4426950408889634f;
  const float cap_in = CAP ? __int_as_float(scale_bits) * ks / __int_as_float(cap_bits) : 0.f;
  const float cap_out = CAP ? __int_as_float(cap_bits) * 1.4426950408889634f : 0.f;
  u32 qf[D / 16][4];
  if constexpr (E4M3) decode_e4m3_q<T, D>(qf, q, head0, G, lane);
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  for (int j = 0; j < n_tiles; ++j) {
    cp_wait<NST - 1>();
    // the tile's rows are the warp's own; only Q, staged by every thread, needs the CTA
    if (!E4M3 && j == 0) __syncthreads();
    else __syncwarp();
    if (!E4M3 && j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldsm_x4(qf[kk], smem_u32(sQ + swz<D>(lane & 15, 2 * kk + (lane >> 4))));
    }
    const C* sK = stage(j % NST);
    const C* sV = sK + BN * D;
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    if constexpr (E4M3) {
      decode_e4m3_qk<D>(sc, qf, sK, warp * 16, lane);
    } else {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        u32 b[4];
        const int kr = warp * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldsm_x4(b, smem_u32(sK + swz<D>(kr, 2 * kk + ((lane >> 3) & 1))));
        mma16816<T>(sc[0], qf[kk], b[0], b[1]);
        mma16816<T>(sc[1], qf[kk], b[2], b[3]);
      }
    }
    const int kbase = k_begin + j * BN + warp * 16;
    // Tiles never cross a split's end (chunk is a multiple of BN), so pos bounds them above.
    softmax_step<2, D, CAP>(sc, o, m, l, scale_log2, kbase, pos, pos, win > 0 ? win : 0x7fffffff,
                            true, cap_in, cap_out);
    u32 pa[4];
    if constexpr (E4M3) {
      p_frag<F16>(pa, sc[0], sc[1]);
      decode_e4m3_pv<D>(o, pa, sV, warp * 16, lane);
    } else {
      p_frag<T>(pa, sc[0], sc[1]);
      pv_mma<T, D>(o, pa, sV, warp * 16, lane);
    }
    // this stage's reads (the warp's own rows) are done before they are refilled
    __syncwarp();
    if (j + NST < n_tiles) load(j % NST, k_begin + (j + NST) * BN);
    cp_commit();
  }
  cp_wait<0>();
  __syncthreads();
  // Combine the 4 warps' partial softmax states through smem (reusing the K/V tiles).
  float* sO = reinterpret_cast<float*>(sKV);  // [NWARPS][16][D]
  float* sM = sO + NWARPS * 16 * D;           // [NWARPS][16]
  float* sL = sM + NWARPS * 16;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int row = (lane >> 2) + 8 * r;
    if (row >= G) continue;   // padding rows of the 16-row tile: nothing reads them
    if constexpr (E4M3) {  // decode_e4m3_pv's columns, and V's scale
      float* dst = sO + (warp * 16 + row) * D;
#pragma unroll
      for (int jj = 0; jj < D / 8; ++jj) {
        dst[decode_e4m3_col(jj, lane & 3, 0)] = o[jj][2 * r] * v_scale;
        dst[decode_e4m3_col(jj, lane & 3, 1)] = o[jj][2 * r + 1] * v_scale;
      }
    } else {
      float* dst = sO + (warp * 16 + row) * D + (lane & 3) * 2;
#pragma unroll
      for (int jj = 0; jj < D / 8; ++jj) {
        dst[jj * 8] = o[jj][2 * r];
        dst[jj * 8 + 1] = o[jj][2 * r + 1];
      }
    }
    if ((lane & 3) == 0) { sM[warp * 16 + row] = m[r]; sL[warp * 16 + row] = l[r]; }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += NWARPS * 32) {
    const int r = i / D, c = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, sM[w * 16 + r]);
    float acc = 0.f, den = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const float mw = sM[w * 16 + r];
      if (mw != -INFINITY) {
        const float f = exp2f(mw - mx);
        acc += f * sO[(w * 16 + r) * D + c];
        den += f * sL[w * 16 + r];
      }
    }
    if (arrivals == 1) {
      out[(head0 + r) * D + c] = T::from_f(acc / den);
    } else {
      const size_t slot = part + (size_t)r * rows.rs;
      ws_o[slot * D + c] = acc / den;
      if (c == 0) ws_lse[slot] = mx + log2f(den);
    }
  }
  combine();
}

// One block per (token, q head), D threads: out = sum_s w_s o_s with w_s from the splits' lse.
// A token's splits fill from the first (attn_decode divides its own context), so the empty
// ones (lse = -inf) are a suffix: the weights of the live prefix go to shared memory once, and
// each thread's loop is a run of independent loads of the live partials only.
#define REDUCE_SPLITS 512   // attention_plan.MAX_DECODE_SPLITS
template <typename T>
__device__ void attn_reduce(const float* __restrict__ ws_o, const float* __restrict__ ws_lse,
                            int rows, int d, int n_split, u16* __restrict__ out) {
  __shared__ float wgt[REDUCE_SPLITS];
  __shared__ int n_live;
  const size_t row = blockIdx.x;
  if (row >= (size_t)rows) return;
  const float* lse = ws_lse + row * n_split;
  if (threadIdx.x == 0) n_live = n_split;
  __syncthreads();
  for (int i = threadIdx.x; i < n_split; i += blockDim.x) {
    const float v = lse[i];
    wgt[i] = v;
    if (v == -INFINITY) atomicMin(&n_live, i);
  }
  __syncthreads();
  const int nl = n_live;
  float mx = -INFINITY;
  for (int i = 0; i < nl; ++i) mx = fmaxf(mx, wgt[i]);   // smem broadcast, same order in all
  __syncthreads();
  for (int i = threadIdx.x; i < nl; i += blockDim.x) wgt[i] = exp2f(wgt[i] - mx);
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f, den = 0.f;
#pragma unroll 4
    for (int i = 0; i < nl; ++i) {
      acc += wgt[i] * ws_o[(row * n_split + i) * d + c];
      den += wgt[i];
    }
    out[row * d + c] = T::from_f(acc / den);
  }
}

template <typename T>
__device__ void kv_write(const u16* __restrict__ k, const u16* __restrict__ v,
                         const int* __restrict__ ss, const int* __restrict__ cl,
                         const int* __restrict__ bt, int T_, int B, int hkv, int d, int mb,
                         int bs, int nb, u16* __restrict__ cache) {
  const int t = blockIdx.x;
  if (t >= T_) return;
  const int s = find_seq(ss, B, t);
  const int pos = cl[s] - (ss[s + 1] - ss[s]) + (t - ss[s]);
  const int ch = d / 8;
  for (int i = threadIdx.x; i < 2 * hkv * ch; i += blockDim.x) {
    const int which = i / (hkv * ch), rem = i % (hkv * ch), h = rem / ch, c = rem % ch;
    const u16* src = (which ? v : k) + ((size_t)t * hkv + h) * d + c * 8;
    u16* dst = cache + kv_row(bt, s, mb, pos, bs, which, nb, hkv, h, d) + c * 8;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  }
}

#define ATTN_IN const u16 *q, const int *ss, const int *cl, const int *bt, const u16 *kv
#define ATTN_SC int T_, int B, int hq, int hkv, int mb, int bs, int nb, int sc, int win
// The E4M3-pool entries (the *_e4m3 modules): one byte an element, the K and V scales' fp32
// bits after `win`. Their bodies need sm_89+ (the E4M3 conversions); the lowering builds such
// engines for those targets only, so elsewhere an entry is a trap (and compiles to nothing).
#define ATTN_IN_E4M3 const u16 *q, const int *ss, const int *cl, const int *bt, const u8 *kv
// The E4M3 decode entries' CTAs an SM (launch bounds: 128 registers, no spills): their byte
// stages fit 4 where the 16-bit pool's fit 2, and 4 measured up to 1.3x faster than the 3 that
// the registers of unbounded code allow (bench/results/kernels.md).
#define DECODE_E4M3_MINB 4
#if __CUDA_ARCH__ >= 890
#define E4M3_ONLY(...) __VA_ARGS__
#else
#define E4M3_ONLY(...) __trap()
#endif
