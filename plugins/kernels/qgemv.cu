// Quantized GEMMs of the cuda backend (quantization/qdq.py says what the graph computes):
//
//   int4 weight-only   y = (x [* pre]) @ dequant(w)^T,  dequant(w)[n, k] = q[n, k] * s[n, k / G]
//   fp8 W8A8           y = (e4m3(x / sx) @ w_e4m3^T) * sw'[n],  sw' = sx * sw (the build's)
//
// Decode steps (1-16 rows of x) run the skinny GEMMs below on tensor cores, straight from the
// packed weights: the weight bytes are what a decode step streams, so fewer of them is the
// whole point. Larger steps run cuBLASLt: INT4 on a dequantized copy of the weight
// (dequant_int4), FP8 as an FP8 GEMM on x quantized by quantize_fp8.
//
// Both skinny kernels keep tc_gemv's shape (gemv.cu): a CTA is SK warps over the same 16
// weight rows, warp i taking K chunks i, i + SK, ...; the SK partial tiles meet in shared
// memory (tc_store). A lane's 16-byte load of a row is its A fragment as loaded, because the
// order of a dot product's K terms is free: x is loaded in the same order.
#include "common.cuh"

typedef unsigned char u8;

// ---- INT4 ------------------------------------------------------------------------------------
// Engine layout (lower.py: pack_int4): w [N, K / 2] bytes, each 32-bit word holding 8
// consecutive k as unsigned nibbles q + 8 in the order k0 k2 k4 k6 k1 k3 k5 k7 (low nibble
// first), so that (word >> 4e) & 0x000f000f is the pair k2e, k2e+1 in the two 16-bit halves.
// OR'ed into the exponent of 128 (bf16) or 1024 (fp16), whose ulp is 1, a nibble becomes the
// 16-bit float 128 + u; subtracting 136 (1032) gives q exactly, and one multiply by the
// group's scale gives q * s rounded once, as DequantizeLinear rounds it.
template <typename T>
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
  u32 d;
  if constexpr (T::is_bf16) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  else asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename T>
struct Int4 {
  static constexpr u32 MAGIC = T::is_bf16 ? 0x43004300u : 0x64006400u;  // 128 | 1024
  static constexpr u32 BIAS = T::is_bf16 ? 0xC308C308u : 0xE408E408u;   // -136 | -1032
  static constexpr u32 ONE = T::is_bf16 ? 0x3F803F80u : 0x3C003C00u;
  static constexpr u32 NEG0 = 0x80008000u;                              // q * s + -0 = q * s
};

// One word (8 k) -> 4 pairs of 16-bit weights, scaled by s2 (the scale in both halves).
template <typename T>
__device__ __forceinline__ void dequant8(u32 w, u32 s2, u32* out) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const u32 v = ((w >> (4 * e)) & 0x000F000Fu) | Int4<T>::MAGIC;
    out[e] = fma2<T>(fma2<T>(v, Int4<T>::ONE, Int4<T>::BIAS), s2, Int4<T>::NEG0);
  }
}

// One word -> 4 pairs of 128 + u (1024 + u): the codes as 16-bit floats, offset by 136 (1032).
template <typename T>
__device__ __forceinline__ void offset8(u32 w, u32* out) {
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = ((w >> (4 * e)) & 0x000F000Fu) | Int4<T>::MAGIC;
}

// 16 bytes = 32 k of one row -> 16 pairs, in k order.
template <typename T>
__device__ __forceinline__ void dequant32(const uint4& v, u16 s, u32* out) {
  const u32 s2 = (u32)s | ((u32)s << 16);
  dequant8<T>(v.x, s2, out);
  dequant8<T>(v.y, s2, out + 4);
  dequant8<T>(v.z, s2, out + 8);
  dequant8<T>(v.w, s2, out + 12);
}

// A chunk is 128 k: lane t of a quad takes k [32t, 32t + 32) (16 bytes) of rows g and g + 8,
// and x's same 32 k; its eight k16 steps read pairs 2s, 2s + 1 (k 4s .. 4s + 3) of each. A
// scale group (G = 32, 64 or 128) holds a lane's 32 k whole, so a load needs one scale a row.
// pre: AWQ's 1 / s per k (x * pre rounded to T, as the graph's Mul rounds it), or null.
//
// CS (chunk scales: the group a multiple of 128, as Llama's K = 4096 / 14336 take): a chunk
// of a row has one scale, so the MMA takes the codes as they come out of the OR, 128 + u
// (1024 + u), and the chunk's sums are corrected and scaled once, in fp32:
//     sum_k q_k s x_k = s (sum_k (q_k + 136) x_k - 136 sum_k x_k)
// with sum_k x_k from one more MMA against a tile of ones. Two ALU ops a weight pair fewer
// than scaling each pair, which is what bounds this kernel (it is issue-bound, not HBM-bound,
// at two weights a byte).
template <typename T, int NT, int SK, int U, int ACT, bool CS, int RT>
__device__ __forceinline__ void w4_gemv(const u16* __restrict__ x, const u8* __restrict__ w,
                                        const u16* __restrict__ scale,
                                        const u16* __restrict__ pre,
                                        const void* __restrict__ bias, int m, int n, int k,
                                        int gshift, void* __restrict__ y) {
  __shared__ float part[SK][NT][4][32];
  constexpr int TILE = ACT ? 8 : 16;  // outputs a 16-row tile gives
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int o0 = blockIdx.x * TILE * RT;
  const int groups = k >> gshift;
  const u8* wp[RT][2];
  const u16* sp[RT][2];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int ra = min(o0 + r * TILE + g, n - 1);  // rows past the end re-read the last
    const int rb = ACT ? n + ra : min(o0 + r * TILE + g + 8, n - 1);
    wp[r][0] = w + (size_t)ra * (k / 2) + 16 * t;
    wp[r][1] = w + (size_t)rb * (k / 2) + 16 * t;
    sp[r][0] = scale + (size_t)ra * groups;
    sp[r][1] = scale + (size_t)rb * groups;
  }
  const int chunks = (k + 127) / 128;
  float acc[RT][NT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[r][j][0] = acc[r][j][1] = acc[r][j][2] = acc[r][j][3] = 0.f;
  uint4 cur[U][RT][2], nxt[U][RT][2];
  u16 cs[U][RT][2], ns[U][RT][2];
  auto load_w = [&](uint4 (*v)[RT][2], u16 (*sc)[RT][2], int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = (c + u * SK) * 128 + 32 * t;
      const bool ok = kk < k;
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          v[u][r][h] = ok ? ld_stream(wp[r][h] + (c + u * SK) * 64) : make_uint4(0, 0, 0, 0);
          sc[u][r][h] = ok ? __ldg(sp[r][h] + (kk >> gshift)) : (u16)0;
        }
    }
  };
  load_w(cur, cs, warp);
  load_w(nxt, ns, warp + SK * U);
  pdl_trigger();
  pdl_wait();
  for (int c = warp; c < chunks; c += SK * U) {
    if (c != warp) {
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
          for (int h = 0; h < 2; ++h) { cur[u][r][h] = nxt[u][r][h]; cs[u][r][h] = ns[u][r][h]; }
      load_w(nxt, ns, c + SK * U);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = (c + u * SK) * 128 + 32 * t;
      // x's 32 k for this lane, one set a tile of 8 x rows, shared by the RT row tiles
      u32 X[NT][16];
      float xs[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int xr = j * 8 + g;
        const bool live = xr < m && kk < k;
        const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)xr * k + kk);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint4 xv = live ? __ldg(xp + i) : make_uint4(0, 0, 0, 0);
          X[j][4 * i] = xv.x; X[j][4 * i + 1] = xv.y; X[j][4 * i + 2] = xv.z;
          X[j][4 * i + 3] = xv.w;
        }
        if (pre && kk < k) {
          const uint4* pp = reinterpret_cast<const uint4*>(pre + kk);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint4 pv = __ldg(pp + i);
            X[j][4 * i] = fma2<T>(X[j][4 * i], pv.x, Int4<T>::NEG0);
            X[j][4 * i + 1] = fma2<T>(X[j][4 * i + 1], pv.y, Int4<T>::NEG0);
            X[j][4 * i + 2] = fma2<T>(X[j][4 * i + 2], pv.z, Int4<T>::NEG0);
            X[j][4 * i + 3] = fma2<T>(X[j][4 * i + 3], pv.w, Int4<T>::NEG0);
          }
        }
        if constexpr (CS) {
          constexpr u32 ONE = Int4<T>::ONE;
          xs[j][0] = xs[j][1] = xs[j][2] = xs[j][3] = 0.f;
#pragma unroll
          for (int s = 0; s < 8; ++s)
            mma_16816<T>(xs[j], ONE, ONE, ONE, ONE, X[j][2 * s], X[j][2 * s + 1]);
        }
      }
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        u32 A[16], B[16];
        if constexpr (CS) {
          offset8<T>(cur[u][r][0].x, A); offset8<T>(cur[u][r][0].y, A + 4);
          offset8<T>(cur[u][r][0].z, A + 8); offset8<T>(cur[u][r][0].w, A + 12);
          offset8<T>(cur[u][r][1].x, B); offset8<T>(cur[u][r][1].y, B + 4);
          offset8<T>(cur[u][r][1].z, B + 8); offset8<T>(cur[u][r][1].w, B + 12);
        } else {
          dequant32<T>(cur[u][r][0], cs[u][r][0], A);
          dequant32<T>(cur[u][r][1], cs[u][r][1], B);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if constexpr (CS) {
            float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int s = 0; s < 8; ++s)
              mma_16816<T>(sum, A[2 * s], B[2 * s], A[2 * s + 1], B[2 * s + 1], X[j][2 * s],
                           X[j][2 * s + 1]);
            constexpr float OFF = T::is_bf16 ? 136.f : 1032.f;
            const float fa = T::to_f(cs[u][r][0]), fb = T::to_f(cs[u][r][1]);
            acc[r][j][0] += fa * (sum[0] - OFF * xs[j][0]);
            acc[r][j][1] += fa * (sum[1] - OFF * xs[j][1]);
            acc[r][j][2] += fb * (sum[2] - OFF * xs[j][2]);
            acc[r][j][3] += fb * (sum[3] - OFF * xs[j][3]);
          } else {
#pragma unroll
            for (int s = 0; s < 8; ++s)
              mma_16816<T>(acc[r][j], A[2 * s], B[2 * s], A[2 * s + 1], B[2 * s + 1],
                           X[j][2 * s], X[j][2 * s + 1]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    if (r) __syncthreads();  // the previous tile's sums are read out of `part`
    tc_store<T, NT, SK, ACT, false>(part, acc[r], o0 + r * TILE, m, n, bias, y, 1.f, nullptr);
  }
}

// Prefill: the INT4 weight back to T [N, K] for cuBLASLt, with AWQ's pre folded into it
// (w[n, k] * pre[k], one more rounding than the graph's x * pre: within an ulp of T). One
// thread a 16-byte load (32 k).
template <typename T>
__device__ __forceinline__ void dequant_int4(const u8* __restrict__ w,
                                             const u16* __restrict__ scale,
                                             const u16* __restrict__ pre, int n, int k,
                                             int gshift, u16* __restrict__ out) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // 32-k piece
  const int per_row = k / 32;
  if (i >= (long long)n * per_row) return;
  const int row = (int)(i / per_row), k0 = (int)(i % per_row) * 32;
  const uint4 v = ld_stream(w + (size_t)row * (k / 2) + k0 / 2);
  u32 A[16];
  dequant32<T>(v, scale[(size_t)row * (k >> gshift) + (k0 >> gshift)], A);
  if (pre) {
    const uint4* pp = reinterpret_cast<const uint4*>(pre + k0);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 pv = pp[q];
      A[4 * q] = fma2<T>(A[4 * q], pv.x, Int4<T>::NEG0);
      A[4 * q + 1] = fma2<T>(A[4 * q + 1], pv.y, Int4<T>::NEG0);
      A[4 * q + 2] = fma2<T>(A[4 * q + 2], pv.z, Int4<T>::NEG0);
      A[4 * q + 3] = fma2<T>(A[4 * q + 3], pv.w, Int4<T>::NEG0);
    }
  }
  uint4* dst = reinterpret_cast<uint4*>(out + (size_t)row * k + k0);
#pragma unroll
  for (int q = 0; q < 4; ++q) dst[q] = make_uint4(A[4 * q], A[4 * q + 1], A[4 * q + 2], A[4 * q + 3]);
}

// ---- FP8 (E4M3) W8A8, sm_89+ -----------------------------------------------------------------
// Engine layout: w [N, K] e4m3 bytes, sw [N] fp32 with x's scale sx multiplied in.
// mma.m16n8k32 takes 4 bytes a register
// (a0 = row g, k 4t..4t+3; a2 = k 4t+16..4t+19; b0, b1 the same k of x row g): a lane's
// 16-byte load of 16 k of a row feeds two k32 steps. A chunk is 64 k. x is quantized as it
// is loaded (x * (1 / sx), round to nearest, saturating at 448, as QuantizeLinear does): the
// graph's Q/DQ pair, at no extra launch.
__device__ __forceinline__ void mma_e4m3(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                         u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 values of x (two 16-byte loads) -> 4 words of e4m3.
template <typename T>
__device__ __forceinline__ void quantize16(const u16* p, bool live, float inv, u32* out) {
  float f[16];
  if (live) {
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(p)), f);
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(p) + 1), f + 8);
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
    out[i] = e4m3x4(f[4 * i] * inv, f[4 * i + 1] * inv, f[4 * i + 2] * inv, f[4 * i + 3] * inv);
}

template <typename T, int NT, int SK, int U, int ACT, bool F32>
__device__ __forceinline__ void w8_gemv(const u16* __restrict__ x, const u8* __restrict__ w,
                                        const float* __restrict__ sw, float sx,
                                        const void* __restrict__ bias, int m, int n, int k,
                                        void* __restrict__ y) {
#if __CUDA_ARCH__ >= 890
  __shared__ float part[SK][NT][4][32];
  constexpr int OUT = ACT ? 8 : 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int o0 = blockIdx.x * OUT;
  const int ra = min(o0 + g, n - 1);
  const int rb = ACT ? n + ra : min(o0 + g + 8, n - 1);
  const u8* wa = w + (size_t)ra * k + 16 * t;
  const u8* wb = w + (size_t)rb * k + 16 * t;
  const float inv = 1.f / sx;
  const int chunks = (k + 63) / 64;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  uint4 va[U], vb[U], na[U], nb[U];
  auto load_w = [&](uint4* a, uint4* b, int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = (c + u * SK) * 64;
      const bool ok = kk + 16 * t < k;
      a[u] = ok ? ld_stream(wa + kk) : make_uint4(0, 0, 0, 0);
      b[u] = ok ? ld_stream(wb + kk) : make_uint4(0, 0, 0, 0);
    }
  };
  load_w(va, vb, warp);
  load_w(na, nb, warp + SK * U);
  pdl_trigger();
  pdl_wait();
  for (int c = warp; c < chunks; c += SK * U) {
    if (c != warp) {
#pragma unroll
      for (int u = 0; u < U; ++u) { va[u] = na[u]; vb[u] = nb[u]; }
      load_w(na, nb, c + SK * U);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = (c + u * SK) * 64 + 16 * t;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int xr = j * 8 + g;
        u32 X[4];
        quantize16<T>(x + (size_t)xr * k + kk, xr < m && kk < k, inv, X);
        mma_e4m3(acc[j], va[u].x, vb[u].x, va[u].y, vb[u].y, X[0], X[1]);
        mma_e4m3(acc[j], va[u].z, vb[u].z, va[u].w, vb[u].w, X[2], X[3]);
      }
    }
  }
  tc_store<T, NT, SK, ACT, F32>(part, acc, o0, m, n, bias, y, 1.f, sw);
#else
  __trap();  // lower.py builds FP8 engines for sm_89+ only
#endif
}

// Prefill: x [rows, K] -> e4m3 for cuBLASLt's FP8 GEMM; 8 values a thread.
template <typename T>
__device__ __forceinline__ void quantize_fp8(const u16* __restrict__ x, float sx, int count,
                                             u8* __restrict__ out) {
#if __CUDA_ARCH__ >= 890
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (i >= count) return;
  float f[8];
  unpack8<T>(*reinterpret_cast<const uint4*>(x + i), f);
  const float inv = 1.f / sx;
  *reinterpret_cast<uint2*>(out + i) =
      make_uint2(e4m3x4(f[0] * inv, f[1] * inv, f[2] * inv, f[3] * inv),
                 e4m3x4(f[4] * inv, f[5] * inv, f[6] * inv, f[7] * inv));
#else
  __trap();
#endif
}

// ---- entry points ------------------------------------------------------------------------------
// w4_<dtype>_m<M>[_cs][_swiglu|_geglu] and w8_<dtype>_<out>_m<M>[_...]: M = 8 (NT = 1) or 16
// (NT = 2); _cs: chunk scales (the group a multiple of 128).
#define W4_ENTRY(NAME, TY, NT, SK, U, ACT, CS, RT)                                             \
  extern "C" __global__ void __launch_bounds__(32 * SK)                                        \
  NAME(const u16* x, const u8* w, const u16* scale, const u16* pre, const void* bias, int m,   \
       int n, int k, int gshift, void* y) {                                                    \
    w4_gemv<TY, NT, SK, U, ACT, CS, RT>(x, w, scale, pre, bias, m, n, k, gshift, y);           \
  }
#define W8_ENTRY(NAME, TY, NT, SK, U, ACT, F32)                                                \
  extern "C" __global__ void __launch_bounds__(32 * SK)                                        \
  NAME(const u16* x, const u8* w, const float* sw, int sx, const void* bias, int m, int n,     \
       int k, void* y) {                                                                       \
    w8_gemv<TY, NT, SK, U, ACT, F32>(x, w, sw, __int_as_float(sx), bias, m, n, k, y);          \
  }
#define QGEMV_M(DT, TY, M, NT, SK4, U4, RT, SK8, U8)                                           \
  W4_ENTRY(w4_##DT##_m##M, TY, NT, SK4, U4, 0, false, RT)                                      \
  W4_ENTRY(w4_##DT##_m##M##_swiglu, TY, NT, SK4, U4, 1, false, RT)                             \
  W4_ENTRY(w4_##DT##_m##M##_geglu, TY, NT, SK4, U4, 2, false, RT)                              \
  W4_ENTRY(w4_##DT##_m##M##_cs, TY, NT, SK4, U4, 0, true, RT)                                  \
  W4_ENTRY(w4_##DT##_m##M##_cs_swiglu, TY, NT, SK4, U4, 1, true, RT)                           \
  W4_ENTRY(w4_##DT##_m##M##_cs_geglu, TY, NT, SK4, U4, 2, true, RT)                            \
  W8_ENTRY(w8_##DT##_##DT##_m##M, TY, NT, SK8, U8, 0, false)                                    \
  W8_ENTRY(w8_##DT##_f32_m##M, TY, NT, SK8, U8, 0, true)                                       \
  W8_ENTRY(w8_##DT##_##DT##_m##M##_swiglu, TY, NT, SK8, U8, 1, false)                           \
  W8_ENTRY(w8_##DT##_##DT##_m##M##_geglu, TY, NT, SK8, U8, 2, false)

#define QGEMV_DTYPE(DT, TY)                                                                    \
  extern "C" __global__ void dequant_int4_##DT(const u8* w, const u16* scale, const u16* pre,   \
                                               int n, int k, int gshift, u16* out) {           \
    dequant_int4<TY>(w, scale, pre, n, k, gshift, out);                                        \
  }                                                                                            \
  extern "C" __global__ void quantize_fp8_##DT(const u16* x, int sx, int count, u8* out) {      \
    quantize_fp8<TY>(x, __int_as_float(sx), count, out);                                       \
  }                                                                                            \
  QGEMV_M(DT, TY, 8, 1, QGEMV4_SK8, QGEMV4_U8, QGEMV4_RT8, 16, 1)                              \
  QGEMV_M(DT, TY, 16, 2, QGEMV4_SK16, QGEMV4_U16, QGEMV4_RT16, 16, 1)

// (warps splitting K, chunks ahead) from the sweep of bench/kernels/qgemv.py on the H100
// (bench/results/qgemv.md): INT4 takes 8 warps, 2 chunks ahead, for up to 8 x rows (16 and
// 1 for 16 rows); FP8 16 and 1. launch_rules.QGEMV_WARPS must agree.
#ifndef QGEMV_VARIANTS  // benchmarks compile their own (SK, U)
#define QGEMV4_SK8 8
#define QGEMV4_U8 2
#define QGEMV4_RT8 1
#define QGEMV4_SK16 16
#define QGEMV4_U16 1
#define QGEMV4_RT16 1
QGEMV_DTYPE(f16, F16)
QGEMV_DTYPE(bf16, BF16)
#endif
