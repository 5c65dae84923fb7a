// Quantized GEMMs of the cuda backend (quantization/qdq.py says what the graph computes):
//
//   int4 weight-only   y = (x [* pre]) @ dequant(w)^T,  dequant(w)[n, k] = q[n, k] * s[n, k / G]
//                      q = u - 8 (symmetric) or u - z[n, k / G] (zero points: qgemv_zp.cu),
//                      or (u - 8) s + o[n, k / G] (an offset a block: qgemv_zp.cu too)
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
#pragma once
#include "common.cuh"
#include "hopper.cuh"

typedef unsigned char u8;

// ---- INT4 ------------------------------------------------------------------------------------
// Engine layout (lower.py: pack_int4): w [N, K / 2] bytes, each 32-bit word holding 8
// consecutive k as unsigned nibbles u (q + 8, or a zero-point checkpoint's own codes) in the
// order k0 k2 k4 k6 k1 k3 k5 k7 (low nibble first), so that (word >> 4e) & 0x000f000f is the
// pair k2e, k2e+1 in the two 16-bit halves.
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
  static constexpr u32 ZBASE = T::is_bf16 ? 0xC300C300u : 0xE400E400u;  // -128 | -1024: OR'ed
                                                                        // with z, -(128 + z)
  static constexpr u32 ONE = T::is_bf16 ? 0x3F803F80u : 0x3C003C00u;
  static constexpr u32 NEG0 = 0x80008000u;                              // q * s + -0 = q * s
};

// One word (8 k) -> 4 pairs of 16-bit weights, scaled by s2 (the scale in both halves).
// magic: Int4<T>::MAGIC, in a loop passed in a register (Int4Regs: with the mask, it would be
// the OR's second constant, which ptxas re-creates before every use).
// bias: -(128 + z) (-(1024 + z)) in both halves, z the zero point (8 for symmetric codes);
// o2: the block's offset in both halves (-0 for none), added in the same rounding.
template <typename T>
__device__ __forceinline__ void dequant8(u32 w, u32 magic, u32 s2, u32 bias, u32* out,
                                         u32 o2 = Int4<T>::NEG0) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const u32 v = ((w >> (4 * e)) & 0x000F000Fu) | magic;
    out[e] = fma2<T>(fma2<T>(v, Int4<T>::ONE, bias), s2, o2);
  }
}

// A zero point z (0 to 16) -> the bias -(128 + z) (-(1024 + z)) in both halves: the 16-bit
// float's ulp there is 1, so z goes into the mantissa as it is.
template <typename T>
__device__ __forceinline__ u32 zero_bias(u32 base, u32 z) { return base | (z * 0x10001u); }

// One word -> 4 pairs of 128 + u (1024 + u): the codes as 16-bit floats, offset by 136 (1032).
// magic: Int4<T>::MAGIC, passed in a register (see w4_gemv).
__device__ __forceinline__ void offset8(u32 w, u32 magic, u32* out) {
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = ((w >> (4 * e)) & 0x000F000Fu) | magic;
}

// 16 bytes = 32 k of one row -> 16 pairs, in k order.
template <typename T>
__device__ __forceinline__ void dequant32(const uint4& v, u32 magic, u16 s, u32 bias, u32* out,
                                          u32 o2 = Int4<T>::NEG0) {
  const u32 s2 = (u32)s | ((u32)s << 16);
  dequant8<T>(v.x, magic, s2, bias, out, o2);
  dequant8<T>(v.y, magic, s2, bias, out + 4, o2);
  dequant8<T>(v.z, magic, s2, bias, out + 8, o2);
  dequant8<T>(v.w, magic, s2, bias, out + 12, o2);
}

// What the INT4 kernels' zp argument holds: nothing (symmetric codes u - 8), zero points z
// [N, K / G] a byte each (codes u - z), or offsets o [N, K / G] in the compute dtype (codes
// u - 8, plus o a block: a GGUF file's Q4_1, whose o = m + 8 d is no integer multiple of d).
enum Int4Offsets { SYM = 0, ZERO_POINTS = 1, OFFSETS = 2 };

// mma.m16n8k16 with D and C apart (no copy of C), and not volatile: a pure function the
// compiler may schedule around the loads.
template <typename T>
__device__ __forceinline__ void mma_dc(float* d, const float* c, u32 a0, u32 a1, u32 a2, u32 a3,
                                       u32 b0, u32 b1) {
  if constexpr (T::is_bf16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
}

// The weight loads ask L2 to fetch each missed 128-byte line whole (.L2::128B), not only the
// 32-byte sectors a lane asks for: a warp's load takes 64 bytes of each of 8 rows, and the
// line's other half is the next warp's, asked for at about the same time. On the H100 it reads
// 1-4 points more of HBM (FP8 qkv 78 -> 82%, gate-up 86.5 -> 89%; INT4 qkv 64 -> 67%; .L2::256B
// no better; bench/kernels/l2_prefetch.py, bench/results/qgemv.md). The SASS differs only by
// the loads' LTC128B qualifier. A benchmark may define QGEMV_L2 itself to compare.
#ifndef QGEMV_L2
#define QGEMV_L2 ".L2::128B"
#endif
// The small-M GEMM's (w4g*, w4gw*) weight loads take the same 64 bytes of 8 rows, and the
// same warp asks for the lines' other halves a chunk later. They go without a prefetch size:
// at 32-128 rows 128B or 256B gained nothing and cost qkv at 32 rows 1.5-2 points
// (bench/results/qgemv.md). W4G_L2 lets a benchmark set one.
#ifndef W4G_L2
#define W4G_L2 ""
#endif
// Loads that keep the old value where p is false: a predicated instruction, no branch. NAME
// with the L2 prefetch size HINT (a PTX qualifier string, as common.cuh's LLMC_LD_STREAM_L2).
#define QGEMV_LD_STREAM_IF(NAME, HINT)                                                        \
  __device__ __forceinline__ void NAME(bool p, const void* a, uint4& v) {                     \
    asm volatile(                                                                              \
        "{ .reg .pred q; setp.ne.b32 q, %5, 0;\n"                                             \
        "@q ld.global.nc.L1::no_allocate" HINT ".v4.u32 {%0,%1,%2,%3}, [%4]; }"              \
        : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w) : "l"(a), "r"((int)p));                 \
  }
QGEMV_LD_STREAM_IF(ld_stream_if, QGEMV_L2)      // the decode GEMVs
QGEMV_LD_STREAM_IF(ld_small_m_if, W4G_L2)       // the small-M GEMM
__device__ __forceinline__ void ld_u16_if(bool p, const u16* a, u32& v) {
  asm volatile("{ .reg .pred q; setp.ne.b32 q, %2, 0;\n @q ld.global.nc.u16 %0, [%1]; }"
               : "+r"(v) : "l"(a), "r"((int)p));
}
__device__ __forceinline__ void ld_u8_if(bool p, const u8* a, u32& v) {
  asm volatile("{ .reg .pred q; setp.ne.b32 q, %2, 0;\n @q ld.global.nc.u8 %0, [%1]; }"
               : "+r"(v) : "l"(a), "r"((int)p));
}

// The OR's magic and the -136 tile in registers, as values ptxas cannot see are constant
// (zero is 0 at run time, from an argument): as immediates it re-creates them before every
// use, about a third of the loop's instructions.
template <typename T>
struct Int4Regs {
  u32 magic, nb[4], zbase;
  __device__ __forceinline__ Int4Regs(u32 zero) {
    magic = Int4<T>::MAGIC | zero;
#pragma unroll
    for (int i = 0; i < 4; ++i) nb[i] = Int4<T>::BIAS | (zero << i);
    zbase = Int4<T>::ZBASE | zero;
  }
};

// A chunk is 128 k: lane t of a quad takes k [32t, 32t + 32) (16 bytes) of rows g and g + 8,
// and x's same 32 k; its eight k16 steps read pairs 2s, 2s + 1 (k 4s .. 4s + 3) of each. A
// scale group (G = 32 to 1024) holds a lane's 32 k whole, so a load needs one scale a row.
// pre: AWQ's 1 / s per k (x * pre rounded to T, as the graph's Mul rounds it), or null.
//
// CS (chunk scales: the group a multiple of 128, as Llama's K = 4096 / 14336 take): a chunk
// of a row has one scale, so the MMA takes the codes as they come out of the OR, 128 + u
// (1024 + u), and the chunk's sums are corrected and scaled once, in fp32:
//     sum_k q_k s x_k = s (sum_k (q_k + 136) x_k - 136 sum_k x_k)
// with -136 sum_k x_k from an MMA against a tile of -136 (exact in fp32), which starts the
// weight MMAs' chains. Two ALU ops a weight pair fewer than scaling each pair (at two weights
// a byte, the instruction count bounded this kernel's first versions: bench/results/qgemv.md).
//
// ZP == ZERO_POINTS (qgemv_zp.cu): the codes are u - z with z a row's and group's own (z: the
// lane's two rows', 0 to 16) rather than u - 8, so the -136 above becomes -(128 + z), a tile
// whose rows differ (rows g and g + 8 are the A fragment's registers 0, 2 and 1, 3); without
// chunk scales each pair is dequantized as (128 + u) - (128 + z), exact, then scaled.
// ZP == OFFSETS (no chunk scales): z holds the lane's two rows' offsets o (16-bit), and each
// pair is (u - 8) s + o, rounded once.
//
// One 128-k chunk of the 16 weight rows (v: the lane's 32 k of rows g and g + 8, s: their
// scales) against x's same k (xp[j]: the lane's 32 k of x row j * 8 + g; pp: pre's, read
// only with_pre), added into acc. live: the lane's k < K (false only in a tail chunk: x reads
// as zero, so any codes in v add nothing). Each chunk's eight MMAs run as two chains, so a
// warp waits on half the tensor-core latency; with CS the chains start from the x-side
// correction, and the scale costs one FMA an output.
template <typename T, int NT, bool CS, int ZP>
__device__ __forceinline__ void w4_chunk(const uint4 (&v)[2], const u32 (&s)[2],
                                         const u32 (&z)[2], const u16* const (&xp)[NT],
                                         const u16* pp, bool live, bool with_pre,
                                         const Int4Regs<T>& c, float (&acc)[NT][4]) {
  static_assert(!(CS && ZP == OFFSETS), "offsets are added as each pair is dequantized");
  u32 nb[4];
  if constexpr (ZP == ZERO_POINTS) {
    nb[0] = nb[2] = zero_bias<T>(c.zbase, z[0]);
    nb[1] = nb[3] = zero_bias<T>(c.zbase, z[1]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) nb[i] = c.nb[i];
  }
  u32 X[NT][16];
  float xo[NT][4], xo1[NT][4];
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const uint4* xv = reinterpret_cast<const uint4*>(xp[j]);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 a = live ? __ldg(xv + q) : make_uint4(0, 0, 0, 0);
      X[j][4 * q] = a.x; X[j][4 * q + 1] = a.y; X[j][4 * q + 2] = a.z; X[j][4 * q + 3] = a.w;
    }
    if (with_pre) {
      const uint4* pv = reinterpret_cast<const uint4*>(pp);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint4 b = live ? __ldg(pv + q) : make_uint4(0, 0, 0, 0);
        X[j][4 * q] = fma2<T>(X[j][4 * q], b.x, Int4<T>::NEG0);
        X[j][4 * q + 1] = fma2<T>(X[j][4 * q + 1], b.y, Int4<T>::NEG0);
        X[j][4 * q + 2] = fma2<T>(X[j][4 * q + 2], b.z, Int4<T>::NEG0);
        X[j][4 * q + 3] = fma2<T>(X[j][4 * q + 3], b.w, Int4<T>::NEG0);
      }
    }
    if constexpr (CS) {
      mma_dc<T>(xo[j], zero, nb[0], nb[1], nb[2], nb[3], X[j][0], X[j][1]);
      mma_dc<T>(xo1[j], zero, nb[0], nb[1], nb[2], nb[3], X[j][2], X[j][3]);
#pragma unroll
      for (int q = 2; q < 8; q += 2) {
        mma_dc<T>(xo[j], xo[j], nb[0], nb[1], nb[2], nb[3], X[j][2 * q], X[j][2 * q + 1]);
        mma_dc<T>(xo1[j], xo1[j], nb[0], nb[1], nb[2], nb[3], X[j][2 * q + 2],
                  X[j][2 * q + 3]);
      }
    }
  }
  u32 A[16], B[16];
  if constexpr (CS) {
    offset8(v[0].x, c.magic, A); offset8(v[0].y, c.magic, A + 4);
    offset8(v[0].z, c.magic, A + 8); offset8(v[0].w, c.magic, A + 12);
    offset8(v[1].x, c.magic, B); offset8(v[1].y, c.magic, B + 4);
    offset8(v[1].z, c.magic, B + 8); offset8(v[1].w, c.magic, B + 12);
  } else {
    constexpr u32 none = Int4<T>::NEG0;
    dequant32<T>(v[0], c.magic, (u16)s[0], nb[0], A, ZP == OFFSETS ? z[0] * 0x10001u : none);
    dequant32<T>(v[1], c.magic, (u16)s[1], nb[1], B, ZP == OFFSETS ? z[1] * 0x10001u : none);
  }
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    float s0[4], s1[4];
    mma_dc<T>(s0, CS ? xo[j] : acc[j], A[0], B[0], A[1], B[1], X[j][0], X[j][1]);
    mma_dc<T>(s1, CS ? xo1[j] : zero, A[2], B[2], A[3], B[3], X[j][2], X[j][3]);
#pragma unroll
    for (int q = 2; q < 8; q += 2) {
      mma_dc<T>(s0, s0, A[2 * q], B[2 * q], A[2 * q + 1], B[2 * q + 1], X[j][2 * q],
                X[j][2 * q + 1]);
      mma_dc<T>(s1, s1, A[2 * q + 2], B[2 * q + 2], A[2 * q + 3], B[2 * q + 3],
                X[j][2 * q + 2], X[j][2 * q + 3]);
    }
    if constexpr (CS) {
      const float fa = T::to_f((u16)s[0]), fb = T::to_f((u16)s[1]);
      acc[j][0] = fmaf(fa, s0[0] + s1[0], acc[j][0]);
      acc[j][1] = fmaf(fa, s0[1] + s1[1], acc[j][1]);
      acc[j][2] = fmaf(fb, s0[2] + s1[2], acc[j][2]);
      acc[j][3] = fmaf(fb, s0[3] + s1[3], acc[j][3]);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = s0[e] + s1[e];
    }
  }
}

// Any architecture: a CTA is SK warps over 16 weight rows, and a warp's chunks are w, w + SK,
// ...; D of them are in flight in a register ring that the loop, unrolled by D, indexes
// statically (no copies, no branches: the loads past the warp's last chunk are predicated
// off). Each pointer advances once every D chunks and the stages load at constant offsets
// from it; x rows past m re-read row m - 1 (their sums are never stored) rather than branch
// or zero; the chunk that K % 128 leaves runs after the loop, with lane predicates. ZP: the
// zero points or offsets zp [N, K / G] ride in the ring next to the scales. F32: y in fp32
// (a quantized LM head's logits; a bias is then fp32 too).
template <typename T, int NT, int SK, int D, int ACT, bool CS, int ZP, bool F32 = false>
__device__ __forceinline__ void w4_gemv(const u16* __restrict__ x, const u8* __restrict__ w,
                                        const u16* __restrict__ scale,
                                        const u16* __restrict__ pre,
                                        const void* __restrict__ bias, int m, int n, int k,
                                        int gshift, void* __restrict__ y,
                                        const void* __restrict__ zp) {
  __shared__ float part[SK][NT][4][32];
  constexpr int TILE = ACT ? 8 : 16;  // outputs a 16-row tile gives
  constexpr int STEP = SK * 128;      // k between a warp's chunks
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int o0 = blockIdx.x * TILE;
  const int groups = k >> gshift;
  const int k0 = warp * 128 + 32 * t;  // this lane's first k
  const int sstep = STEP >> gshift;    // scales between a warp's chunks (G divides STEP)
  const int ra = min(o0 + g, n - 1);   // rows past the end re-read the last
  const int rb = ACT ? n + ra : min(o0 + g + 8, n - 1);
  const u8* wp[2] = {w + (size_t)ra * (k / 2) + k0 / 2, w + (size_t)rb * (k / 2) + k0 / 2};
  const u16* sp[2] = {scale + (size_t)ra * groups + (k0 >> gshift),
                      scale + (size_t)rb * groups + (k0 >> gshift)};
  constexpr int ZB = ZP == OFFSETS ? 2 : 1;  // bytes a zero point or offset
  const u8* zq[2] = {(const u8*)zp + ZB * ((size_t)ra * groups + (k0 >> gshift)),   // with ZP
                     (const u8*)zp + ZB * ((size_t)rb * groups + (k0 >> gshift))};
  const u16* xp[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xp[j] = x + (size_t)min(j * 8 + g, m - 1) * k + k0;
  const u16* pp = pre + k0;  // read only with pre
  const int whole = k >> 7;
  const int mine = whole > warp ? (whole - warp + SK - 1) / SK : 0;  // whole chunks of this warp
  const Int4Regs<T> c((u32)k >> 31);

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  uint4 wv[D][2];
  u32 sv[D][2], zv[D][2];
  // stage <- the chunk i chunks past the pointers, if live
  auto load = [&](int d, int i, bool live) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ld_stream_if(live, wp[h] + i * (STEP / 2), wv[d][h]);
      ld_u16_if(live, sp[h] + i * sstep, sv[d][h]);
      if constexpr (ZP == ZERO_POINTS) ld_u8_if(live, zq[h] + i * sstep, zv[d][h]);
      if constexpr (ZP == OFFSETS)
        ld_u16_if(live, (const u16*)zq[h] + i * sstep, zv[d][h]);
    }
  };
  auto consume = [&](int d, int i, bool live, bool with_pre) {
    const u16* xi[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) xi[j] = xp[j] + i * STEP;
    w4_chunk<T, NT, CS, ZP>(wv[d], sv[d], zv[d], xi, pp + i * STEP, live, with_pre, c, acc);
  };
  auto advance = [&](int i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      wp[h] += i * (STEP / 2);
      sp[h] += i * sstep;
      if constexpr (ZP) zq[h] += ZB * i * sstep;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) xp[j] += i * STEP;
    pp += i * STEP;
  };

#pragma unroll
  for (int d = 0; d < D; ++d) load(d, d, d < mine);
  pdl_trigger();
  pdl_wait();
  // The loop, with and without AWQ's 1 / s: two copies, so the loop holds no branch on it.
  auto run = [&](bool with_pre) {
    int left = mine;  // chunks from the pointers on
    for (; left >= D; left -= D) {
#pragma unroll
      for (int d = 0; d < D; ++d) {
        consume(d, d, true, with_pre);
        load(d, d + D, d + D < left);
      }
      advance(D);
    }
#pragma unroll
    for (int d = 0; d < D - 1; ++d)
      if (d < left) consume(d, d, true, with_pre);
    if ((k & 127) && warp == whole % SK) {  // the tail chunk: its lanes past K load nothing
      advance(left);
      const bool in = k0 + mine * STEP < k;
      wv[0][0] = wv[0][1] = make_uint4(0, 0, 0, 0);
      sv[0][0] = sv[0][1] = zv[0][0] = zv[0][1] = 0u;
      load(0, 0, in);
      consume(0, 0, in, with_pre);
    }
  };
  if (pre) run(true);  // inlined twice: with_pre is a constant in each copy
  else run(false);
  tc_store<T, NT, SK, ACT, F32>(part, acc, o0, m, n, bias, y, 1.f, nullptr);
}

// Prefill: the INT4 weight back to T [N, K] for cuBLASLt, with AWQ's pre folded into it
// (w[n, k] * pre[k], one more rounding than the graph's x * pre: within an ulp of T). A thread
// takes U words (8 k each, a 16-byte store); a warp's 32 words of one round are consecutive,
// so each of its loads is one 128-byte line and each store 512 whole bytes. (A thread per
// 16-byte load wrote 64 bytes at a 64-byte stride a store, half-sector writes, and reached
// under half of HBM: bench/results/qgemv.md.) Word i is at byte 4i of w and element 8i of out,
// since a row is K / 8 words; n * k < 2^31 (launch_rules). zp: the zero points [N, K / G], or
// null (8); off: the offsets [N, K / G] (codes u - 8), or null.
constexpr int DQ_WORDS = 4;

__device__ __forceinline__ u32 ld_stream_u32(const void* p) {
  u32 v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

template <typename T, int U = DQ_WORDS>
__device__ __forceinline__ void dequant_int4(const u8* __restrict__ w,
                                             const u16* __restrict__ scale,
                                             const u16* __restrict__ pre, int n, int k,
                                             int gshift, u16* __restrict__ out,
                                             const u8* __restrict__ zp = nullptr,
                                             const u16* __restrict__ off = nullptr) {
  const int per_row = k / 8, words = n * per_row;
  const int first = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * (32 * U) +
                    (threadIdx.x & 31);
  u32 v[U], s2[U], bias[U], o2[U];
  int k0[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {  // every load issued before the first is used
    const int i = min(first + 32 * u, words - 1);   // past the end: a copy of the last word
    const int row = i / per_row;
    k0[u] = (i - row * per_row) * 8;
    const int group = row * (k >> gshift) + (k0[u] >> gshift);
    v[u] = ld_stream_u32(w + 4 * (size_t)i);
    s2[u] = scale[group];
    bias[u] = zp ? zero_bias<T>(Int4<T>::ZBASE, zp[group]) : Int4<T>::BIAS;
    o2[u] = off ? off[group] * 0x10001u : Int4<T>::NEG0;
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int i = first + 32 * u;
    if (i >= words) return;
    u32 A[4];
    dequant8<T>(v[u], Int4<T>::MAGIC, s2[u] | (s2[u] << 16), bias[u], A, o2[u]);
    if (pre) {
      const uint4 pv = *reinterpret_cast<const uint4*>(pre + k0[u]);
      A[0] = fma2<T>(A[0], pv.x, Int4<T>::NEG0);
      A[1] = fma2<T>(A[1], pv.y, Int4<T>::NEG0);
      A[2] = fma2<T>(A[2], pv.z, Int4<T>::NEG0);
      A[3] = fma2<T>(A[3], pv.w, Int4<T>::NEG0);
    }
    *reinterpret_cast<uint4*>(out + 8 * (size_t)i) = make_uint4(A[0], A[1], A[2], A[3]);
  }
}

// ---- INT4, steps of 17 to W4_GEMM_MAX_M rows: the small-M GEMM -------------------------------
// Past 16 rows the GEMV above reads x once for each 16 weight rows (N / 16 times in all, more
// bytes than the weight from 32 rows on), and cuBLASLt on a dequantized copy writes and reads
// the weight 4x over. Here a CTA is NW warps over NW x 16 weight rows (warp w: 16 rows, or with
// ACT 8 gate rows and their 8 up rows), against MT = 8 NT rows of x from m0 = blockIdx.x * MT,
// all warps on the same 128-k chunk; gridDim.z CTAs split K when the tiles alone would not
// fill the GPU. The CTA stages x's [MT, 128] chunk (and AWQ's pre) in shared memory (cp.async,
// S stages), so x crosses L2 once for NW x 16 weight rows; each warp's weights come straight
// into a register ring D chunks ahead, and a lane's 16-byte load of a row is its A fragment
// as loaded, as in the GEMV: its x fragments are read from shared memory in the same k order.
// A fragment serves NT MMAs, so each pair is dequantized exactly (q * s rounded to T, as
// DequantizeLinear rounds it; AWQ's pre folded in with one more rounding, as dequant_int4 does
// for cuBLASLt) rather than corrected per chunk.

// x's chunk row r in shared memory: 16 pieces of 8 k; a lane reads pieces 4t .. 4t + 3 of row
// 8j + g, so piece p goes to p ^ (bit 3 of p, moved to bit 1) ^ (r & 1) within its half: the
// 8 lanes of each 16-byte access phase (rows of both parities, t = 0..3) hit 8 bank groups.
__device__ __forceinline__ int w4g_swz(int p, int r) {
  return (p & 8) | ((p & 7) ^ ((p >> 2) & 2) ^ (r & 1));
}

// sm_90a (WG, the w4gw entries): the same CTA, weight ring, K splits and tail, but each
// warpgroup's MMAs are wgmma: A, its 4 warps' 16 dequantized weight rows, from registers as
// above; B, all MT = 64 or 128 x rows of the CTA, from shared memory. One instruction
// covers the MT rows where an mma.sync took 8, and the tensor cores read x themselves instead
// of each lane loading its fragments: 0.95-1.31x the mma.sync kernel's speed at 64-128 rows
// on the H100 (bench/results/qgemv.md). They read B in their own k order, so x's chunk is
// staged in the order the weights' packing gives a lane (4-byte pairs by cp.async): pair
// 16t + 2s + h of the chunk (lane t's pair 2s + h at k16 step s) goes to logical pair
// 8s + 4h + t, in the 128-byte-swizzled K-major layout of hopper.cuh's smem_desc, two 64-k
// column atoms a chunk.
template <int MT>
__device__ __forceinline__ u32 w4gw_offset(int r, int lp) {
  return (lp >> 5) * (MT * 128) + (r >> 3) * 1024 + (r & 7) * 128 +
         ((((lp & 31) >> 2) ^ (r & 7)) << 4) + ((lp & 3) << 2);
}

#define W4G_MAX_SPLITS 8   // launch_rules.W4G_MAX_SPLITS

template <typename T, int NW, int NT, int S, int D, int ACT, int ZP, bool F32, bool WG = false>
__device__ __forceinline__ void w4_gemm(const u16* __restrict__ x, const u8* __restrict__ w,
                                        const u16* __restrict__ scale,
                                        const u16* __restrict__ pre,
                                        const void* __restrict__ bias, int m, int n, int k,
                                        int gshift, void* __restrict__ y,
                                        const void* __restrict__ zp, float* __restrict__ part,
                                        int* __restrict__ arrived) {
  constexpr int MT = 8 * NT;
  constexpr int TILE = ACT ? 8 : 16;  // outputs a warp gives
  constexpr int STAGE = (MT + 1) * 128;  // x's [MT, 128] chunk, then pre's 128
  constexpr int WG_STAGE = MT * 256;     // bytes (WG): x's chunk, two column atoms
  static_assert(!WG || (NW % 4 == 0 && (MT == 64 || MT == 128)),
                "wgmma: whole warpgroups, 64 or 128 x rows");
  extern __shared__ __align__(1024) u16 w4g_x[];  // S stages (WG: from a 1024-aligned base)
  const u32 wg_base = (smem_u32(w4g_x) + 1023) & ~1023u;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * MT;  // x tiles vary fastest: they share the CTA's weight in L2
  const int ob = blockIdx.y * NW * TILE, o0 = ob + warp * TILE;
  const int groups = k >> gshift, chunks = (k + 127) >> 7;
  // K split over gridDim.z CTAs (when the tiles alone would not fill the GPU)
  const int per = (chunks + gridDim.z - 1) / gridDim.z;
  const int c0 = blockIdx.z * per, c1 = min(chunks, c0 + per);
  const int ra = min(o0 + g, n - 1);  // rows past the end re-read the last
  const int rb = ACT ? n + ra : min(o0 + g + 8, n - 1);
  const u8* wp[2] = {w + (size_t)ra * (k / 2) + 16 * t, w + (size_t)rb * (k / 2) + 16 * t};
  const size_t srow[2] = {(size_t)ra * groups, (size_t)rb * groups};
  const Int4Regs<T> c((u32)k >> 31);

  // A register ring of D chunks: the lane's 32 k of its two rows, their scales (and zero
  // points). Lanes past K load nothing: x reads as zero there.
  uint4 wv[D][2];
  u32 sv[D][2], zv[D][2];
  auto wload = [&](int d, int ch) {
    const int kk = ch * 128 + 32 * t;
    const bool live = ch < c1 && kk < k;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ld_small_m_if(live, wp[h] + ch * 64, wv[d][h]);
      ld_u16_if(live, scale + srow[h] + (kk >> gshift), sv[d][h]);
      if constexpr (ZP == ZERO_POINTS)
        ld_u8_if(live, (const u8*)zp + srow[h] + (kk >> gshift), zv[d][h]);
      if constexpr (ZP == OFFSETS)
        ld_u16_if(live, (const u16*)zp + srow[h] + (kk >> gshift), zv[d][h]);
    }
  };
  // WG: thread i copies pair p = i % 64 of rows r0 + RP j (r0 = i / 64): 128 bytes of a row a
  // warp. What does not change from chunk to chunk is worked out once, so a chunk's copies are
  // an address and a cp.async each (they were ~20 instructions each, most of a chunk's).
  // Rows past m are not copied: they only meet output rows that are not stored.
  constexpr int RP = NW / 2;
  static_assert(!WG || RP % 4 == 0, "a row's swizzle repeats every 2 RP rows");
  const int xp = threadIdx.x & 63, xr0 = threadIdx.x >> 6;
  const int xlp = 8 * ((xp >> 1) & 7) + 4 * (xp & 1) + (xp >> 4);
  const u32 xoff[2] = {w4gw_offset<MT>(xr0, xlp), w4gw_offset<MT>(xr0 + RP, xlp)};
  const u16* const xrow = x + (size_t)min(m0 + xr0, m - 1) * k + 2 * xp;
  const int xrows = m - m0 - xr0;  // this thread's rows below m: RP j < xrows
  auto xload = [&](int ch) {
    if constexpr (WG) {
      const u32 buf = wg_base + (ch % S) * WG_STAGE;
      const bool kok = ch * 128 + 2 * xp < k;  // past K: zeros (the weights there are not loaded)
      const u16* const src = kok ? xrow + ch * 128 : x;
      const int step = kok ? RP * k : 0, bytes = kok ? 4 : 0;
      if (xrows > MT - RP) {
#pragma unroll
        for (int j = 0; j < MT / RP; ++j)
          cp_async4(buf + xoff[j & 1] + (j >> 1) * (2 * RP * 128), src + j * step, bytes);
      } else {
#pragma unroll
        for (int j = 0; j < MT / RP; ++j)
          if (RP * j < xrows)
            cp_async4(buf + xoff[j & 1] + (j >> 1) * (2 * RP * 128), src + j * step, bytes);
      }
      return;
    }
    u16* buf = w4g_x + (ch % S) * STAGE;
    for (int i = threadIdx.x; i < (MT + 1) * 16; i += NW * 32) {
      const int r = i >> 4, p = i & 15, kk = ch * 128 + 8 * p;
      if (r == MT) {  // pre's row
        if (pre) cp_async16(smem_u32(buf + r * 128 + 8 * p), pre + min(kk, k - 8), 16);
        continue;
      }
      const bool ok = m0 + r < m && kk < k;
      cp_async16(smem_u32(buf + r * 128 + 8 * w4g_swz(p, r)),
                 ok ? x + (size_t)(m0 + r) * k + kk : x, ok ? 16 : 0);
    }
  };

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    wv[d][0] = wv[d][1] = make_uint4(0, 0, 0, 0);
    sv[d][0] = sv[d][1] = zv[d][0] = zv[d][1] = 0u;
    wload(d, c0 + d);
  }
  pdl_trigger();
  pdl_wait();
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (c0 + st < c1) xload(c0 + st);
    cp_commit();
  }
  // The x stage of chunk ch is in, and every warp is past chunk ch - 1's: refill that one.
  auto next_stage = [&](int ch) {
    cp_wait<S - 2>();
    if constexpr (WG) fence_async_smem();  // this thread's copies, for the tensor cores' reads
    __syncthreads();
    if (ch + S - 1 < c1) xload(ch + S - 1);
    cp_commit();
  };
  // WG: the previous chunk's dequantized weights, which its MMAs may still be reading
  u32 Ap[16], Bp[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) Ap[i] = Bp[i] = 0u;
  auto keep = [&]() {  // Ap and Bp stay allocated until those MMAs are done
#pragma unroll
    for (int i = 0; i < 16; ++i) asm volatile("" :: "r"(Ap[i]), "r"(Bp[i]));
  };
  // chunk ch from ring slot d, then the slot loads chunk ch + D
  auto step = [&](int d, int ch) {
    if constexpr (!WG) next_stage(ch);
    const u16* buf = w4g_x + (ch % S) * STAGE;
    u32 A[16], B[16];
    constexpr u32 none = Int4<T>::NEG0;
    dequant32<T>(wv[d][0], c.magic, (u16)sv[d][0],
                 ZP == ZERO_POINTS ? zero_bias<T>(c.zbase, zv[d][0]) : c.nb[0], A,
                 ZP == OFFSETS ? zv[d][0] * 0x10001u : none);
    dequant32<T>(wv[d][1], c.magic, (u16)sv[d][1],
                 ZP == ZERO_POINTS ? zero_bias<T>(c.zbase, zv[d][1]) : c.nb[1], B,
                 ZP == OFFSETS ? zv[d][1] * 0x10001u : none);
    if (pre) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        // (lanes past K read pre's last 32: x is zero there)
        const uint4 v = WG ? __ldg(reinterpret_cast<const uint4*>(
                                 pre + min(ch * 128 + 32 * t, k - 32)) + q)
                           : *reinterpret_cast<const uint4*>(buf + MT * 128 + 32 * t + 8 * q);
        const u32 pp[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          A[4 * q + e] = fma2<T>(A[4 * q + e], pp[e], Int4<T>::NEG0);
          B[4 * q + e] = fma2<T>(B[4 * q + e], pp[e], Int4<T>::NEG0);
        }
      }
    }
    wload(d, ch + D);
    if constexpr (WG) {
#ifdef SM90A
      // this chunk's weights were dequantized while chunk ch - 1's MMAs ran
      wgmma_wait<0>();
      keep();
      next_stage(ch);
      const u32 xs = wg_base + (ch % S) * WG_STAGE;
      wgmma_fence();
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const u32 a[4] = {A[2 * q], B[2 * q], A[2 * q + 1], B[2 * q + 1]};
        wgmma_rs<T, MT, 0>(&acc[0][0], a,
                           smem_desc(xs + (q >> 2) * (MT * 128) + (q & 3) * 32, 16, 1024), 1);
      }
      wgmma_commit();
#pragma unroll
      for (int i = 0; i < 16; ++i) { Ap[i] = A[i]; Bp[i] = B[i]; }
#endif
      return;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int r = 8 * j + g;
      u32 X[16];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint4 v =
            *reinterpret_cast<const uint4*>(buf + r * 128 + 8 * w4g_swz(4 * t + q, r));
        X[4 * q] = v.x; X[4 * q + 1] = v.y; X[4 * q + 2] = v.z; X[4 * q + 3] = v.w;
      }
#pragma unroll
      for (int q = 0; q < 8; ++q)
        mma_dc<T>(acc[j], acc[j], A[2 * q], B[2 * q], A[2 * q + 1], B[2 * q + 1], X[2 * q],
                  X[2 * q + 1]);
    }
  };
  // WG: a wgmma reads its A registers until the wait in the next step, so two steps in a row
  // must be distinct copies of the code: one copy in a loop would write its own A registers
  // (the same PTX registers) while the last chunk's MMAs still read them, which ptxas allows
  // and the results show (bench/results/qgemv.md). So with D odd a loop body is 2D steps.
  constexpr int U = WG && D % 2 ? 2 * D : D;
  int ch = c0;
  for (; ch + U <= c1; ch += U) {
#pragma unroll
    for (int d = 0; d < U; ++d) step(d % D, ch + d);
  }
#pragma unroll
  for (int d = 0; d < U - 1; ++d)
    if (ch + d < c1) step(d % D, ch + d);
  cp_wait<0>();
  if constexpr (WG) {
#ifdef SM90A
    wgmma_wait<0>();
    keep();
    reg_fence<4 * NT>(&acc[0][0]);
#endif
  }

  // y[row, o] from the sums of weight rows o (and n + o, the up row, with ACT)
  auto store = [&](int row, int o, float v, float up) {
    store_out<T, ACT, F32>(y, bias, row, n, o, v, up);
  };
  // C element e of the lane: weight row g (+8 for e >= 2), x row 8j + 2t + (e & 1).
  if (gridDim.z == 1) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < (ACT ? 2 : 4); ++e) {
        const int row = m0 + 8 * j + 2 * t + (e & 1), o = o0 + g + (ACT ? 0 : 8 * (e >> 1));
        if (row < m && o < n) store(row, o, acc[j][e], ACT ? acc[j][e + 2] : 0.f);
      }
    return;
  }
  // Split K: each CTA leaves its partial sums in part [splits, m, rows] (rows: n, or 2n with
  // ACT: gate then up), and the last of the tile's CTAs to arrive adds them up (its counter in
  // `arrived` back to zero for the next launch: last_to_arrive).
  const int rows = ACT ? 2 * n : n;
  float* mine = part + (size_t)blockIdx.z * m * rows;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = m0 + 8 * j + 2 * t + (e & 1), o = o0 + g + (ACT ? 0 : 8 * (e >> 1));
      if (row < m && o < n) mine[(size_t)row * rows + (ACT && e >= 2 ? n + o : o)] = acc[j][e];
    }
  // The flag in the x stages' first word: dead by then (every thread's copies waited for
  // above, and last_to_arrive's barrier comes before the flag is written).
  if (!last_to_arrive(arrived + blockIdx.y * gridDim.x + blockIdx.x, gridDim.z,
                      reinterpret_cast<int*>(w4g_x)))
    return;
  // The last CTA's sums are a latency chain a thread: so with N a multiple of 4 a thread takes
  // runs of 4 outputs along o (contiguous in part) a 16-byte load, TU runs and every split's
  // loads of them at once (WG: 4, its registers are free by now).
  constexpr int OUT = NW * TILE, RUNS = MT * OUT / 4, TU = WG ? 4 : 1;
  if (n % 4 == 0) {
    for (int i0 = threadIdx.x; i0 < RUNS; i0 += NW * 32 * TU) {
      float4 v[TU], up[TU];
#pragma unroll
      for (int u = 0; u < TU; ++u) v[u] = up[u] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int z = 0; z < W4G_MAX_SPLITS; ++z) {
#pragma unroll
        for (int u = 0; u < TU; ++u) {
          const int i = i0 + u * NW * 32;
          const int row = m0 + i / (OUT / 4), o = ob + i % (OUT / 4) * 4;
          if (z >= (int)gridDim.z || i >= RUNS || row >= m || o >= n) continue;
          const float* pz = part + ((size_t)z * m + row) * rows + o;
          const float4 a = __ldcg(reinterpret_cast<const float4*>(pz));
          v[u].x += a.x; v[u].y += a.y; v[u].z += a.z; v[u].w += a.w;
          if (ACT) {
            const float4 b = __ldcg(reinterpret_cast<const float4*>(pz + n));
            up[u].x += b.x; up[u].y += b.y; up[u].z += b.z; up[u].w += b.w;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < TU; ++u) {
        const int i = i0 + u * NW * 32;
        const int row = m0 + i / (OUT / 4), o = ob + i % (OUT / 4) * 4;
        if (i >= RUNS || row >= m || o >= n) continue;
        store(row, o, v[u].x, up[u].x);
        store(row, o + 1, v[u].y, up[u].y);
        store(row, o + 2, v[u].z, up[u].z);
        store(row, o + 3, v[u].w, up[u].w);
      }
    }
    return;
  }
  for (int i = threadIdx.x; i < MT * OUT; i += NW * 32) {
    const int row = m0 + i / OUT, o = ob + i % OUT;
    if (row >= m || o >= n) continue;
    float v = 0.f, up = 0.f;
    for (int z = 0; z < (int)gridDim.z; ++z) {
      const float* pz = part + ((size_t)z * m + row) * rows;
      v += __ldcg(pz + o);
      if (ACT) up += __ldcg(pz + n + o);
    }
    store(row, o, v, up);
  }
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

// ---- a sequence's first token (--fp8-first-token dynamic: quantization/qdq.py
// first_token_input) --------------------------------------------------------------------------
// Its row of x is rounded to E4M3 with a scale of its own, s = max(|max| / 448, 2^-126) in
// fp32 as the graph computes it, instead of the calibrated sx; every kernel and cuBLASLt
// scales a GEMM's output by sx, so that row's output is then multiplied by s / sx.
__device__ __forceinline__ float fp8_row_scale(float amax) {
  return fmaxf(amax / 448.f, 1.17549435e-38f);
}

// |max| of x[0, k) (k a multiple of 8, 16-byte aligned) over the CTA: every thread gets it.
// red: 32 floats of shared memory.
template <typename T>
__device__ __forceinline__ float row_amax(const u16* __restrict__ x, int k, float* red) {
  float a = 0.f;
  for (int i = threadIdx.x * 8; i < k; i += blockDim.x * 8) {
    float f[8];
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + i)), f);
#pragma unroll
    for (int e = 0; e < 8; ++e) a = fmaxf(a, fabsf(f[e]));
  }
  return block_max(a, red);
}

// For the GEMV's m (<= 16) rows: factor[r] = s / sx and inv[r] = 1 / s for a first token's
// row, 1 and 1 / sx for the others (shared memory, visible to the CTA on return). The GEMV
// multiplies by inv as it does for every row: where x / s is an E4M3 tie, a code may be one
// step off the graph's (quantize_fp8_rows divides), a rounding the tolerances hold.
template <typename T>
__device__ __forceinline__ void fp8_first_rows(const u16* __restrict__ x, float sx, int m,
                                               int k, const int* __restrict__ first,
                                               float* factor, float* inv) {
  __shared__ float red[32];
  for (int r = 0; r < m; ++r) {
    float s = sx;
    if (first[r]) s = fp8_row_scale(row_amax<T>(x + (size_t)r * k, k, red));
    if (threadIdx.x == 0) {
      factor[r] = s / sx;
      inv[r] = 1.f / s;
    }
  }
  __syncthreads();
}

// FP8 weight-only in blocks (BLOCKS: qgemv_fp8b.cu's w8b entries, --quant fp8-block): w
// [N, K] e4m3 bytes again, bs [N, K / G] each row's block scales in the compute dtype, G a
// power of two from 32; x stays 16-bit. An E4M3 byte seeeemmm is a 16-bit float of the same
// sign and value times 2^-8 (fp16: exponent bias 15 against 7, 10 mantissa bits) or 2^-120
// (bf16: bias 127, 7 bits) once its low 7 bits sit right under the sign: subnormal bytes
// stay subnormal, and exact. The block's scale times 2^8 or 2^120 (exact in the dtype: the
// lowering takes scales under launch_rules.FP8B_MAX_SCALE) puts the power back in the one
// multiply that rounds q * s, as DequantizeLinear does. No E4M3 instruction: any target.
template <typename T>
struct E4m3Bits {
  static constexpr int SHIFT = T::is_bf16 ? 4 : 1;  // from the byte's place as bits 8-15
  static constexpr float UNDO = T::is_bf16 ? 1.329227995784916e36f : 256.f;  // 2^120, 2^8
};

// Bytes 0, 1 (SEL 0x1404) or 2, 3 (SEL 0x3424) of a word -> a pair of 16-bit floats, k order.
template <typename T, u32 SEL>
__device__ __forceinline__ u32 e4m3_pair(u32 w) {
  const u32 t = __byte_perm(w, 0u, SEL);  // each byte as bits 8-15 of its half
  return ((t & 0x7F007F00u) >> E4m3Bits<T>::SHIFT) | (t & 0x80008000u);
}

// A block's 16-bit scale -> the factor both halves of a pair are multiplied by.
template <typename T>
__device__ __forceinline__ u32 e4m3_scale2(u16 s) {
  const u32 h = T::from_f(T::to_f(s) * E4m3Bits<T>::UNDO);
  return h | (h << 16);
}

// 16 bytes = 16 k of one row -> 8 pairs, in k order, each q * s rounded once (+ -0 keeps it).
template <typename T>
__device__ __forceinline__ void dequant16_e4m3(const uint4& v, u32 s2, u32* out) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = fma2<T>(e4m3_pair<T, 0x1404u>(w[i]), s2, Int4<T>::NEG0);
    out[2 * i + 1] = fma2<T>(e4m3_pair<T, 0x3424u>(w[i]), s2, Int4<T>::NEG0);
  }
}

// The loop is w4_gemv's: a static register ring of D chunks a warp, predicated loads, x rows
// clamped to m - 1, pointers advanced once every D chunks, a tail chunk (K % 64) after the
// loop; the two k32 MMAs of a chunk accumulate into two sets of sums, added once at the end.
// BLOCKS: the ring also holds the two rows' block scales of each lane's 16 k (one block), and
// a chunk is four m16n8k16 MMAs, the lane's 16 k of row g (g + 8) and of x row g being, pair
// by pair, the k slots 2t, 2t + 1 and 2t + 8, 2t + 9, alternating between the sets of sums.
// FIRST (W8A8): first[r] != 0 marks x row r as a sequence's first token, rounded with a scale
// of its own (fp8_first_rows); a CTA whose rows hold none runs as without it.
template <typename T, int NT, int SK, int D, int ACT, bool F32, bool BLOCKS = false>
__device__ __forceinline__ void w8_gemv(const u16* __restrict__ x, const u8* __restrict__ w,
                                        const float* __restrict__ sw, float sx,
                                        const void* __restrict__ bias, int m, int n, int k,
                                        void* __restrict__ y,
                                        const u16* __restrict__ bs = nullptr, int gshift = 0,
                                        const int* __restrict__ first = nullptr) {
#if __CUDA_ARCH__ < 890
  if constexpr (!BLOCKS) {
    __trap();  // lower.py builds FP8 W8A8 engines for sm_89+ only
    return;
  }
#endif
  __shared__ float part[SK][NT][4][32];
  constexpr int OUT = ACT ? 8 : 16;
  constexpr int STEP = SK * 64;  // k between a warp's chunks
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int o0 = blockIdx.x * OUT;
  const int ra = min(o0 + g, n - 1);
  const int rb = ACT ? n + ra : min(o0 + g + 8, n - 1);
  const int k0 = warp * 64 + 16 * t;  // this lane's first k
  const u8* wp[2] = {w + (size_t)ra * k + k0, w + (size_t)rb * k + k0};
  const u16* sp[2] = {bs + (size_t)ra * (k >> gshift), bs + (size_t)rb * (k >> gshift)};
  int kc = k0;  // BLOCKS: this lane's first k of the chunk the pointers are at
  const u16* xp[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xp[j] = x + (size_t)min(j * 8 + g, m - 1) * k + k0;
  const float inv = 1.f / sx;
  float inv_j[NT];  // x row j * 8 + g's: inv, or a first token's own
#pragma unroll
  for (int j = 0; j < NT; ++j) inv_j[j] = inv;
  const int whole = k >> 6;
  const int mine = whole > warp ? (whole - warp + SK - 1) / SK : 0;  // whole chunks of this warp
  float acc[2][NT][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
  uint4 wv[D][2];
  u16 sv[D][2];  // BLOCKS only
  auto load = [&](uint4 (&v)[2], u16 (&s)[2], int i, bool live) {
    ld_stream_if(live, wp[0] + i * STEP, v[0]);
    ld_stream_if(live, wp[1] + i * STEP, v[1]);
    if constexpr (BLOCKS) {
      const int b = (kc + i * STEP) >> gshift;
      s[0] = live ? __ldg(sp[0] + b) : (u16)0;
      s[1] = live ? __ldg(sp[1] + b) : (u16)0;
    }
  };
  auto consume = [&](const uint4 (&v)[2], const u16 (&s)[2], int i, bool live) {
    if constexpr (BLOCKS) {
      u32 a[8], b[8];
      dequant16_e4m3<T>(v[0], e4m3_scale2<T>(s[0]), a);
      dequant16_e4m3<T>(v[1], e4m3_scale2<T>(s[1]), b);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint4 zero = make_uint4(0, 0, 0, 0);
        const uint4* p = reinterpret_cast<const uint4*>(xp[j] + i * STEP);
        const uint4 xa = live ? __ldg(p) : zero, xb = live ? __ldg(p + 1) : zero;
        const u32 xs[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
        for (int q = 0; q < 4; ++q)
          mma_dc<T>(acc[q & 1][j], acc[q & 1][j], a[2 * q], b[2 * q], a[2 * q + 1],
                    b[2 * q + 1], xs[2 * q], xs[2 * q + 1]);
      }
    } else {
#if __CUDA_ARCH__ >= 890
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        u32 X[4];
        quantize16<T>(xp[j] + i * STEP, live, inv_j[j], X);
        mma_e4m3(acc[0][j], v[0].x, v[1].x, v[0].y, v[1].y, X[0], X[1]);
        mma_e4m3(acc[1][j], v[0].z, v[1].z, v[0].w, v[1].w, X[2], X[3]);
      }
#endif
    }
  };
#pragma unroll
  for (int d = 0; d < D; ++d) load(wv[d], sv[d], d, d < mine);
  // The first-token flags are a step input, copied in before the step's first kernel: read
  // before pdl_wait, while the weights stream in.
  __shared__ float x_factor[16], x_inv[16];
  const bool own = !BLOCKS && first != nullptr &&
                   __syncthreads_or(threadIdx.x < m && first[threadIdx.x] != 0);
  pdl_trigger();
  pdl_wait();
  if (own) {
    fp8_first_rows<T>(x, sx, m, k, first, x_factor, x_inv);
#pragma unroll
    for (int j = 0; j < NT; ++j) inv_j[j] = x_inv[min(j * 8 + g, m - 1)];
  }
  int left = mine;  // chunks from the pointers on
  for (; left >= D; left -= D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      consume(wv[d], sv[d], d, true);
      load(wv[d], sv[d], d + D, d + D < left);
    }
    wp[0] += D * STEP;
    wp[1] += D * STEP;
    kc += D * STEP;
#pragma unroll
    for (int j = 0; j < NT; ++j) xp[j] += D * STEP;
  }
#pragma unroll
  for (int d = 0; d < D - 1; ++d)
    if (d < left) consume(wv[d], sv[d], d, true);
  if ((k & 63) && warp == whole % SK) {  // the tail chunk: its lanes past K load nothing
    const bool in = k0 + mine * STEP < k;
    const int i = left;  // the pointers are `mine - left` chunks on
    wv[0][0] = wv[0][1] = make_uint4(0, 0, 0, 0);
    load(wv[0], sv[0], i, in);
    consume(wv[0], sv[0], i, in);
  }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[0][j][e] += acc[1][j][e];
  tc_store<T, NT, SK, ACT, F32>(part, acc[0], o0, m, n, bias, y, 1.f, BLOCKS ? nullptr : sw,
                                own ? x_factor : nullptr);
}

// Prefill with first tokens: a CTA a row of x [rows, K] -> e4m3, each first token's row with
// its own scale; row_scale[r] gets s / sx (1 for the other rows), which cuBLASLt multiplies
// into row r of the output as its per-row x scale. A first token's row is divided by s, as
// the graph divides (x / s of a bf16 row and its own |max| / 448 lands on an E4M3 tie often
// enough that x * (1 / s) would round a few in a thousand the other way); the other rows are
// multiplied by 1 / sx as quantize_fp8 does.
template <typename T>
__device__ __forceinline__ void quantize_fp8_rows(const u16* __restrict__ x, float sx, int k,
                                                  const int* __restrict__ first,
                                                  u8* __restrict__ out,
                                                  float* __restrict__ row_scale) {
#if __CUDA_ARCH__ >= 890
  __shared__ float red[32];
  const size_t r = blockIdx.x;
  x += r * k;
  out += r * k;
  const bool own = first[r] != 0;
  const float s = own ? fp8_row_scale(row_amax<T>(x, k, red)) : sx;
  if (threadIdx.x == 0) row_scale[r] = s / sx;
  const float inv = 1.f / s;
  for (int i = threadIdx.x * 8; i < k; i += blockDim.x * 8) {
    float f[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(x + i), f);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = own ? f[e] / s : f[e] * inv;
    *reinterpret_cast<uint2*>(out + i) = make_uint2(e4m3x4(f[0], f[1], f[2], f[3]),
                                                    e4m3x4(f[4], f[5], f[6], f[7]));
  }
#else
  __trap();
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

// ---- entry points (qgemv.cu; the zero-point and offset ones in qgemv_zp.cu) -------------------
// w4[zp|off]_<dtype>_m<M>[_wide][_cs][_swiglu|_geglu|_f32] and w8[b]_<dtype>_<out>_m<M>[_...]:
// M = 8 (NT = 1) or 16 (NT = 2); _wide: 3 CTAs an SM (W4_CONFIGS); _cs: chunk scales (the
// group a multiple of 128); _f32: fp32 output; w4zp: zero points, one more argument after y
// (zp [N, K / G], u8); w4off: offsets, the same argument in the compute dtype (no _cs, no
// _wide).
#define W4_ENTRY(NAME, TY, NT, SK, D, ACT, CS, F32, MINB)                                     \
  extern "C" __global__ void __launch_bounds__(32 * SK, MINB)                                  \
  NAME(const u16* x, const u8* w, const u16* scale, const u16* pre, const void* bias, int m,   \
       int n, int k, int gshift, void* y) {                                                    \
    w4_gemv<TY, NT, SK, D, ACT, CS, SYM, F32>(x, w, scale, pre, bias, m, n, k, gshift, y,      \
                                              nullptr);                                        \
  }
#define W4ZP_ENTRY(NAME, TY, NT, SK, D, ACT, CS, F32, MINB)                                   \
  extern "C" __global__ void __launch_bounds__(32 * SK, MINB)                                  \
  NAME(const u16* x, const u8* w, const u16* scale, const u16* pre, const void* bias, int m,   \
       int n, int k, int gshift, void* y, const u8* zp) {                                      \
    w4_gemv<TY, NT, SK, D, ACT, CS, ZERO_POINTS, F32>(x, w, scale, pre, bias, m, n, k, gshift, \
                                                      y, zp);                                  \
  }
#define W4OFF_ENTRY(NAME, TY, NT, SK, D, ACT, CS, F32, MINB)                                  \
  extern "C" __global__ void __launch_bounds__(32 * SK, MINB)                                  \
  NAME(const u16* x, const u8* w, const u16* scale, const u16* pre, const void* bias, int m,   \
       int n, int k, int gshift, void* y, const u16* off) {                                    \
    w4_gemv<TY, NT, SK, D, ACT, CS, OFFSETS, F32>(x, w, scale, pre, bias, m, n, k, gshift, y,  \
                                                  off);                                        \
  }
#define W8_ENTRY(NAME, TY, NT, SK, D, ACT, F32, MINB)                                          \
  extern "C" __global__ void __launch_bounds__(32 * SK, MINB)                                  \
  NAME(const u16* x, const u8* w, const float* sw, int sx, const void* bias, int m, int n,     \
       int k, void* y, const int* first) {                                                     \
    w8_gemv<TY, NT, SK, D, ACT, F32>(x, w, sw, __int_as_float(sx), bias, m, n, k, y, nullptr,  \
                                     0, first);                                                \
  }
// w8b_...: the same names and CTAs for FP8 in blocks (module qgemv_fp8b), args (x, w, bs,
// bias, m, n, k, gshift, y)
#define W8B_ENTRY(NAME, TY, NT, SK, D, ACT, F32, MINB)                                         \
  extern "C" __global__ void __launch_bounds__(32 * SK, MINB)                                  \
  NAME(const u16* x, const u8* w, const u16* bs, const void* bias, int m, int n, int k,        \
       int gshift, void* y) {                                                                  \
    w8_gemv<TY, NT, SK, D, ACT, F32, true>(x, w, nullptr, 1.f, bias, m, n, k, y, bs, gshift);  \
  }
// w4g[zp|off]_<dtype>[_swiglu|_geglu|_f32]: the small-M GEMM, with the GEMV's arguments, then
// the split-K partials and tile counters (w4gzp, w4goff: zp or off last); S x (8 NT + 1) x 256
// bytes of dynamic
// shared memory (launch_rules.w4_gemm_launch).
#define W4G_ENTRY(NAME, TY, NW, NT, S, D, MINB, ACT, F32, WG)                                  \
  extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                  \
  NAME(const u16* x, const u8* w, const u16* scale, const u16* pre, const void* bias, int m,   \
       int n, int k, int gshift, void* y, float* part, int* arrived) {                         \
    w4_gemm<TY, NW, NT, S, D, ACT, SYM, F32, WG>(x, w, scale, pre, bias, m, n, k, gshift, y,   \
                                                 nullptr, part, arrived);                      \
  }
#define W4GZP_ENTRY(NAME, TY, NW, NT, S, D, MINB, ACT, F32, WG)                                \
  extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                  \
  NAME(const u16* x, const u8* w, const u16* scale, const u16* pre, const void* bias, int m,   \
       int n, int k, int gshift, void* y, float* part, int* arrived, const u8* zp) {           \
    w4_gemm<TY, NW, NT, S, D, ACT, ZERO_POINTS, F32, WG>(x, w, scale, pre, bias, m, n, k,      \
                                                         gshift, y, zp, part, arrived);        \
  }
#define W4GOFF_ENTRY(NAME, TY, NW, NT, S, D, MINB, ACT, F32, WG)                               \
  extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                  \
  NAME(const u16* x, const u8* w, const u16* scale, const u16* pre, const void* bias, int m,   \
       int n, int k, int gshift, void* y, float* part, int* arrived, const u16* off) {         \
    w4_gemm<TY, NW, NT, S, D, ACT, OFFSETS, F32, WG>(x, w, scale, pre, bias, m, n, k, gshift,  \
                                                     y, off, part, arrived);                   \
  }
#define W4G_SET(ENTRY, BASE, TY, NW, NT, S, D, MINB, WG)                                       \
  ENTRY(BASE, TY, NW, NT, S, D, MINB, 0, false, WG)                                            \
  ENTRY(BASE##_swiglu, TY, NW, NT, S, D, MINB, 1, false, WG)                                   \
  ENTRY(BASE##_geglu, TY, NW, NT, S, D, MINB, 2, false, WG)                                    \
  ENTRY(BASE##_f32, TY, NW, NT, S, D, MINB, 0, true, WG)
#define W4_SET_PLAIN(ENTRY, BASE, TY, NT, SK, D, MB)                                           \
  ENTRY(BASE, TY, NT, SK, D, 0, false, false, MB)                                              \
  ENTRY(BASE##_swiglu, TY, NT, SK, D, 1, false, false, MB)                                     \
  ENTRY(BASE##_geglu, TY, NT, SK, D, 2, false, false, MB)                                      \
  ENTRY(BASE##_f32, TY, NT, SK, D, 0, false, true, MB)
#define W4_SET(ENTRY, BASE, TY, NT, SK, D, MB)                                                 \
  W4_SET_PLAIN(ENTRY, BASE, TY, NT, SK, D, MB)                                                 \
  ENTRY(BASE##_cs, TY, NT, SK, D, 0, true, false, MB)                                          \
  ENTRY(BASE##_cs_swiglu, TY, NT, SK, D, 1, true, false, MB)                                   \
  ENTRY(BASE##_cs_geglu, TY, NT, SK, D, 2, true, false, MB)                                    \
  ENTRY(BASE##_cs_f32, TY, NT, SK, D, 0, true, true, MB)
#define W8_SET(ENTRY, PFX, DT, TY, M, NT, SK, D, MB)                                          \
  ENTRY(PFX##_##DT##_##DT##_m##M, TY, NT, SK, D, 0, false, MB)                                  \
  ENTRY(PFX##_##DT##_f32_m##M, TY, NT, SK, D, 0, true, MB)                                     \
  ENTRY(PFX##_##DT##_##DT##_m##M##_swiglu, TY, NT, SK, D, 1, false, MB)                         \
  ENTRY(PFX##_##DT##_##DT##_m##M##_geglu, TY, NT, SK, D, 2, false, MB)

// (warps splitting K SK, chunks in flight a warp D, CTAs an SM MB) from the sweep of
// bench/kernels/qgemv.py on the H100 (bench/results/qgemv.md). INT4: 8 warps, 1 chunk, 2 CTAs
// an SM (128 registers); up to 8 x rows also (_wide) 3 CTAs an SM (80 registers) for GEMMs of
// more tiles than 2 CTAs an SM hold at once (launch_rules picks it): one wave of 3 rather than
// 1.5 of 2. FP8: 8 warps, 2 chunks, 2 CTAs an SM; for GEMMs of more tiles than that holds,
// _wide (3 CTAs an SM; 1 chunk at 16 rows) where 3 an SM hold them all, and up to 8 rows
// _w16 (16 warps a CTA, 2 an SM) past that. launch_rules.QGEMV_WARPS must agree.
#define W4_CONFIGS(ENTRY, PFX, DT, TY)                                                         \
  W4_SET(ENTRY, PFX##_##DT##_m8, TY, 1, 8, 1, 2)                                               \
  W4_SET(ENTRY, PFX##_##DT##_m8_wide, TY, 1, 8, 1, 3)                                          \
  W4_SET(ENTRY, PFX##_##DT##_m16, TY, 2, 8, 1, 2)
// With offsets: the same, without chunk scales (the offsets join each pair's dequantization)
// and without _wide: at its 80 registers it spills (108 bytes), and ran 0.95x (qkv) to
// 0.65x (o) the 2-CTA kernel's speed on the H100 (bench/results/qgemv.md).
#define W4OFF_CONFIGS(ENTRY, PFX, DT, TY)                                                      \
  W4_SET_PLAIN(ENTRY, PFX##_##DT##_m8, TY, 1, 8, 1, 2)                                         \
  W4_SET_PLAIN(ENTRY, PFX##_##DT##_m16, TY, 2, 8, 1, 2)
// The small-M GEMM (launch_rules.W4G_WARPS, _TILES, _STAGES): 8 warps, 4 x tiles of 8 rows,
// 3 x stages, 2 weight chunks in flight a warp, 2 CTAs an SM (the sweep of
// bench/kernels/qgemv.py: bench/results/qgemv.md).
#define W4G_CONFIG(ENTRY, PFX, DT, TY) W4G_SET(ENTRY, PFX##_##DT, TY, 8, 4, 3, 2, 2, false)
// sm_90a: the same on wgmma (w4gw*_<dtype>_x<MT>: launch_rules.w4_gemm_launch), 8 warps, MT =
// 64 or 128 x rows; (x stages, chunks in flight a warp, CTAs an SM) from the sweep of
// bench/kernels/qgemv.py (bench/results/qgemv.md).
#ifdef SM90A
#define W4GW_CONFIG(ENTRY, PFX, DT, TY)                                                        \
  W4G_SET(ENTRY, PFX##_##DT##_x64, TY, 8, 8, 4, 2, 1, true)                                    \
  W4G_SET(ENTRY, PFX##_##DT##_x128, TY, 8, 16, 3, 2, 1, true)
#else
#define W4GW_CONFIG(ENTRY, PFX, DT, TY)
#endif
#define W8_CONFIGS(ENTRY, PFX, DT, TY)                                                         \
  W8_SET(ENTRY, PFX, DT, TY, 8, 1, 8, 2, 2)                                                    \
  W8_SET(ENTRY, PFX, DT, TY, 8_wide, 1, 8, 2, 3)                                               \
  W8_SET(ENTRY, PFX, DT, TY, 8_w16, 1, 16, 2, 2)                                               \
  W8_SET(ENTRY, PFX, DT, TY, 16, 2, 8, 2, 2)                                                   \
  W8_SET(ENTRY, PFX, DT, TY, 16_wide, 2, 8, 1, 3)
