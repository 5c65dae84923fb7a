// A mixture-of-experts layer (model_zoo/layers.py routed_experts) over the routed rows only:
//
//   moe_route     router logits [T, E] -> each token's top_k experts of softmax(logits)
//                 (fp32), optionally renormalised, and the routed rows grouped by expert
//   moe_gemm      the grouped GEMMs on tensor cores: gate-up with SwiGLU fused, then down,
//                 each expert's rows against that expert's weights only (moe_gemm_tc, a
//                 shared-memory tiled GEMM, for steps past 8 tokens whose experts hold
//                 more than a few rows each: launch_rules.moe_block_m; on sm_90a its
//                 wgmma form, moe_gemm_wg)
//   moe_combine   the weighted sum of each token's top_k rows back in token order
//                 [+ Qwen2-MoE's sigmoid-gated shared expert]
//
// Nothing comes back to the host: the routing kernel writes every size the GEMMs need into
// device memory (`meta`), and the GEMMs are launched over a grid that bounds them (the most
// tiles T tokens can make), each CTA reading its tile and leaving when there is none. So a
// decode step keeps its CUDA graph, and it reads the weights of the experts its tokens chose
// and no others.
//
// Buffers (R = T * top_k routed rows; a "position" is a row of the grouped order, the rows
// of expert 0 first, each expert's rows in token order):
//   ids [T, k] int32, wts [T, k] fp32   each token's experts, ascending, and their weights
//   pos_of [T, k] int32                 the position of each (token, pick)
//   perm [R] int32                      the token of each position
//   meta int32: [0] the number of tiles; [1 .. E + 1] offsets (expert e's positions are
//               offsets[e] .. offsets[e + 1]); from [E + 2], tiles as (expert, first
//               position, end position) triples, at most BM positions each (moe_tile); past
//               the most a step can make, the grid grouping's chunk counts (moe_chunk_counts)
//   act [R, I], y [R, H]                the experts' SwiGLU and down outputs, by position
//
// Rounding follows the graph: the gate-up and down products are rounded to the model dtype
// (the graph's batched MatMuls), SwiGLU as kernels/activation.cu, the weighted sum in fp32
// over the token's experts in ascending order (the graph's ReduceSum over E, whose
// unrouted terms are exact zeros), then rounded once.
//
// FP8B (moe_fp8b.cu's entries, --quant fp8-block): the experts' weights are E4M3 bytes
// [E, N, K] with a scale per block of G k and weight row, bs [E, K / G, N] in the compute
// dtype (the graph's DequantizeLinear scale as it is), G a power of two from 32. Each byte
// becomes q * s rounded once to the dtype, as the graph's DequantizeLinear, before the same
// 16-bit MMAs with x as it is stored (qgemv.cuh: dequant16_e4m3; on sm_90a, moe_gemm_wg8).
#pragma once
#include "common.cuh"
#include "qgemv.cuh"

#define MOE_MAX_EXPERTS 256
#define MOE_MAX_TOPK 8
#define MOE_ROUTE_THREADS 1024
#define MOE_TOPK_THREADS 128
#define MOE_NONE 0x7fffffff

// ---- routing (a grid past 32 tokens) and grouping (one CTA) -------------------------------------

// (v, i) beats (bv, bi): the larger probability, the lower index on a tie (ONNX TopK's
// order); any valid index beats none (MOE_NONE), so a NaN row still picks top_k distinct
// experts and the grouping below stays within its bounds.
__device__ __forceinline__ bool moe_better(float v, int i, float bv, int bi) {
  if (i == MOE_NONE) return false;
  if (bi == MOE_NONE) return true;
  return v > bv || (v == bv && i < bi);
}

// Two inclusive sums over a warp's lanes at once, by shuffles (the routing's scan of the
// experts' rows and tiles).
__device__ __forceinline__ void moe_warp_scan2(int lane, int& a, int& b) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int x = __shfl_up_sync(0xffffffffu, a, o), y = __shfl_up_sync(0xffffffffu, b, o);
    if (lane >= o) {
      a += x;
      b += y;
    }
  }
}

// A token's softmax (fp32) and top-k by one warp: ids[tk] its experts ascending, wts[tk]
// their probabilities (renormalised over the k if renorm).
template <typename T>
__device__ __forceinline__ void moe_pick(const u16* __restrict__ logits, int tk, int experts,
                                         int top_k, int renorm, int* __restrict__ ids,
                                         float* __restrict__ wts) {
  constexpr int EPL = MOE_MAX_EXPERTS / 32;   // a lane's experts: lane, lane + 32, ...
  const int lane = threadIdx.x & 31;
  float p[EPL];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < experts ? T::to_f(logits[(size_t)tk * experts + e]) : -INFINITY;
    mx = fmaxf(mx, p[i]);
  }
  mx = warp_max(mx);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    p[i] = lane + 32 * i < experts ? expf(p[i] - mx) : 0.f;
    s += p[i];
  }
  s = warp_sum(s);
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    p[i] = p[i] / s;
    if (!(p[i] >= 0.f)) p[i] = -1.f;   // NaN (a NaN or all -inf row): last, totally ordered
  }
  unsigned taken = 0;                         // bit i: expert lane + 32 i already chosen
  int sel[MOE_MAX_TOPK];
  float val[MOE_MAX_TOPK];
#pragma unroll
  for (int r = 0; r < MOE_MAX_TOPK; ++r) {
    sel[r] = MOE_NONE;
    val[r] = 0.f;
    if (r >= top_k) continue;
    float bv = -INFINITY;
    int bi = MOE_NONE;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      if (e < experts && !(taken >> i & 1) && moe_better(p[i], e, bv, bi)) {
        bv = p[i];
        bi = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (moe_better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    sel[r] = bi;
    val[r] = bv;
    if (bi != MOE_NONE && (bi & 31) == lane) taken |= 1u << (bi >> 5);
  }
  if (renorm) {   // the graph's Div(top, ReduceSum(top)), summed in rank order
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < MOE_MAX_TOPK; ++r) sum += r < top_k ? val[r] : 0.f;
#pragma unroll
    for (int r = 0; r < MOE_MAX_TOPK; ++r) val[r] = val[r] / sum;
  }
  // ascending experts: the combine then sums in the graph's order, and grouping is stable
#pragma unroll
  for (int a = 0; a < MOE_MAX_TOPK; ++a)
#pragma unroll
    for (int b = 0; b + 1 < MOE_MAX_TOPK - a; ++b)
      if (b + 1 < top_k && sel[b] > sel[b + 1]) {
        const int si = sel[b];
        sel[b] = sel[b + 1];
        sel[b + 1] = si;
        const float sv = val[b];
        val[b] = val[b + 1];
        val[b + 1] = sv;
      }
#pragma unroll
  for (int r = 0; r < MOE_MAX_TOPK; ++r)
    if (lane == r && r < top_k) {
      ids[(size_t)tk * top_k + r] = sel[r];
      wts[(size_t)tk * top_k + r] = val[r];
    }
}

// The top-k alone over a grid, a warp a token (moe_route then groups: steps of more than
// MOE_ROUTE_THREADS / 32 tokens, which one CTA's warps would walk several times over).
template <typename T>
__device__ __forceinline__ void moe_topk(const u16* __restrict__ logits, int tokens,
                                         int experts, int top_k, int renorm,
                                         int* __restrict__ ids, float* __restrict__ wts) {
  const int tk = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (tk < tokens) moe_pick<T>(logits, tk, experts, top_k, renorm, ids, wts);
}

// Tile i of meta's list (its expert, first and end position).
template <typename I, typename N>
__device__ __forceinline__ I* moe_tile(I* meta, int experts, N i) {
  return meta + 2 + experts + 3 * i;
}

// The grouping's chunk counts (moe_count_chunk, moe_route with picked = 2): meta past the most
// tiles a step can make (T k + E), which launch_rules.moe_meta_ints leaves room for.
__device__ __forceinline__ int* moe_chunk_counts(int* meta, int tokens, int experts,
                                                 int top_k) {
  return moe_tile(meta, experts, (size_t)tokens * top_k + experts);
}

// Positions of routed rows [base, base + blockDim.x) (stable: token order within an expert),
// each expert's after cursor[e], which then moves past them: lanes of a warp that chose the
// same expert find each other with __match_any_sync, and each warp's count per expert,
// summed over the warps before it, places its rows after theirs. wc: a count a warp and
// expert. Every thread of the block calls it.
__device__ __forceinline__ void moe_place_rows(const int* __restrict__ ids, int base, int rows,
                                               int top_k, int experts, int* cursor,
                                               int (*wc)[MOE_MAX_EXPERTS],
                                               int* __restrict__ perm,
                                               int* __restrict__ pos_of) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int q = threadIdx.x; q < nwarps * experts; q += blockDim.x) wc[q / experts][q % experts] = 0;
  __syncthreads();
  const int i = base + threadIdx.x;
  const int e = i < rows ? ids[i] : -1;
  const unsigned same = __match_any_sync(0xffffffffu, e);
  const int rank = __popc(same & ((1u << lane) - 1u));
  if (e >= 0 && rank == 0) wc[warp][e] = __popc(same);
  __syncthreads();
  if (e >= 0) {
    int pos = cursor[e] + rank;
    for (int w = 0; w < warp; ++w) pos += wc[w][e];
    perm[pos] = i / top_k;
    pos_of[i] = pos;
  }
  __syncthreads();
  for (int q = threadIdx.x; q < experts; q += blockDim.x) {
    int add = 0;
    for (int w = 0; w < nwarps; ++w) add += wc[w][q];
    cursor[q] += add;
  }
  __syncthreads();
}

// One CTA of up to MOE_ROUTE_THREADS threads (launch_rules: 32 a token, at least 128). Step 1
// (unless `picked`: moe_topk wrote ids and wts): a warp a token, moe_pick. Step 2: counts (or,
// picked = 2, the sum of moe_count_chunk's), then offsets and tiles (a block-wide scan). Step 3:
// positions, stable (token order within an expert): the block walks the routed rows in
// chunks of its size (moe_place_rows), or, picked = 2, leaves them to moe_place_chunk.
template <typename T>
__device__ __forceinline__ void moe_route(const u16* __restrict__ logits, int tokens,
                                          int experts, int top_k, int renorm, int bm,
                                          int* __restrict__ ids, float* __restrict__ wts,
                                          int* __restrict__ pos_of, int* __restrict__ perm,
                                          int* __restrict__ meta, int picked) {
  __shared__ int cnt[MOE_MAX_EXPERTS], cursor[MOE_MAX_EXPERTS], first_tile[MOE_MAX_EXPERTS];
  __shared__ int wc[MOE_ROUTE_THREADS / 32][MOE_MAX_EXPERTS];
  __shared__ int wsum[2][MOE_ROUTE_THREADS / 32], carry[2];   // the scan of the counts
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) cnt[e] = 0;
  if (threadIdx.x < 2) carry[threadIdx.x] = 0;

  if (!picked)
    for (int tk = warp; tk < tokens; tk += nwarps)
      moe_pick<T>(logits, tk, experts, top_k, renorm, ids, wts);
  __syncthreads();   // ids are visible to the whole block from here

  const int rows = tokens * top_k;
  if (picked == 2) {
    const int chunks = (rows + MOE_ROUTE_THREADS - 1) / MOE_ROUTE_THREADS;
    const int* cc = moe_chunk_counts(meta, tokens, experts, top_k);
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
      int c = 0;
      for (int ch = 0; ch < chunks; ++ch) c += cc[(size_t)ch * experts + e];
      cnt[e] = c;
    }
  } else {
    for (int i = threadIdx.x; i < rows; i += blockDim.x) atomicAdd(&cnt[ids[i]], 1);
  }
  __syncthreads();
  // Offsets and first tiles: an exclusive scan of (rows, tiles) over the experts, blockDim of
  // them at a time (each warp's by shuffles, then the warps' totals by warp 0); one thread
  // walking the experts made the routing of Qwen3-30B-A3B's 128 a decode step's longest
  // kernel of a layer (bench/results/moe.md).
  for (int base = 0; base < experts; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int c = e < experts ? cnt[e] : 0, t = (c + bm - 1) / bm;
    int ci = c, ti = t;   // inclusive within the warp
    moe_warp_scan2(lane, ci, ti);
    if (lane == 31) {
      wsum[0][warp] = ci;
      wsum[1][warp] = ti;
    }
    __syncthreads();
    if (warp == 0) {   // the warps' totals -> each warp's exclusive prefix
      const int a = lane < nwarps ? wsum[0][lane] : 0, b = lane < nwarps ? wsum[1][lane] : 0;
      int ai = a, bi = b;
      moe_warp_scan2(lane, ai, bi);
      if (lane < nwarps) {
        wsum[0][lane] = ai - a;
        wsum[1][lane] = bi - b;
      }
    }
    __syncthreads();
    const int off = carry[0] + wsum[0][warp] + ci - c, tile = carry[1] + wsum[1][warp] + ti - t;
    if (e < experts) {
      meta[1 + e] = off;
      cursor[e] = off;
      first_tile[e] = tile;
    }
    __syncthreads();   // carry read by all before the last thread moves it on
    if (threadIdx.x == blockDim.x - 1) {   // its expert is the chunk's last (or none: c = t = 0)
      carry[0] = off + c;
      carry[1] = tile + t;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    meta[1 + experts] = carry[0];
    meta[0] = carry[1];
  }
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    int* tile = moe_tile(meta, experts, first_tile[e]);
    for (int r = 0; r < cnt[e]; r += bm, tile += 3) {
      tile[0] = e;
      tile[1] = cursor[e] + r;
      tile[2] = cursor[e] + min(r + bm, cnt[e]);
    }
  }

  if (picked == 2) {   // the chunks' counts -> their first positions; moe_place_chunk places
    const int chunks = (rows + MOE_ROUTE_THREADS - 1) / MOE_ROUTE_THREADS;
    int* cc = moe_chunk_counts(meta, tokens, experts, top_k);
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
      int pos = cursor[e];
      for (int c = 0; c < chunks; ++c) {
        const int n = cc[(size_t)c * experts + e];
        cc[(size_t)c * experts + e] = pos;
        pos += n;
      }
    }
    return;
  }
  for (int base = 0; base < rows; base += blockDim.x)   // uniform: every thread loops
    moe_place_rows(ids, base, rows, top_k, experts, cursor, wc, perm, pos_of);
}

// Steps of many routed rows (launch_rules.MOE_GRID_ROUTE_ROWS) group over a grid, a CTA a
// chunk of MOE_ROUTE_THREADS rows: moe_count_chunk writes each chunk's counts per expert,
// moe_route (picked = 2) sums them, scans and writes the tiles as above, then turns each
// chunk's counts into its rows' first positions per expert (the expert's offset plus the rows
// of earlier chunks), and moe_place_chunk places each chunk's rows from there, as moe_route's
// own walk would (one CTA walking 32,768 rows was 130 us of a 4096-token Qwen3-30B-A3B layer).
__device__ __forceinline__ void moe_count_chunk(const int* __restrict__ ids, int tokens,
                                                int experts, int top_k,
                                                int* __restrict__ meta) {
  __shared__ int cnt[MOE_MAX_EXPERTS];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  const int i = blockIdx.x * MOE_ROUTE_THREADS + threadIdx.x;
  if (i < tokens * top_k) atomicAdd(&cnt[ids[i]], 1);
  __syncthreads();
  int* out = moe_chunk_counts(meta, tokens, experts, top_k) + (size_t)blockIdx.x * experts;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) out[e] = cnt[e];
}

__device__ __forceinline__ void moe_place_chunk(const int* __restrict__ ids, int tokens,
                                                int experts, int top_k,
                                                int* __restrict__ pos_of,
                                                int* __restrict__ perm, int* __restrict__ meta) {
  __shared__ int cursor[MOE_MAX_EXPERTS];
  __shared__ int wc[MOE_ROUTE_THREADS / 32][MOE_MAX_EXPERTS];
  const int* first =
      moe_chunk_counts(meta, tokens, experts, top_k) + (size_t)blockIdx.x * experts;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) cursor[e] = first[e];
  // (moe_place_rows' first barrier orders these before any read)
  moe_place_rows(ids, blockIdx.x * MOE_ROUTE_THREADS, tokens * top_k, top_k, experts, cursor,
                 wc, perm, pos_of);
}

// ---- the grouped GEMM -----------------------------------------------------------------------
// The decode kernel's weight loads (moe_gemm, below) have tc_gemv's pattern: a warp's load
// takes 64 bytes of each of 16 rows and the next warp's chunk the lines' other halves.
// MOE_L2 sets their L2 prefetch size (kernels/gemv.cu: GEMV_L2); a benchmark may define it
// to compare (bench/kernels/l2_prefetch.py --only moe).
#ifndef MOE_L2
#define MOE_L2 ".L2::128B"
#endif
LLMC_LD_STREAM_L2(ld_expert, MOE_L2)

// out[pos, o] = sum_k x[row(pos), k] * w[expert(pos), o, k], the weights stored [E, N, K]
// (each expert's [out, in]). ACT: the gate-up GEMM with SwiGLU fused: w holds 2n rows an
// expert (gate [0, n), up [n, 2n)), x rows are tokens (perm), out [R, n] = silu(gate) * up.
// Otherwise the down GEMM: x rows are positions (the activations), out [R, n].
//
// The 8-row shape (m8: decode steps, and steps whose experts hold few rows each; moe_gemm_tc below
// serves the rest). A CTA is one tile (an expert and up to BM = 8 NT of its positions, from meta)
// times WN * 16 weight rows, its warps WN over N and SK over K: warp (wn, sk) takes 16 weight rows
// (ACT: 8 gate rows and their up rows, rows g and g + 8 of the MMA tile, so both inputs of an
// output end in one lane) and the 32-k chunks sk, sk + SK, ... Fragments as in gemv.cu's tc_gemv:
// each lane's 16-byte load of a weight row is its A fragment for two k16 steps and the same 8 k of
// an x row its B fragment, straight from global memory (the weights are read once, streamed; x is
// re-read by the CTA's warps from L1). U chunks are in flight ahead.
// SK > 1 sums the partial tiles through shared memory in warp order (deterministic).
// FP8B: a lane's 16 bytes are 16 k of E4M3 (a chunk is 64 k), each row's pairs made 16-bit
// with its block's scale, four m16n8k16 MMAs a chunk as qgemv.cuh's w8_gemv with BLOCKS does.
template <typename T, int NT, int WN, int SK, int U, bool ACT, bool FP8B = false>
__device__ __forceinline__ void moe_gemm(const u16* __restrict__ x, const void* __restrict__ w,
                                         const int* __restrict__ perm,
                                         const int* __restrict__ meta, int experts, int n,
                                         int k, u16* __restrict__ out,
                                         const u16* __restrict__ bs = nullptr, int gshift = 0) {
  constexpr int BM = NT * 8, OUTW = ACT ? 8 : 16;
  constexpr int WB = FP8B ? 1 : 2, CK = FP8B ? 64 : 32, LK = CK / 4;  // bytes a weight, k a
                                                                      // chunk, k a lane's load
  __shared__ float part[SK > 1 ? SK : 1][SK > 1 ? WN : 1][SK > 1 ? NT : 1][4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wn = warp % WN, sk = warp / WN;
  if ((int)blockIdx.y >= meta[0]) return;       // uniform: a tile past the last
  const int* tile = moe_tile(meta, experts, blockIdx.y);
  const int e = tile[0], r0 = tile[1], rows = min(tile[2] - tile[1], BM);
  const int o0 = (blockIdx.x * WN + wn) * OUTW;
  // a warp past N: with SK == 1 it has nothing to do; with SK > 1 it still meets the
  // barrier below (its loads clamped to the last row, its stores skipped)
  if (SK == 1 && o0 >= n) return;
  const size_t wrows = ACT ? 2 * (size_t)n : (size_t)n;
  const u8* we = static_cast<const u8*>(w) + (size_t)e * wrows * k * WB;
  // rows past the end re-read the last row (never stored), as in gemv.cu
  const int ra = min(o0 + g, n - 1);
  const int rb = ACT ? n + ra : min(o0 + g + 8, n - 1);
  const u8* wa = we + ((size_t)ra * k + LK * t) * WB;
  const u8* wb = we + ((size_t)rb * k + LK * t) * WB;
  // FP8B: the two rows' scales of block b at sa[b * wrows], sb[b * wrows]
  const size_t se = FP8B ? (size_t)e * (k >> gshift) * wrows : 0;
  const u16* sa = FP8B ? bs + se + ra : nullptr;
  const u16* sb = FP8B ? bs + se + rb : nullptr;
  const u16* xr[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int i = j * 8 + g;
    xr[j] = i < rows ? x + (size_t)(perm ? perm[r0 + i] : r0 + i) * k + LK * t : nullptr;
  }
  const int nt = (rows + 7) >> 3;               // 8-row tiles holding positions
  const int chunks = (k + CK - 1) / CK;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  uint4 va[U], vb[U], na[U], nb[U];
  u16 ca[U], cb[U], nca[U], ncb[U];             // FP8B: the rows' block scales
  auto load_w = [&](uint4* a, uint4* b, u16* sca, u16* scb, int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = (c + u * SK) * CK;
      const bool ok = kk + LK * t < k;
      a[u] = ok ? ld_expert(wa + kk * WB) : make_uint4(0, 0, 0, 0);
      b[u] = ok ? ld_expert(wb + kk * WB) : make_uint4(0, 0, 0, 0);
      if constexpr (FP8B) {
        const size_t at = (size_t)((kk + LK * t) >> gshift) * wrows;
        sca[u] = ok ? __ldg(sa + at) : (u16)0;
        scb[u] = ok ? __ldg(sb + at) : (u16)0;
      }
    }
  };
  load_w(va, vb, ca, cb, sk);
  load_w(na, nb, nca, ncb, sk + SK * U);
  for (int c = sk; c < chunks; c += SK * U) {
    if (c != sk) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        va[u] = na[u];
        vb[u] = nb[u];
        ca[u] = nca[u];
        cb[u] = ncb[u];
      }
      load_w(na, nb, nca, ncb, c + SK * U);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kc = (c + u * SK) * CK;
      const bool ok = kc + LK * t < k;
      if constexpr (FP8B) {   // pair p of a row's 16 k and of x's: k slots 2t / 2t + 8
        u32 a[8], b[8];
        dequant16_e4m3<T>(va[u], e4m3_scale2<T>(ca[u]), a);
        dequant16_e4m3<T>(vb[u], e4m3_scale2<T>(cb[u]), b);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if (j >= nt) break;                   // uniform across the warp
          const uint4 zero = make_uint4(0, 0, 0, 0);
          const uint4* p = reinterpret_cast<const uint4*>(xr[j] + kc);
          const uint4 x0 = ok && xr[j] ? __ldg(p) : zero, x1 = ok && xr[j] ? __ldg(p + 1) : zero;
          const u32 xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
          for (int q = 0; q < 4; ++q)
            mma_16816<T>(acc[j], a[2 * q], b[2 * q], a[2 * q + 1], b[2 * q + 1], xs[2 * q],
                         xs[2 * q + 1]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if (j >= nt) break;                   // uniform across the warp
          const uint4 xv = ok && xr[j] ? __ldg(reinterpret_cast<const uint4*>(xr[j] + kc))
                                       : make_uint4(0, 0, 0, 0);
          mma_16816<T>(acc[j], va[u].x, vb[u].x, va[u].y, vb[u].y, xv.x, xv.y);
          mma_16816<T>(acc[j], va[u].z, vb[u].z, va[u].w, vb[u].w, xv.z, xv.w);
        }
      }
    }
  }
  if constexpr (SK > 1) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) part[sk][wn][j][q][lane] = acc[j][q];
    __syncthreads();
    if (sk != 0 || o0 >= n) return;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float v = 0.f;
#pragma unroll
        for (int s = 0; s < SK; ++s) v += part[s][wn][j][q][lane];
        acc[j][q] = v;
      }
  }
  // C element q of lane (g, t): weight row g (+ 8 for q >= 2), tile row 2 t + (q & 1)
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    if (j >= nt) break;
#pragma unroll
    for (int q = 0; q < (ACT ? 2 : 4); ++q) {
      const int i = j * 8 + 2 * t + (q & 1);
      const int o = o0 + g + (ACT ? 0 : 8 * (q >> 1));
      if (i >= rows || o >= n) continue;
      float v = acc[j][q];
      if constexpr (ACT) {   // rounded as the graph's MatMul output and activation.cu
        const float gate = rnd<T>(v), up = rnd<T>(acc[j][q + 2]);
        v = rnd<T>(silu_f(gate)) * up;
      }
      out[(size_t)(r0 + i) * n + o] = T::from_f(v);
    }
  }
}

// ---- the grouped GEMM for steps of many tokens: shared-memory tiles -------------------------
// The same product and outputs as moe_gemm (one tile of BM positions of an expert, from meta),
// as a tiled tensor-core GEMM: a CTA computes BM positions x 128 weight rows, WM x WN warps
// of (BM / WM) x (128 / WN) each. Every k step of 32, the CTA copies the tile's x rows
// (gathered through perm for gate-up) and its 128 weight rows into shared memory with
// cp.async, ST steps in flight, and the warps read their fragments with ldmatrix: each
// weight byte comes from HBM once a tile and feeds BM rows, each x byte feeds 128 outputs.
// ACT: the 128 weight rows are 64 gate rows and their 64 up rows, interleaved so a warp's
// first half of n8 fragments are gate rows o .. and its second half the up rows of the same
// o: an output's gate and up sums end in one lane, and the epilogue is moe_gemm's.
// The grid is (tiles, N blocks): consecutive CTAs are the row tiles of one N block, so an
// expert's weight block is read from HBM once for all its tiles and the x rows (a few MB)
// stay in L2 across N blocks. Rows past the tile's end and k past K are zero-filled (cp.async
// with no source bytes), weight rows past N re-read the last row (never stored), and warps
// skip the MMAs of 16-row fragments past the tile's end.
// FP8B: the weights' E4M3 bytes are copied (cp.async, ST steps in flight as x's) into a ring
// of their own, and each k step, before the barrier, every thread turns the 16 bytes it
// copied into 16-bit q * s in the staged layout above (two buffers, alternating); a thread's
// block scales come with its copies, into registers (the k loop unrolled by ST so each
// step's are named at compile time). Shared memory: x's ring, 2 staged weight tiles and the
// bytes' ring: as much as the 16-bit kernel's ST weight stages at ST = 4.
// The x row that row r of a tile (from position r0) copies: the token through perm (gate-up)
// or the position itself (down); row 0's past the tile's rows, whose copies are zero-filled.
__device__ __forceinline__ const u16* moe_x_row(const u16* x, const int* perm, int r0, int r,
                                                int rows, int k) {
  const int rr = r < rows ? r : 0;
  return x + (size_t)(perm ? perm[r0 + rr] : r0 + rr) * k;
}

#define MOE_TC_BN 128
#define MOE_TC_BK 32

// A row of a staged tile is 32 halfs, four 16-byte chunks; chunk c of row r sits at chunk
// c ^ ((r / 2) % 4), so the 8 rows an ldmatrix reads (same c) hit 8 distinct bank groups.
__device__ __forceinline__ int moe_swz(int r, int c) { return (r * 4 + (c ^ ((r >> 1) & 3))) * 8; }

template <typename T, int BM, int WM, int WN, int ST, bool ACT, bool FP8B = false>
__device__ __forceinline__ void moe_gemm_tc(const u16* __restrict__ x, const void* __restrict__ w,
                                            const int* __restrict__ perm,
                                            const int* __restrict__ meta, int experts, int n,
                                            int k, u16* __restrict__ out,
                                            const u16* __restrict__ bs = nullptr,
                                            int gshift = 0) {
  constexpr int BN = MOE_TC_BN, BK = MOE_TC_BK, NTH = 32 * WM * WN;
  constexpr int WR = BM / WM, WC = BN / WN;     // a warp's rows and weight rows
  constexpr int MI = WR / 16, NJ = WC / 8;      // ... as 16-row and n8 fragments
  // copies a thread makes a step: x rows, weight rows (FP8B: 16 bytes, half a row), and the
  // rows between a thread's copies
  constexpr int AL = BM * 4 / NTH, BL = FP8B ? BN * 2 / NTH : BN * 4 / NTH;
  constexpr int RS = NTH / 4, RSB = FP8B ? NTH / 2 : RS;
  constexpr int WB = FP8B ? 1 : 2;              // bytes a weight
  static_assert(WR % 16 == 0 && NJ % 2 == 0 && AL * NTH == BM * 4 &&
                    BL * NTH == BN * (FP8B ? 2 : 4) && (!FP8B || ST % 2 == 0),
                "moe_gemm_tc: a warp tile of whole 16 x 16 fragments, copies spread evenly");
  extern __shared__ __align__(16) u16 moe_sm[];
  u16* sa = moe_sm;                             // [ST][BM][BK]
  u16* sb = moe_sm + ST * BM * BK;              // [ST][BN][BK]; FP8B: [2][BN][BK]
  u8* s8 = reinterpret_cast<u8*>(sb + (FP8B ? 2 : ST) * BN * BK);   // FP8B: [ST][BN][BK] bytes
  if ((int)blockIdx.x >= meta[0]) return;       // uniform: a tile past the last
  const int* tile = moe_tile(meta, experts, blockIdx.x);
  const int e = tile[0], r0 = tile[1], rows = min(tile[2] - tile[1], BM);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp % WM, wn = warp / WM;
  const int o0 = blockIdx.y * (ACT ? BN / 2 : BN);
  const size_t wrows = ACT ? 2 * (size_t)n : (size_t)n;
  const u8* we = static_cast<const u8*>(w) + (size_t)e * wrows * k * WB;
  const u16* se = FP8B ? bs + (size_t)e * (k >> gshift) * wrows : nullptr;

  // this thread's copies: x rows tid / 4 + RS i of each tile, 16-byte chunk tid % 4; weight
  // rows tid / 4 + RS i likewise (FP8B: rows tid / 2 + RSB i, 16 bytes at k 16 (tid % 2))
  const int cc = tid & 3, cb = FP8B ? tid & 1 : cc;
  const u16* asrc[AL];
  bool aok[AL];
#pragma unroll
  for (int i = 0; i < AL; ++i) {
    const int r = (tid >> 2) + RS * i;
    aok[i] = r < rows;
    asrc[i] = moe_x_row(x, perm, r0, r, rows, k);
  }
  const u8* bsrc[BL];
  const u16* ssrc[BL];                          // FP8B: the row's block scales, a block apart
#pragma unroll
  for (int i = 0; i < BL; ++i) {
    const int r = (tid >> (FP8B ? 1 : 2)) + RSB * i;   // staged weight row
    size_t wr;
    if constexpr (ACT) {                        // a warp column: WC / 2 gate rows, their up rows
      const int q = r % WC, o = min(o0 + (r / WC) * (WC / 2) + q % (WC / 2), n - 1);
      wr = (q < WC / 2 ? 0 : (size_t)n) + o;
    } else {
      wr = min(o0 + r, n - 1);
    }
    bsrc[i] = we + wr * k * WB;
    ssrc[i] = FP8B ? se + wr : nullptr;
  }
  u16 scale[FP8B ? ST : 1][BL];                 // FP8B: each stage's block scales, by stage
  auto load = [&](int stage, int kt) {
    const int kk = kt * BK + cc * 8;
    const bool kok = kk < k;                    // K is a multiple of 8: a chunk is all in or out
    u16* a = sa + stage * BM * BK;
#pragma unroll
    for (int i = 0; i < AL; ++i) {
      const bool ok = kok && aok[i];
      cp_async16(smem_u32(a + moe_swz((tid >> 2) + RS * i, cc)), ok ? asrc[i] + kk : x,
               ok ? 16 : 0);
    }
    if constexpr (FP8B) {   // K is a multiple of G >= 32 = BK: a step is whole and one block
      const int kb = kt * BK + cb * 16;
      u8* b = s8 + stage * BN * BK;
#pragma unroll
      for (int i = 0; i < BL; ++i) {
        cp_async16(smem_u32(b + (((tid >> 1) + RSB * i) * 2 + cb) * 16), bsrc[i] + kb, 16);
        scale[stage][i] = __ldg(ssrc[i] + (size_t)(kb >> gshift) * wrows);
      }
    } else {
      u16* b = sb + stage * BN * BK;
#pragma unroll
      for (int i = 0; i < BL; ++i)
        cp_async16(smem_u32(b + moe_swz((tid >> 2) + RS * i, cc)), kok ? bsrc[i] + 2 * kk : w,
                   kok ? 16 : 0);
    }
  };
  // FP8B: this thread's bytes of a landed stage -> q * s in staged tile `buf`
  auto convert = [&](int stage, int buf) {
#pragma unroll
    for (int i = 0; i < BL; ++i) {
      const int r = (tid >> 1) + RSB * i;
      u32 p[8];
      dequant16_e4m3<T>(*reinterpret_cast<const uint4*>(s8 + stage * BN * BK + (r * 2 + cb) * 16),
                        e4m3_scale2<T>(scale[stage][i]), p);
      u16* b = sb + buf * BN * BK;
      *reinterpret_cast<uint4*>(b + moe_swz(r, 2 * cb)) = make_uint4(p[0], p[1], p[2], p[3]);
      *reinterpret_cast<uint4*>(b + moe_swz(r, 2 * cb + 1)) = make_uint4(p[4], p[5], p[6], p[7]);
    }
  };

  float acc[MI][NJ][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  const int ktiles = (k + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < ktiles) load(s, s);
    cp_commit();                            // empty groups keep the count uniform
  }
  const int m_base = wm * WR;
  auto mma_step = [&](const u16* a, const u16* b) {
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // B: an x4 is fragments (2j, 2j + 1) x (k 0-7, k 8-15) of this k16 step
      u32 bf[NJ][2];
#pragma unroll
      for (int j = 0; j < NJ / 2; ++j) {
        const int r = wn * WC + j * 16 + (lane & 7) + ((lane >> 4) << 3);
        u32 v[4];
        ldsm_x4(v, smem_u32(b + moe_swz(r, ks * 2 + ((lane >> 3) & 1))));
        bf[2 * j][0] = v[0];
        bf[2 * j][1] = v[1];
        bf[2 * j + 1][0] = v[2];
        bf[2 * j + 1][1] = v[3];
      }
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        if (m_base + i * 16 >= rows) break;     // uniform across the warp
        u32 af[4];   // rows 0-7 / 8-15 x k 0-7, then the same rows x k 8-15
        ldsm_x4(af, smem_u32(a + moe_swz(m_base + i * 16 + (lane & 15),
                                             ks * 2 + (lane >> 4))));
#pragma unroll
        for (int j = 0; j < NJ; ++j)
          mma_16816<T>(acc[i][j], af[0], af[1], af[2], af[3], bf[j][0], bf[j][1]);
      }
    }
  };
  if constexpr (FP8B) {   // step kt in stage kt % ST, staged tile kt % 2: named when unrolled
    for (int k0 = 0; k0 < ktiles; k0 += ST) {
#pragma unroll
      for (int s = 0; s < ST; ++s) {
        const int kt = k0 + s;
        if (kt >= ktiles) break;
        cp_wait<ST - 2>();                  // step kt has landed (this thread's copies)
        convert(s, s & 1);                  // tile s & 1 was last read at step kt - 2
        __syncthreads();                        // everyone's converted; step kt - 1 consumed
        if (kt + ST - 1 < ktiles) load((s + ST - 1) % ST, kt + ST - 1);
        cp_commit();
        mma_step(sa + s * BM * BK, sb + (s & 1) * BN * BK);
      }
    }
  } else {
    for (int kt = 0; kt < ktiles; ++kt) {
      cp_wait<ST - 2>();                    // step kt has landed (this thread's copies)
      __syncthreads();                          // ... everyone's; and step kt - 1 is consumed
      if (kt + ST - 1 < ktiles) load((kt + ST - 1) % ST, kt + ST - 1);
      cp_commit();
      mma_step(sa + (kt % ST) * BM * BK, sb + (kt % ST) * BN * BK);
    }
  }
  cp_wait<0>();

  // C element q of lane (g, t): row g (+ 8 for q >= 2) of the fragment, column 2 t + (q & 1)
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < MI; ++i) {
#pragma unroll
    for (int j = 0; j < (ACT ? NJ / 2 : NJ); ++j) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int r = m_base + i * 16 + g + 8 * (q >> 1);
        const int o = o0 + wn * (ACT ? WC / 2 : WC) + j * 8 + 2 * t + (q & 1);
        if (r >= rows || o >= n) continue;
        float v = acc[i][j][q];
        if constexpr (ACT) {   // rounded as the graph's MatMul output and activation.cu
          const float gate = rnd<T>(v), up = rnd<T>(acc[i][j + NJ / 2][q]);
          v = rnd<T>(silu_f(gate)) * up;
        }
        out[(size_t)(r0 + r) * n + o] = T::from_f(v);
      }
    }
  }
}

// ---- the grouped GEMM for steps of many tokens on sm_90a: warpgroup MMAs ---------------------
// moe_gemm_tc's product, tiles, grid and epilogue, with Hopper's wgmma doing the MMAs: a
// CTA is BM / 64 warpgroups, each 64 of the tile's positions x BN (128 or 256) weight rows,
// one m64nBNk16 instruction a k16 step with both operands read from shared memory by the
// tensor cores (no ldmatrix, no fragments in registers), the next k steps' copies in flight
// while they run. Stages of MOE_WG_BK = 64 k: a row is one 128-byte line, stored in the
// 128-byte swizzle of hopper.cuh's smem_desc (chunk c of row r at chunk c ^ (r % 8)),
// K-major for both x (A) and the weights (B, each expert's [out, in] rows as stored).
// A stage is refilled two steps after its MMAs were issued: each warpgroup waits for all but
// its newest MMA group, so once every thread has passed a step's barrier the group before
// the previous one is done in both warpgroups. Copies run ST - 2 steps ahead.
// ACT: the BN weight rows are BN / 2 gate rows, then their up rows, so n8 block j of the
// accumulator (gate) and block j + BN / 16 (up) hold one output's two sums in the same lane.
#define MOE_WG_BK 64

// A wgmma tile's x copies (moe_gemm_wg, moe_gemm_wg8): the thread's chunk cc (8 k) of rows
// tid / 8 + RS i, their sources and whether each row is in the tile (the others zero-filled).
template <int N, int RS>
__device__ __forceinline__ void moe_x_sources(const u16* x, const int* perm, int r0, int rows,
                                              int k, int tid, int cc, const u16* (&src)[N],
                                              bool (&ok)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int r = (tid >> 3) + RS * i;
    ok[i] = r < rows;
    src[i] = moe_x_row(x, perm, r0, r, rows, k) + cc * 8;
  }
}

// The ring of ST k steps both wgmma GEMMs run, copies ST - 2 steps ahead: moe_ring_fill
// issues the first steps' copies; moe_ring_next, at the top of step kt, waits for its copies,
// meets the block (by then every warpgroup has waited for step kt - 2's MMAs: the stage they
// read is free) and refills that stage. load(stage, kt) issues a step's copies.
template <int ST, typename L>
__device__ __forceinline__ void moe_ring_fill(int ktiles, L& load) {
#pragma unroll
  for (int s = 0; s < ST - 2; ++s) {
    if (s < ktiles) load(s, s);
    cp_commit();                                // empty groups keep the count uniform
  }
}
template <int ST, typename L>
__device__ __forceinline__ void moe_ring_next(int kt, int ktiles, L& load) {
  cp_wait<ST - 3>();                            // step kt has landed (this thread's copies)
  fence_async_smem();                           // ... for the tensor cores' reads
  __syncthreads();                              // everyone's; step kt - 2's MMAs are done
  if (kt + ST - 2 < ktiles) load((kt + ST - 2) % ST, kt + ST - 2);
  cp_commit();
}

template <typename T, int BM, int BN, int ST, bool ACT>
__device__ __forceinline__ void moe_gemm_wg(const u16* __restrict__ x, const u16* __restrict__ w,
                                            const int* __restrict__ perm,
                                            const int* __restrict__ meta, int experts, int n,
                                            int k, u16* __restrict__ out) {
#ifdef SM90A
  constexpr int BK = MOE_WG_BK, NTH = 2 * BM;   // BM / 64 warpgroups
  constexpr int NB = BN / 8;                    // n8 blocks of the accumulator
  constexpr int A_BYTES = BM * BK * 2, STAGE = A_BYTES + BN * BK * 2;
  constexpr int RS = NTH / 8;                   // rows between a thread's copies
  constexpr int AL = BM / RS, BL = BN / RS;     // a thread's copies a step
  static_assert((BM == 64 || BM == 128) && (BN == 128 || BN == 256) && ST >= 3 && RS % 8 == 0,
                "moe_gemm_wg: whole warpgroups, a thread's rows one swizzle phase apart");
  extern __shared__ __align__(1024) u8 moe_wg[];
  const u32 base = (smem_u32(moe_wg) + 1023) & ~1023u;   // the swizzle needs 1024-aligned atoms
  if ((int)blockIdx.x >= meta[0]) return;       // uniform: a tile past the last
  const int* tile = moe_tile(meta, experts, blockIdx.x);
  const int e = tile[0], r0 = tile[1], rows = min(tile[2] - tile[1], BM);
  const int tid = threadIdx.x, wg = tid >> 7;
  const int o0 = blockIdx.y * (ACT ? BN / 2 : BN);
  const size_t wrows = ACT ? 2 * (size_t)n : (size_t)n;
  const u16* we = w + (size_t)e * wrows * k;

  // this thread's copies: chunk tid % 8 of rows tid / 8 + RS i, one swizzle phase for all
  const int cc = tid & 7, r8 = (tid >> 3) & 7;
  const u32 soff = (u32)(tid >> 3) * 128 + ((cc ^ r8) << 4);
  const u16* asrc[AL];
  bool aok[AL];
  moe_x_sources<AL, RS>(x, perm, r0, rows, k, tid, cc, asrc, aok);
  const u16* bsrc[BL];
#pragma unroll
  for (int i = 0; i < BL; ++i) {
    const int r = (tid >> 3) + RS * i;          // rows past N re-read the last (never stored)
    const size_t wr = ACT ? (r < BN / 2 ? 0 : (size_t)n) + min(o0 + r % (BN / 2), n - 1)
                          : (size_t)min(o0 + r, n - 1);
    bsrc[i] = we + wr * k + cc * 8;
  }
  auto load = [&](int stage, int kt) {
    const int kk = kt * BK;
    const bool kok = kk + cc * 8 < k;           // K is a multiple of 8: a chunk is all in or out
    const u32 a = base + stage * STAGE + soff, b = a + A_BYTES;
#pragma unroll
    for (int i = 0; i < AL; ++i) {
      const bool ok = kok && aok[i];
      cp_async16(a + RS * 128 * i, ok ? asrc[i] + kk : x, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < BL; ++i) cp_async16(b + RS * 128 * i, kok ? bsrc[i] + kk : w, kok ? 16 : 0);
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  const int ktiles = (k + BK - 1) / BK;
  moe_ring_fill<ST>(ktiles, load);
  for (int kt = 0; kt < ktiles; ++kt) {
    moe_ring_next<ST>(kt, ktiles, load);
    const u32 a = base + (kt % ST) * STAGE + wg * 64 * 128, b = base + (kt % ST) * STAGE + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {      // k16 steps 32 bytes apart inside the line
      const u64 da = smem_desc(a + ks * 32, 16, 1024), db = smem_desc(b + ks * 32, 16, 1024);
      if constexpr (BN == 256) wgmma_ss256<T>(acc, da, db, 1);
      else wgmma_ss128<T>(acc, da, db, 1);
    }
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
  reg_fence<BN / 2>(acc);
  cp_wait<0>();

  // accumulator q of n8 block j, lane (g, t) of warp wp: row 16 wp + g (+ 8 for q >= 2) of
  // the warpgroup's 64, column 8 j + 2 t + (q & 1)
  const int lane = tid & 31, g = lane >> 2, t = lane & 3, wp = (tid >> 5) & 3;
#pragma unroll
  for (int j = 0; j < (ACT ? NB / 2 : NB); ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wg * 64 + wp * 16 + g + 8 * h, o = o0 + j * 8 + 2 * t;
      if (r >= rows || o >= n) continue;
      float v[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        v[c] = acc[j * 4 + 2 * h + c];
        if constexpr (ACT) {   // rounded as the graph's MatMul output and activation.cu
          const float gate = rnd<T>(v[c]), up = rnd<T>(acc[(j + NB / 2) * 4 + 2 * h + c]);
          v[c] = rnd<T>(silu_f(gate)) * up;
        }
      }
      // o is even and N a multiple of 8 (launch_rules.moe_check): both outputs are in
      *reinterpret_cast<u32*>(out + (size_t)(r0 + r) * n + o) =
          (u32)T::from_f(v[0]) | ((u32)T::from_f(v[1]) << 16);
    }
  }
#endif
}

// ---- the same over block-wise FP8 experts: the weights dequantized into registers ------------
// moe_gemm_wg's tiles, grid and x stages (BM positions x BN weight rows), with the operands'
// roles swapped so that the E4M3 bytes never go back to shared memory as 16-bit values: A is
// the weights, each warpgroup's MB x 64 rows turned by its lanes into q * s in the dtype
// (dequant16_e4m3's arithmetic) right in the m16n8k16 A fragment registers of wgmma's register
// form; B is the BM x rows (N = BM), read by the tensor cores. Shapes (moe_wg8_threads): 64 x
// 128 on one warpgroup and 128 x 256 on two, MB = 2, as moe_gemm_wg's; and 256 x 128 on two,
// MB = 1, for experts of many rows: a converted weight feeds twice the positions, so half the
// lanes' conversion work for the same MMAs (launch_rules.moe_block_m).
// The k order is the natural one, so the products and their sums are the 16-bit kernel's on
// the dequantized weights (bench/kernels/moe.py measures the two equal, test_gpu_moe.py
// asserts it); a lane reads the 2 bytes of each of its A slot pairs from the step's bytes.
// A commit group a k16 step: a lane makes the next step's A in registers of its own, then
// waits for all but the newest group and so frees the set the group before that read; the
// conversion overlaps both groups in flight. By a k step's barrier every MMA of the step two
// before is done, and copies run ST - 2 steps ahead, as in moe_gemm_wg. (Three groups left in
// flight were no faster, and wrong: ptxas reused a step's last A registers, still in flight,
// at the top of the next step; test_wgmma_registers.py finds those writes.)
// ACT: a warp's 16 rows are 8 gate rows then their 8 up rows, so a lane's rows g and g + 8 are
// one output's two sums. The epilogue turns the tile around through shared memory (stmatrix
// .trans: a lane's pair is two positions of one output) and stores 16-byte pieces of out rows.
// On an H200 the FP8 layer runs at 0.85-1.04x the bf16 layer's speed at Qwen3-30B-A3B's
// shapes and 0.74-0.97x at Mixtral's from 256 tokens (bench/results/moe.md).
__host__ __device__ constexpr int moe_wg8_threads(int bm) { return bm == 64 ? 128 : 256; }

template <typename T, int BM, int BN, int ST, bool ACT>
__device__ __forceinline__ void moe_gemm_wg8(const u16* __restrict__ x, const u8* __restrict__ w,
                                             const int* __restrict__ perm,
                                             const int* __restrict__ meta, int experts, int n,
                                             int k, u16* __restrict__ out,
                                             const u16* __restrict__ bs, int gshift) {
#ifdef SM90A
  constexpr int BK = MOE_WG_BK, NTH = moe_wg8_threads(BM), MB = BN * 2 / NTH;  // NTH / 128 WGs
  constexpr int X_BYTES = BM * 128, STAGE = X_BYTES + BN * BK;
  constexpr int RX = NTH / 8, XC = BM / RX;    // x: rows between a thread's copies, copies
  constexpr int RW = NTH / 4, WC = BN / RW;    // weights: the same
  constexpr int OUT = ACT ? BN / 2 : BN;       // outputs a tile
  constexpr int CS = OUT * 2 + 16;             // epilogue row stride: 8 rows in 8 bank groups
  static_assert(((BM == 64 || BM == 128) && BN == 2 * BM || BM == 256 && BN == 128) &&
                    ST >= 3 && RX % 8 == 0,
                "moe_gemm_wg8: 64 x 128, 128 x 256 or 256 x 128 tiles");
  static_assert(BM * CS <= ST * STAGE, "moe_gemm_wg8: the epilogue's tile fits the ring");
  extern __shared__ __align__(1024) u8 moe_wg8[];
  const u32 base = (smem_u32(moe_wg8) + 1023) & ~1023u;   // 1024-aligned swizzle atoms
  if ((int)blockIdx.x >= meta[0]) return;      // uniform: a tile past the last
  const int* tile = moe_tile(meta, experts, blockIdx.x);
  const int e = tile[0], r0 = tile[1], rows = min(tile[2] - tile[1], BM);
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wp = (tid >> 5) & 3;
  const int o0 = blockIdx.y * OUT;
  const size_t wrows = ACT ? 2 * (size_t)n : (size_t)n;
  // staged weight row R's row of the expert; ACT: R's 16-row group R / 16 is outputs
  // 8 (R / 16) + 0..7, gate rows then up rows. Rows past N re-read the last (never stored).
  auto wrow = [&](int R) -> u32 {
    return ACT ? ((R >> 3) & 1 ? n : 0) + min(o0 + (R >> 4) * 8 + (R & 7), n - 1)
               : min(o0 + R, n - 1);
  };

  // Every address a k step uses is worked out here once and kept (keep_reg): left to itself
  // ptxas recomputed them from the thread index each k step, 607 instructions a warp a step
  // (the 16-bit kernel's: 179), and the MMAs waited behind them.
  // x: as moe_gemm_wg's, chunk tid % 8 of rows tid / 8 + RX i, one swizzle phase for all
  const int cc = tid & 7;
  u32 soff = (u32)(tid >> 3) * 128 + ((cc ^ ((tid >> 3) & 7)) << 4), xin = 0;
  const u16* xsrc[XC];
  bool xok[XC];
  moe_x_sources<XC, RX>(x, perm, r0, rows, k, tid, cc, xsrc, xok);
#pragma unroll
  for (int i = 0; i < XC; ++i) {
    xin |= (u32)xok[i] << i;
    keep_reg(xsrc[i]);
  }
  keep_reg(soff);
  keep_reg(xin);
  // weights: 16 bytes wc of rows tid / 4 + RW j, 64 bytes a row after x's; 16-byte chunk c of
  // row R at c ^ (R / 2 % 4), so that the 8 rows of a lane group's 2-byte reads (below) hit
  // distinct banks
  const int wc = tid & 3;
  const u8* wsrc[WC];
#pragma unroll
  for (int j = 0; j < WC; ++j) {
    wsrc[j] = w + ((size_t)e * wrows + wrow((tid >> 2) + RW * j)) * k + wc * 16;
    keep_reg(wsrc[j]);
  }
  u32 woff = X_BYTES + (tid >> 2) * BK + ((wc ^ ((tid >> 3) & 3)) << 4);
  u32 xk0 = cc * 8, wk0 = wc * 16;             // the first k of this thread's chunks
  keep_reg(woff);
  keep_reg(xk0);
  keep_reg(wk0);
  auto load = [&](int stage, int kt) {
    const int kk = kt * BK;
    const u32 sb = base + stage * STAGE;
    // past K (a multiple of G >= 32): zeros, both operands (8 and 16 k: all in or out)
    const bool xk = kk + (int)xk0 < k, wk = kk + (int)wk0 < k;
#pragma unroll
    for (int i = 0; i < XC; ++i) {
      const bool ok = xk && (xin >> i & 1);
      cp_async16(sb + soff + RX * 128 * i, ok ? xsrc[i] + kk : x, ok ? 16 : 0);
    }
#pragma unroll
    for (int j = 0; j < WC; ++j)
      cp_async16(sb + woff + RW * BK * j, wk ? wsrc[j] + kk : w, wk ? 16 : 0);
  };

  // this lane's A rows: weight block mb, row g + 8 h of warp wp's 16; their block scales for
  // each 32 k of a step (G >= 32: k16 steps 0, 1 and 2, 3 each lie in one block), a step
  // ahead (0 past K, where the bytes are zeros)
  auto arow = [&](int mb, int h) { return (wg * MB + mb) * 64 + wp * 16 + g + 8 * h; };
  const u16* ssrc[MB][2];                      // the rows' scales of the first block
  u32 sn[MB][2][2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ssrc[mb][h] = bs + (size_t)e * (size_t)(k >> gshift) * wrows + wrow(arow(mb, h));
      keep_reg(ssrc[mb][h]);
    }
  auto load_scales = [&](int kt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int kk = kt * BK + 32 * half;
      const u32 blk = (u32)(kk >> gshift) * (u32)wrows;   // uniform
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int h = 0; h < 2; ++h) sn[mb][h][half] = kk < k ? __ldg(ssrc[mb][h] + blk) : 0u;
    }
  };
  // this lane's first A byte (row arow(0, 0), k slot 2t) in a stage; k16 step s's 16-byte
  // chunk sits at s ^ ((g / 2) % 4), and the offset's bits 4-5 are that chunk's, so step s's
  // address is this one ^ (s << 4) (a stage is 1024-aligned)
  u32 aoff = X_BYTES + arow(0, 0) * BK + (((g >> 1) & 3) << 4) + 2 * t;
  keep_reg(aoff);

  float acc[MB][BM / 2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) acc[mb][i] = 0.f;
  // the A registers the MMAs in flight read, used (an empty asm) once their group is waited
  // for, so the compiler keeps them apart from the next step's A. ptxas does not see those
  // uses; test_wgmma_registers.py checks its SASS for writes to in-flight A registers.
  u32 held[2][MB][4];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int i = 0; i < 4; ++i) held[s][mb][i] = 0u;
  const int ktiles = (k + BK - 1) / BK;
  moe_ring_fill<ST>(ktiles, load);
  load_scales(0);
  for (int kt = 0; kt < ktiles; ++kt) {
    moe_ring_next<ST>(kt, ktiles, load);
    const u32 sb = base + (kt % ST) * STAGE, ab = sb + aoff;
    u32 s2[MB][2][2];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          s2[mb][h][half] = e4m3_scale2<T>((u16)sn[mb][h][half]);
    if (kt + 1 < ktiles) load_scales(kt + 1);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      // A's k slots 2t, 2t + 1 (a[0], a[1]) and 2t + 8, 2t + 9 (a[2], a[3]) of rows g, g + 8,
      // made in registers of their own while the two groups before are in flight
      u32 a[MB][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int h = i & 1;
          u32 q;
          asm volatile("ld.shared.u16 %0, [%1];\n" : "=r"(q)
                       : "r"((ab ^ (s << 4)) + mb * 64 * BK + h * 8 * BK + 8 * (i >> 1)));
          a[mb][i] = fma2<T>(e4m3_pair<T, 0x1404u>(q), s2[mb][h][s >> 1], Int4<T>::NEG0);
        }
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int i = 0; i < 4; ++i) keep_reg(a[mb][i]);   // made before the wait
      wgmma_wait<1>();                         // the group before the last is done with its A
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" :: "r"(held[s & 1][mb][i]));
      wgmma_fence();
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
        wgmma_rs<T, BM, 0>(acc[mb], a[mb], smem_desc(sb + s * 32, 16, 1024), 1);
      wgmma_commit();
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int i = 0; i < 4; ++i) held[s & 1][mb][i] = a[mb][i];
    }
  }
  wgmma_wait<0>();
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int i = 0; i < 4; ++i) asm volatile("" :: "r"(held[s][mb][i]));
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) reg_fence<BM / 2>(acc[mb]);
  cp_wait<0>();
  __syncthreads();                             // every warpgroup is done with the ring

  // accumulator q of n8 block j of weight block mb: weight row arow(mb, q >= 2), position
  // 8 j + 2 t + (q & 1). Four 8 x 8 matrices (8 weight rows x 8 positions) a stmatrix; the
  // row of matrix i, position c, has its address from lane 8 i + c.
  const int mi = lane >> 3, mc = lane & 7;
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int j = 0; j < BM / 8; j += ACT ? 4 : 2) {
      u32 r[4];
      u32 addr;
      if constexpr (ACT) {   // rounded as the graph's MatMul output and activation.cu
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float v2[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float gate = rnd<T>(acc[mb][(j + i) * 4 + c]);
            const float up = rnd<T>(acc[mb][(j + i) * 4 + 2 + c]);
            v2[c] = rnd<T>(silu_f(gate)) * up;
          }
          r[i] = (u32)T::from_f(v2[0]) | ((u32)T::from_f(v2[1]) << 16);
        }
        addr = base + (8 * (j + mi) + mc) * CS + ((wg * MB + mb) * 4 + wp) * 16;
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float* q = &acc[mb][(j + i / 2) * 4 + 2 * (i & 1)];
          r[i] = (u32)T::from_f(q[0]) | ((u32)T::from_f(q[1]) << 16);
        }
        addr = base + (8 * (j + mi / 2) + mc) * CS + (arow(mb, mi & 1) - g) * 2;
      }
      stsm_x4_trans(addr, r);
    }
  }
  __syncthreads();
  const u8* staged = moe_wg8 + (base - smem_u32(moe_wg8));   // the tile, by position
  for (int i = tid; i < BM * (OUT / 8); i += NTH) {
    const int row = i / (OUT / 8), q = i % (OUT / 8), o = o0 + 8 * q;
    // N is a multiple of 8 (launch_rules.moe_check): a piece is all in or out
    if (row < rows && o < n)
      *reinterpret_cast<uint4*>(out + (size_t)(r0 + row) * n + o) =
          *reinterpret_cast<const uint4*>(staged + row * CS + q * 16);
  }
#endif
}

// ---- combine ----------------------------------------------------------------------------------
// out[t] = sum over j of wts[t, j] * y[pos_of[t, j]] in fp32, in j order (ascending experts),
// each product and sum rounded as the graph's fp32 Mul and ReduceSum (no FMA), then rounded
// to the dtype. SHARED (Qwen2-MoE): out = that + sigmoid(gate[t]) * shared[t], each op
// rounded to the dtype as the graph's Sigmoid, Mul and Add are. A CTA a token.
template <typename T, int VEC, bool SHARED>
__device__ __forceinline__ void moe_combine(const u16* __restrict__ y,
                                            const int* __restrict__ pos_of,
                                            const float* __restrict__ wts,
                                            const u16* __restrict__ gate,
                                            const u16* __restrict__ shared, int tokens,
                                            int hidden, int top_k, u16* __restrict__ out) {
  __shared__ int pos[MOE_MAX_TOPK];
  __shared__ float wt[MOE_MAX_TOPK];
  const int tk = blockIdx.x;
  if (tk >= tokens) return;
  if (threadIdx.x < top_k) {
    pos[threadIdx.x] = pos_of[(size_t)tk * top_k + threadIdx.x];
    wt[threadIdx.x] = wts[(size_t)tk * top_k + threadIdx.x];
  }
  __syncthreads();
  const float share = SHARED ? rnd<T>(1.f / (1.f + expf(-T::to_f(gate[tk])))) : 0.f;
  for (int c = threadIdx.x * VEC; c < hidden; c += blockDim.x * VEC) {
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    for (int j = 0; j < top_k; ++j) {
      float yv[VEC];
      load_vec<T, VEC>(y + (size_t)pos[j] * hidden + c, yv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = __fadd_rn(acc[v], __fmul_rn(wt[j], yv[v]));
    }
    if constexpr (SHARED) {
      float sh[VEC];
      load_vec<T, VEC>(shared + (size_t)tk * hidden + c, sh);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = rnd<T>(acc[v]) + rnd<T>(share * sh[v]);
    }
    store_vec<T, VEC>(out + (size_t)tk * hidden + c, acc);
  }
}

