// Shared helpers for llmc kernels. NVRTC from the pip wheel ships no cuda_fp16.h/cuda_bf16.h,
// so 16-bit values travel as raw `unsigned short` and convert through PTX `cvt` instructions.
#pragma once
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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum; `red` holds 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  float t = lane < nw ? red[lane] : 0.f;
  return warp_sum(t);
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
