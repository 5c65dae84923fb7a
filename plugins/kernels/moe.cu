// The mixture-of-experts layer's entry points over 16-bit expert weights (moe.cuh has the
// kernels; moe_fp8b.cu the E4M3 experts').
#include "moe.cuh"

// ---- entry points ---------------------------------------------------------------------------
// moe_route_<dt>(logits, T, E, k, renorm, bm, ids, wts, pos_of, perm, meta, picked)
// moe_topk_<dt>(logits, T, E, k, renorm, ids, wts)
// moe_gemm_<dt>_m<BM>[w][_swiglu](x, w, perm-or-null, meta, E, n, K, out), BM 8, 64 or 128
//   (w: the wgmma kernel of sm_90a, BM 64 or 128)
// moe_combine[_shared]_<dt>_v<VEC>(y, pos_of, wts, gate-or-null, shared-or-null, T, H, k, out)
// moe_count(ids, T, E, k, meta), moe_place(ids, T, E, k, pos_of, perm, meta): the grouping of
//   steps of many rows over a grid (moe.cuh), around moe_route with picked = 2
// The GEMM shapes (launch_rules.moe_block_m picks by T, E and k): m8, a tile of up to 8
// positions (decode, where an expert has at most T rows, and steps whose experts hold at
// most 4 rows on average) with 8 warps over K, as tc_gemv splits K, so the few weight rows
// a CTA has still keep enough loads in flight; m64 and m128, the tiled
// moe_gemm_tc over tiles of 64 or 128 positions, 2 x 2 warps, 4 k steps in flight: 4 x
// (BM + 128) x 32 halfs of dynamic shared memory (launch_rules.moe_gemm_smem).
#define MOE_GEMM_ENTRY(NAME, TY, NT, WN, SK, U, ACT)                                           \
  extern "C" __global__ void __launch_bounds__(32 * WN * SK) NAME(                             \
      const u16* x, const u16* w, const int* perm, const int* meta, int experts, int n,       \
      int k, u16* out) {                                                                       \
    moe_gemm<TY, NT, WN, SK, U, ACT>(x, w, perm, meta, experts, n, k, out);                   \
  }
#define MOE_GEMM(DT, TY, BM, NT, WN, SK, U)                                                    \
  MOE_GEMM_ENTRY(moe_gemm_##DT##_m##BM, TY, NT, WN, SK, U, false)                              \
  MOE_GEMM_ENTRY(moe_gemm_##DT##_m##BM##_swiglu, TY, NT, WN, SK, U, true)

#define MOE_GEMM_TC_ENTRY(NAME, TY, BM, WM, WN, ST, ACT)                                      \
  extern "C" __global__ void __launch_bounds__(32 * WM * WN) NAME(                             \
      const u16* x, const u16* w, const int* perm, const int* meta, int experts, int n,       \
      int k, u16* out) {                                                                       \
    moe_gemm_tc<TY, BM, WM, WN, ST, ACT>(x, w, perm, meta, experts, n, k, out);               \
  }
// launch_rules.MOE_TC_SHAPE: 2 x 2 warps, 4 k steps in flight
#define MOE_GEMM_TC(DT, TY, BM)                                                                \
  MOE_GEMM_TC_ENTRY(moe_gemm_##DT##_m##BM, TY, BM, 2, 2, 4, false)                             \
  MOE_GEMM_TC_ENTRY(moe_gemm_##DT##_m##BM##_swiglu, TY, BM, 2, 2, 4, true)

#define MOE_GEMM_WG_ENTRY(NAME, TY, BM, BN, ST, ACT)                                          \
  extern "C" __global__ void __launch_bounds__(2 * BM) NAME(                                   \
      const u16* x, const u16* w, const int* perm, const int* meta, int experts, int n,       \
      int k, u16* out) {                                                                       \
    moe_gemm_wg<TY, BM, BN, ST, ACT>(x, w, perm, meta, experts, n, k, out);                   \
  }
// sm_90a: the tiled GEMM on wgmma, moe_gemm_<dt>_m<BM>w (launch_rules.MOE_WG_SHAPES)
#ifdef SM90A
#define MOE_GEMM_WG(DT, TY, BM, BN, ST)                                                        \
  MOE_GEMM_WG_ENTRY(moe_gemm_##DT##_m##BM##w, TY, BM, BN, ST, false)                           \
  MOE_GEMM_WG_ENTRY(moe_gemm_##DT##_m##BM##w_swiglu, TY, BM, BN, ST, true)
#else
#define MOE_GEMM_WG(DT, TY, BM, BN, ST)
#endif

#define MOE_COMBINE(DT, TY, VEC)                                                               \
  extern "C" __global__ void moe_combine_##DT##_v##VEC(                                        \
      const u16* y, const int* pos_of, const float* wts, const u16* gate, const u16* shared,  \
      int tokens, int hidden, int top_k, u16* out) {                                           \
    moe_combine<TY, VEC, false>(y, pos_of, wts, gate, shared, tokens, hidden, top_k, out);    \
  }                                                                                            \
  extern "C" __global__ void moe_combine_shared_##DT##_v##VEC(                                 \
      const u16* y, const int* pos_of, const float* wts, const u16* gate, const u16* shared,  \
      int tokens, int hidden, int top_k, u16* out) {                                           \
    moe_combine<TY, VEC, true>(y, pos_of, wts, gate, shared, tokens, hidden, top_k, out);     \
  }

#define MOE_DTYPE(DT, TY)                                                                      \
  extern "C" __global__ void __launch_bounds__(MOE_ROUTE_THREADS) moe_route_##DT(              \
      const u16* logits, int tokens, int experts, int top_k, int renorm, int bm, int* ids,    \
      float* wts, int* pos_of, int* perm, int* meta, int picked) {                             \
    moe_route<TY>(logits, tokens, experts, top_k, renorm, bm, ids, wts, pos_of, perm, meta,   \
                  picked);                                                                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(MOE_TOPK_THREADS) moe_topk_##DT(                \
      const u16* logits, int tokens, int experts, int top_k, int renorm, int* ids,            \
      float* wts) {                                                                            \
    moe_topk<TY>(logits, tokens, experts, top_k, renorm, ids, wts);                           \
  }                                                                                            \
  MOE_GEMM(DT, TY, 8, 1, 1, 8, 2)                                                              \
  MOE_GEMM_TC(DT, TY, 64)                                                                      \
  MOE_GEMM_TC(DT, TY, 128)                                                                     \
  MOE_GEMM_WG(DT, TY, 64, 128, 4)                                                              \
  MOE_GEMM_WG(DT, TY, 128, 256, 4)                                                             \
  MOE_COMBINE(DT, TY, 8)                                                                       \
  MOE_COMBINE(DT, TY, 1)

#ifndef MOE_VARIANTS  // bench/kernels/moe.py --sweep compiles its own grid of GEMM shapes
LLMC_F16(MOE_DTYPE(f16, F16))
LLMC_BF16(MOE_DTYPE(bf16, BF16))

// the grouping over a grid (either dtype: ids only), a CTA a chunk of MOE_ROUTE_THREADS rows
extern "C" __global__ void __launch_bounds__(MOE_ROUTE_THREADS) moe_count(
    const int* ids, int tokens, int experts, int top_k, int* meta) {
  moe_count_chunk(ids, tokens, experts, top_k, meta);
}
extern "C" __global__ void __launch_bounds__(MOE_ROUTE_THREADS) moe_place(
    const int* ids, int tokens, int experts, int top_k, int* pos_of, int* perm, int* meta) {
  moe_place_chunk(ids, tokens, experts, top_k, pos_of, perm, meta);
}
#endif
