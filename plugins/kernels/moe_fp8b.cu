// The mixture-of-experts GEMMs over block-wise FP8 experts (--quant fp8-block; moe.cuh:
// FP8B), in a module of their own, compiled only for the engines that have them. Routing
// and the combine are moe.cu's.
//
//   moe_gemm_fp8b_<dt>_m<BM>[w][_swiglu](x, w, perm-or-null, meta, E, n, K, out, scale, gshift)
//
// w [E, N, K] E4M3 bytes (each expert's [out, in]), scale [E, K / G, N] in the compute dtype,
// G = 1 << gshift a power of two from 32 dividing K. The shapes are moe.cu's (launch_rules:
// moe_gemm_launch): m8 the decode kernel, m64 and m128 the tiled one, and on sm_90a its wgmma
// form (w, launch_rules.MOE_WG8_SHAPES: moe.cuh's moe_gemm_wg8, the weights as wgmma's A), which
// also has m256 for layers whose two GEMMs are both FP8.
#include "moe.cuh"

#define MOE_FP8B_ENTRY(NAME, TY, THREADS, CALL)                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                  \
      const u16* x, const u8* w, const int* perm, const int* meta, int experts, int n, int k, \
      u16* out, const u16* scale, int gshift) {                                                \
    CALL(x, w, perm, meta, experts, n, k, out, scale, gshift);                                 \
  }
#define MOE_FP8B_GEMM(DT, TY, BM, NT, WN, SK, U)                                               \
  MOE_FP8B_ENTRY(moe_gemm_fp8b_##DT##_m##BM, TY, 32 * WN * SK,                                \
                 (moe_gemm<TY, NT, WN, SK, U, false, true>))                                   \
  MOE_FP8B_ENTRY(moe_gemm_fp8b_##DT##_m##BM##_swiglu, TY, 32 * WN * SK,                       \
                 (moe_gemm<TY, NT, WN, SK, U, true, true>))
#define MOE_FP8B_GEMM_TC(DT, TY, BM)                                                           \
  MOE_FP8B_ENTRY(moe_gemm_fp8b_##DT##_m##BM, TY, 128, (moe_gemm_tc<TY, BM, 2, 2, 4, false, true>)) \
  MOE_FP8B_ENTRY(moe_gemm_fp8b_##DT##_m##BM##_swiglu, TY, 128,                                 \
                 (moe_gemm_tc<TY, BM, 2, 2, 4, true, true>))

#ifdef SM90A
#define MOE_FP8B_GEMM_WG(DT, TY, BM, BN, ST)                                                   \
  MOE_FP8B_ENTRY(moe_gemm_fp8b_##DT##_m##BM##w, TY, moe_wg8_threads(BM),                       \
                 (moe_gemm_wg8<TY, BM, BN, ST, false>))                                        \
  MOE_FP8B_ENTRY(moe_gemm_fp8b_##DT##_m##BM##w_swiglu, TY, moe_wg8_threads(BM),                \
                 (moe_gemm_wg8<TY, BM, BN, ST, true>))
#else
#define MOE_FP8B_GEMM_WG(DT, TY, BM, BN, ST)
#endif

#define MOE_FP8B_DTYPE(DT, TY)                                                                 \
  MOE_FP8B_GEMM(DT, TY, 8, 1, 1, 8, 2)                                                         \
  MOE_FP8B_GEMM_TC(DT, TY, 64)                                                                 \
  MOE_FP8B_GEMM_TC(DT, TY, 128)                                                                \
  MOE_FP8B_GEMM_WG(DT, TY, 64, 128, 4)                                                         \
  MOE_FP8B_GEMM_WG(DT, TY, 128, 256, 4)                                                        \
  MOE_FP8B_GEMM_WG(DT, TY, 256, 128, 4)

LLMC_F16(MOE_FP8B_DTYPE(f16, F16))
LLMC_BF16(MOE_FP8B_DTYPE(bf16, BF16))
