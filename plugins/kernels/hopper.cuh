// Hopper (sm_90a) primitives: the bulk tensor copy engine (TMA) completing on mbarriers, and
// warpgroup MMAs (wgmma) reading shared memory through matrix descriptors. Used by
// paged_attention_sm90.cu, qgemv.cuh's INT4 GEMM and moe.cuh's grouped GEMMs; every function
// here needs sm_90a, so callers compile them only under SM90A (defined below when NVRTC
// targets sm_90a).
#pragma once
#include "common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SM90A 1
#endif

typedef unsigned long long u64;

// A CUtensorMap as the driver encodes it (cuTensorMapEncodeTiled): 128 opaque bytes, passed
// by value as a __grid_constant__ kernel parameter so the copy engine reads it from the
// parameter space.
struct alignas(64) TmaDesc { u64 v[16]; };

// ---- mbarriers: a phase completes when its arrivals are in and its expected bytes landed ----
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
// Make the initialised barriers visible to the copy engine (the async proxy).
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// One arrival that also announces `bytes` the copies of this phase will deliver.
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
               :: "r"(bar), "r"(bytes) : "memory");
}
// Wait until the phase of this parity has completed (parity 1 before any phase completed
// returns at once: the "previous" phase counts as done, so a producer's first wait on a free
// slot does not block).
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}

// ---- TMA: a 2-D box of a tensor map into shared memory, completing on `bar` ------------------
__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaDesc* map, int c0, int c1,
                                            u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n"
      :: "r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(bar) : "memory");
}

// Ordinary shared-memory stores that the tensor cores read next (wgmma operands) must be
// ordered before them for the async proxy.
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Named barrier over `n` threads (id 0 is __syncthreads').
__device__ __forceinline__ void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}

// Arrive at named barrier `id` (expecting `n` threads in all) without waiting.
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}

// Four 8 x 8 matrices of 16-bit values, each held as an MMA fragment (a lane's register: row
// lane / 4, columns 2 (lane % 4) and + 1), stored transposed: row c of matrix i (its address
// from lane 8 i + c, 16 bytes) gets column c of the fragment, its 8 rows in order.
__device__ __forceinline__ void stsm_x4_trans(u32 addr, const u32* r) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n"
               :: "r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}

// Register budget per thread of a warpgroup; all its threads run it (sync.aligned).
template <int N> __device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(N));
}
template <int N> __device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(N));
}

// ---- wgmma ---------------------------------------------------------------------------------
// Shared-memory matrix descriptor, 128-byte swizzle: the tile is made of atoms of 8 rows of
// 128 bytes (1024 bytes, 1024-aligned), 16-byte chunk c of row r stored at chunk c ^ (r % 8):
// the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B. lbo / sbo in bytes (the PTX ISA's
// "leading" and "stride" dimension byte offsets): K-major, sbo = 1024 between 8-row groups and
// lbo unused; MN-major, lbo between 64-element column atoms and sbo between 8-row groups.
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) |
         (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Pin accumulator registers at this point of the program: the compiler may not move their
// reads or writes across it (wgmma writes them asynchronously, between issue and wait).
template <int N> __device__ __forceinline__ void reg_fence(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i]) :: "memory");
}

// A wgmma of shape SHAPE (a string, "m64n128k16") on 16-bit T, fp32 accumulators: the PTX is
// the same for fp16 and bf16 but for the operand types, so one asm text serves both. PRED:
// the operand number of `acc` (scale-d: 0 overwrites the accumulators); D: the accumulators'
// register list; TAIL: the operands after them; OUTS: their constraints (LLMC_WG_OUT*), then
// the inputs'.
#define LLMC_WGMMA(T, SHAPE, PRED, D, TAIL, OUTS, ...)                                        \
  if constexpr (T::is_bf16)                                                                   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                           \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32.bf16.bf16 " D ", " TAIL ";\n}\n"  \
                 : OUTS : __VA_ARGS__);                                                         \
  else                                                                                        \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                           \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32.f16.f16 " D ", " TAIL ";\n}\n"    \
                 : OUTS : __VA_ARGS__)
// The accumulator registers of m64nN: N / 2 a thread, d[0 .. N / 2), as operands 0 .. N / 2 - 1.
#define LLMC_WG_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define LLMC_WG_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define LLMC_WG_D128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define LLMC_WG_OUT32 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define LLMC_WG_OUT64 LLMC_WG_OUT32, \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define LLMC_WG_OUT128 LLMC_WG_OUT64, \
    "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
    "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
    "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
    "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
    "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
    "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
    "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
    "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// D(64 x 128) += A x B, A and B from shared memory (K-major), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void wgmma_ss128(float* d, unsigned long long a, unsigned long long b, int acc) {
  LLMC_WGMMA(T, "m64n128k16", "%66", LLMC_WG_D64, "%64, %65, p, 1, 1, 0, 0", LLMC_WG_OUT64,
             "l"(a), "l"(b), "r"(acc));
}
// D(64 x 256) += A x B, A and B from shared memory (K-major), fp32 accumulators (the MoE
// GEMM's wide tiles).
template <typename T>
__device__ __forceinline__ void wgmma_ss256(float* d, unsigned long long a, unsigned long long b, int acc) {
  LLMC_WGMMA(T, "m64n256k16", "%130", LLMC_WG_D128, "%128, %129, p, 1, 1, 0, 0",
             LLMC_WG_OUT128, "l"(a), "l"(b), "r"(acc));
}
// D(64 x N) += A x B, A from registers (the m16n8k16 A fragment of each warp's 16 rows), B
// from shared memory: N-major (transposed, TB = 1: attention's V) or K-major (TB = 0: the
// INT4 GEMM's x rows); 64 x 256 for the FP8 MoE GEMM's widest tiles (256 positions a tile).
template <typename T, int TB>
__device__ __forceinline__ void wgmma_rs64(float* d, const u32* a, unsigned long long b, int acc) {
  LLMC_WGMMA(T, "m64n64k16", "%37", LLMC_WG_D32, "{%32, %33, %34, %35}, %36, p, 1, 1, %38",
             LLMC_WG_OUT32, "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(acc),
             "n"(TB));
}
template <typename T, int TB>
__device__ __forceinline__ void wgmma_rs128(float* d, const u32* a, unsigned long long b, int acc) {
  LLMC_WGMMA(T, "m64n128k16", "%69", LLMC_WG_D64, "{%64, %65, %66, %67}, %68, p, 1, 1, %70",
             LLMC_WG_OUT64, "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(acc),
             "n"(TB));
}
template <typename T, int TB>
__device__ __forceinline__ void wgmma_rs256(float* d, const u32* a, unsigned long long b, int acc) {
  LLMC_WGMMA(T, "m64n256k16", "%133", LLMC_WG_D128,
             "{%128, %129, %130, %131}, %132, p, 1, 1, %134", LLMC_WG_OUT128,
             "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(acc), "n"(TB));
}

template <typename T, int N, int TB>
__device__ __forceinline__ void wgmma_rs(float* d, const u32* a, unsigned long long b, int acc) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma_rs: N of 64, 128 or 256");
  if constexpr (N == 64) wgmma_rs64<T, TB>(d, a, b, acc);
  else if constexpr (N == 128) wgmma_rs128<T, TB>(d, a, b, acc);
  else wgmma_rs256<T, TB>(d, a, b, acc);
}
