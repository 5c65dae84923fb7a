// Shared helpers for llmc kernels. NVRTC from the pip wheel ships no cuda_fp16.h/cuda_bf16.h,
// so 16-bit values travel as raw `unsigned short` and convert through PTX `cvt` instructions.
#pragma once
// A module's entry points come in both 16-bit dtypes; an engine runs one, so a build compiles
// that one's alone (compiler.compile_module's dtype: -DLLMC_DTYPE_F16 or -DLLMC_DTYPE_BF16),
// half the NVRTC time. Without either (the kernel tests, the TensorRT plugins) both.
#ifdef LLMC_DTYPE_BF16
#define LLMC_F16(...)
#else
#define LLMC_F16(...) __VA_ARGS__
#endif
#ifdef LLMC_DTYPE_F16
#define LLMC_BF16(...)
#else
#define LLMC_BF16(...) __VA_ARGS__
#endif
typedef unsigned short u16;
typedef unsigned int u32;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

struct F16 {
  static __device__ __forceinline__ float to_f(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
  }
  static __device__ __forceinline__ u16 from_f(float f) {
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
  }
  static __device__ __forceinline__ u32 pack2(float a, float b) {
    u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a)); return r;
  }
  static constexpr bool is_bf16 = false;
};

struct BF16 {
  static __device__ __forceinline__ float to_f(u16 h) { return __uint_as_float(((u32)h) << 16); }
  static __device__ __forceinline__ u16 from_f(float f) {
    u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
  }
  static __device__ __forceinline__ u32 pack2(float a, float b) {
    u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a)); return r;
  }
  static constexpr bool is_bf16 = true;
};

// Round through the storage type: HF computes each elementwise op in the model dtype.
template <typename T> __device__ __forceinline__ float rnd(float x) {
  return T::to_f(T::from_f(x));
}

// ---- E4M3 (float8; the conversions exist from sm_89) ------------------------------------------
// FP8 GEMMs (qgemv.cu) and the E4M3 KV pool (--kv-cache-dtype fp8: rope.cu writes it,
// paged_attention.cuh reads it). Callers run on sm_89+ only: the lowering refuses FP8 for
// older targets, so there these trap.
typedef unsigned char u8;

// Two floats -> two E4M3 bytes, lo in the low byte: round to nearest even, saturating at
// +-448, as ONNX QuantizeLinear casts to float8 (saturate=1).
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
#else
  __trap();
  return 0;
#endif
}

// Four floats -> one word of E4M3 bytes, a in the lowest.
__device__ __forceinline__ u32 e4m3x4(float a, float b, float c, float d) {
  return (u32)e4m3x2(a, b) | ((u32)e4m3x2(c, d) << 16);
}

// Two E4M3 bytes (lo in the low byte) -> an f16x2 (lo in the low half), exactly: every E4M3
// value is an f16.
__device__ __forceinline__ u32 e4m3x2_to_f16x2(unsigned short v) {
#if __CUDA_ARCH__ >= 890
  u32 h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(v));
  return h2;
#else
  __trap();
  return 0;
#endif
}

// Two E4M3 bytes (lo in the low byte) times a scale -> two values of T packed (lo in the low
// half), each rounded once: what DequantizeLinear gives. The product of an E4M3 value and a
// 16-bit scale is exact in fp32; fp16 (s2: the scale, a value of fp16, in both halves) takes
// the one f16x2 multiply, whose single rounding of the exact product is the same.
template <typename T>
__device__ __forceinline__ u32 e4m3x2_scaled(unsigned short v, float scale, u32 s2) {
  const u32 h2 = e4m3x2_to_f16x2(v);
  if constexpr (T::is_bf16) {
    return T::pack2(F16::to_f((u16)(h2 & 0xffffu)) * scale, F16::to_f((u16)(h2 >> 16)) * scale);
  } else {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(h2), "r"(s2));
    return r;
  }
}

// The access type of VEC 16-bit values (for copies that need no conversion).
template <int VEC> struct Vec;
template <> struct Vec<8> { typedef uint4 type; };
template <> struct Vec<1> { typedef u16 type; };

// VEC consecutive 16-bit values <-> fp32; VEC=8 is one 16-byte access (p 16-byte aligned).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const u16* p, float* f) {
  if constexpr (VEC == 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const u16* h = reinterpret_cast<const u16*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = T::to_f(h[i]);
  } else {
    f[0] = T::to_f(*p);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(u16* p, const float* f) {
  if constexpr (VEC == 8) {
    uint4 v;
    u16* h = reinterpret_cast<u16*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = T::from_f(f[i]);
    *reinterpret_cast<uint4*>(p) = v;
  } else {
    *p = T::from_f(f[0]);
  }
}

// Programmatic dependent launch (sm_90+): a kernel launched with the PDL attribute may start
// while the previous kernel of the stream still runs, and must call pdl_wait() before it
// reads that kernel's output (it returns once the previous grid has completed and its
// writes are visible). pdl_trigger() lets the next kernel start early; it is harmless when
// the next kernel was launched without the attribute, which then waits as usual. Both are
// no-ops on older GPUs and on launches without the attribute.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// The step that ends a computation split over `total` CTAs: each calls it once its partial
// results are written, and it returns true (in every thread) in the last CTA to arrive, whose
// reads then see every CTA's writes. That CTA sets the counter back to zero, so the next
// launch, or a captured graph's replay, needs no memset. Issue order is free: "last" is
// whichever CTA's atomic sees total - 1. flag: a word of shared memory.
__device__ __forceinline__ bool last_to_arrive(int* counter, int total, int* flag) {
  __threadfence();  // this CTA's partials are visible to the GPU before it is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    *flag = atomicAdd(counter, 1) == total - 1;
    if (*flag) *counter = 0;
  }
  __syncthreads();
  if (!*flag) return false;
  __threadfence();
  return true;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction by WARP (warp_sum, warp_max); `red` holds 32 floats, `none` is the
// reduction's identity. Every thread gets the result.
template <float (*WARP)(float)>
__device__ __forceinline__ float block_reduce(float v, float* red, float none) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WARP(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  return WARP(lane < nw ? red[lane] : none);
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  return block_reduce<warp_sum>(v, red, 0.f);
}

__device__ __forceinline__ float block_max(float v, float* red) {
  return block_reduce<warp_max>(v, red, -INFINITY);
}

// Sequence of packed token t: largest s with seq_starts[s] <= t (seq_starts has B+1 entries).
__device__ __forceinline__ int find_seq(const int* seq_starts, int B, int t) {
  int lo = 0, hi = B - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (seq_starts[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float gelu_tanh_f(float x) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  return 0.5f * x * (1.f + tanhf(k0 * (x + k1 * x * x * x)));
}
__device__ __forceinline__ float gelu_erf_f(float x) {
  return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
}
__device__ __forceinline__ float silu_f(float x) { return x / (1.f + __expf(-x)); }

// ---- skinny GEMMs on tensor cores (gemv.cu, qgemv.cu) ---------------------------------------

// 8 packed 16-bit values -> fp32 (bf16 is the high half of an fp32: a shift or a mask).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (T::is_bf16) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      f[2 * i] = T::to_f((u16)(w[i] & 0xffffu));
      f[2 * i + 1] = T::to_f((u16)(w[i] >> 16));
    }
  }
}

// A weight stream: read once, so it must not evict x, which every warp re-reads from L1.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
// ld_stream as NAME with an L2 prefetch size: HINT is a PTX qualifier string (".L2::128B",
// or "" for none), which a template argument cannot carry, so a module defines its own.
#define LLMC_LD_STREAM_L2(NAME, HINT)                                                         \
  __device__ __forceinline__ uint4 NAME(const void* p) {                                      \
    uint4 v;                                                                                   \
    asm("ld.global.nc.L1::no_allocate" HINT ".v4.u32 {%0,%1,%2,%3}, [%4];"                    \
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));                               \
    return v;                                                                                  \
  }

// c[16 x 8] += a[16 x 16] b[16 x 8], fp32 accumulation. Fragments (g = lane / 4, t = lane % 4):
// a0 = row g, k 2t..2t+1; a1 = row g + 8, same k; a2, a3 = the same rows at k 2t+8..2t+9;
// b0 = k 2t..2t+1 of column g, b1 = k 2t+8..2t+9; c0, c1 = row g, columns 2t, 2t+1; c2, c3 =
// row g + 8.
template <typename T>
__device__ __forceinline__ void mma_16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                          u32 b1) {
  if constexpr (T::is_bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// ---- shared-memory staging (sm_80+): cp.async copies, ldmatrix fragments ----------------------
// (paged_attention.cuh's tiles, moe.cu's tiled GEMM.) bytes 0 in cp_async16 copies nothing
// and zero-fills the 16 destination bytes.
__device__ __forceinline__ u32 smem_u32(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}
// Make a value opaque to the compiler here: it may not recompute it later from what it came
// from (ptxas does so inside loops to save registers, at a cost per iteration), nor move the
// work that made it past this point.
__device__ __forceinline__ void keep_reg(u32& v) { asm volatile("" : "+r"(v)); }
template <typename P> __device__ __forceinline__ void keep_reg(P*& p) {
  asm volatile("" : "+l"(p));
}
// CP_ASYNC_L2: an L2 prefetch size for the copies (".L2::128B"), for a benchmark to compare;
// none by default (the decode attention read no faster with one: bench/results/kernels.md).
#ifndef CP_ASYNC_L2
#define CP_ASYNC_L2 ""
#endif
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global" CP_ASYNC_L2 " [%0], [%1], 16, %2;\n" ::"r"(dst),
               "l"(src), "r"(bytes));
}
// 4 bytes (bytes 0: zero-fill), through L1: a gather of pairs (qgemv.cuh's w4gw x stages).
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldsm_x4(u32* r, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32* r, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// y[row, o] (y [., n]) from a GEMM's fp32 sum v: with ACT (1 SwiGLU, 2 GeGLU) v is the gate
// row's sum and up the up row's, combined as the unfused path rounds them; else the bias (T,
// or fp32 with F32) is added. Stored as T, or fp32 with F32.
template <typename T, int ACT, bool F32>
__device__ __forceinline__ void store_out(void* __restrict__ y, const void* __restrict__ bias,
                                          int row, int n, int o, float v, float up) {
  if constexpr (ACT) {
    const float gr = rnd<T>(v);
    v = rnd<T>(ACT == 1 ? silu_f(gr) : gelu_tanh_f(gr)) * rnd<T>(up);
  } else if (bias) {
    v += F32 ? reinterpret_cast<const float*>(bias)[o]
             : T::to_f(reinterpret_cast<const u16*>(bias)[o]);
  }
  if constexpr (F32) reinterpret_cast<float*>(y)[(size_t)row * n + o] = v;
  else reinterpret_cast<u16*>(y)[(size_t)row * n + o] = T::from_f(v);
}

// The end of a split-K tensor-core GEMV: SK warps each hold NT 16 x 8 tiles of partial sums
// for the CTA's 16 weight rows (from o0) and x rows j * 8 .. j * 8 + 7; they are summed in
// warp order (deterministic), scaled (row_scale: x_scale * row_scale[weight row], FP8; null
// for none; x_factor: times x_factor[x row] too, null for none), and stored, the gated
// activation (ACT: rows g and g + 8 of the tile are the gate and up rows of output o0 + g) and
// the bias applied as the unfused path rounds them.
template <typename T, int NT, int SK, int ACT, bool F32>
__device__ __forceinline__ void tc_store(float (*part)[NT][4][32], const float (*acc)[4],
                                         int o0, int m, int n, const void* __restrict__ bias,
                                         void* __restrict__ y, float x_scale,
                                         const float* __restrict__ row_scale,
                                         const float* x_factor = nullptr) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) part[warp][j][e][lane] = acc[j][e];
  __syncthreads();
  // C element e of lane L: weight row L/4 (+8 for e >= 2), x row 2 * (L%4) + (e & 1).
  for (int i = threadIdx.x; i < NT * 4 * 32; i += SK * 32) {
    const int j = i >> 7, e = (i >> 5) & 3, ln = i & 31;
    if (ACT && e >= 2) continue;
    const int row = j * 8 + 2 * (ln & 3) + (e & 1);
    const int o = o0 + (ln >> 2) + (ACT ? 0 : 8 * (e >> 1));
    if (row >= m || o >= n) continue;
    float v = 0.f;
#pragma unroll
    for (int s = 0; s < SK; ++s) v += part[s][j][e][ln];
    if (row_scale) v *= x_scale * row_scale[o];
    float up = 0.f;
    if constexpr (ACT) {
#pragma unroll
      for (int s = 0; s < SK; ++s) up += part[s][j][e + 2][ln];
      if (row_scale) up *= x_scale * row_scale[n + o];
    }
    if (x_factor) {
      v *= x_factor[row];
      up *= x_factor[row];
    }
    store_out<T, ACT, F32>(y, bias, row, n, o, v, up);
  }
}
