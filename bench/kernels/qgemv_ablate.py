"""What holds the INT4 decode GEMV (w4_gemv, kernels/qgemv.cuh) under the HBM roofline: the
shipped kernel timed against variants of itself with parts taken out or changed. Timing only:
most variants compute wrong results on purpose.

    PYTHONPATH=<llmc checkout paths> python3 bench/kernels/qgemv_ablate.py [--variants a,b]

Each variant is the kernel's own source with a few lines patched in here (the patches assert
that the lines they replace still exist), compiled per (chunks in flight a warp D, CTAs an SM)
with 8 warps splitting K, group 128 with chunk scales, no AWQ 1 / s, one row of x, bf16; timed
as bench/kernels/qgemv.py times the shipped one (CUDA graph, weights rotated over >= 256 MiB),
% of 3.35 TB/s on the kernel's bytes. FP8 (w8_gemv, 2 chunks in flight) is timed beside it:
the same loop, the same bytes a chunk, no dequantization. Results: bench/results/qgemv.md.
"""
from __future__ import annotations

import argparse
import math

import torch
from gemm import CALLS, DATASHEET_BW, ROTATE_BYTES, graph_time

from llmc.plugins import compiler
from llmc.plugins import launch_rules as lr
from llmc.plugins.launch import DevPtr, Functions

SHAPES = (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
          ("down", 14336, 4096))
CONFIGS = ((1, 2), (2, 2), (3, 2), (4, 2), (1, 3), (2, 3))   # (D, CTAs an SM)
VARIANTS = {   # name: (macros, what it shows)
    "shipped": ((), "the kernel as it is"),
    "no-correction": (("NOCORR",), "without the x-side correction MMAs (-136 sum x)"),
    "loads-only": (("NOMATH",), "weight and scale loads alone: no x, no dequantization, no MMA"),
    "loads+x": (("NOMATH", "XLOADS"), "loads-only plus x's four 16-byte loads a chunk"),
    "x-in-smem": (("XSMEM",), "x copied to shared memory once a CTA, read from there"),
    "sub": (("NOCORR", "SUB"), "correct: q = (128 + u) - 136 a pair (one fma2) instead of the "
            "correction MMAs"),
    "words": (("WORDS",), "each chunk word by word: 8 dequantized registers live, not 32"),
    "contiguous": (("CONTIG",), "warp w takes K chunks [w K/8, (w+1) K/8), not w, w+8, ..."),
    "loads-only-contiguous": (("NOMATH", "CONTIG"), "both"),
}

# The chunk word by word ("words"): a 16-byte x load, its two correction MMAs, a word of each row
# offset and its two weight MMAs, in turn.
WORDS = r"""
template <typename T, int NT, int ZP>
__device__ __forceinline__ void w4_chunk_words(const uint4 (&v)[2], const u32 (&s)[2],
    const u32 (&z)[2], const u16* const (&xp)[NT], const u16* pp, bool live, bool with_pre,
    const Int4Regs<T>& c, float (&acc)[NT][4]) {
  const u32 wa[4] = {v[0].x, v[0].y, v[0].z, v[0].w}, wb[4] = {v[1].x, v[1].y, v[1].z, v[1].w};
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
  float c0[NT][4], c1[NT][4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    u32 A[4], B[4];
    offset8(wa[q], c.magic, A);
    offset8(wb[q], c.magic, B);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint4 a = live ? __ldg(reinterpret_cast<const uint4*>(xp[j]) + q)
                           : make_uint4(0, 0, 0, 0);
      mma_dc<T>(c0[j], q ? c0[j] : zero, c.nb[0], c.nb[1], c.nb[2], c.nb[3], a.x, a.y);
      mma_dc<T>(c1[j], q ? c1[j] : zero, c.nb[0], c.nb[1], c.nb[2], c.nb[3], a.z, a.w);
      mma_dc<T>(c0[j], c0[j], A[0], B[0], A[1], B[1], a.x, a.y);
      mma_dc<T>(c1[j], c1[j], A[2], B[2], A[3], B[3], a.z, a.w);
    }
  }
  const float fa = T::to_f((u16)s[0]), fb = T::to_f((u16)s[1]);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    acc[j][0] = fmaf(fa, c0[j][0] + c1[j][0], acc[j][0]);
    acc[j][1] = fmaf(fa, c0[j][1] + c1[j][1], acc[j][1]);
    acc[j][2] = fmaf(fb, c0[j][2] + c1[j][2], acc[j][2]);
    acc[j][3] = fmaf(fb, c0[j][3] + c1[j][3], acc[j][3]);
  }
}
"""

# (the line in qgemv.cuh, what it becomes); each must occur in the source
PATCHES = [
    ('static_assert(!(CS && ZP == OFFSETS), "offsets are added as each pair is dequantized");',
     r"""\0
#ifdef NOMATH
  { u32 h = v[0].x ^ v[0].y ^ v[0].z ^ v[0].w ^ v[1].x ^ v[1].y ^ v[1].z ^ v[1].w ^ s[0] ^ s[1];
#ifdef XLOADS
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(xp[0]) + q);
      h ^= a.x ^ a.y ^ a.z ^ a.w;
    }
#endif
    acc[0][0] += __int_as_float(h & 0x007fffffu);
    return;
  }
#endif"""),
    ("const uint4 a = live ? __ldg(xv + q) : make_uint4(0, 0, 0, 0);",
     "#ifdef XSMEM\n      const uint4 a = live ? xv[q] : make_uint4(0, 0, 0, 0);\n#else\n"
     "      \\0\n#endif"),
    ("    if constexpr (CS) {\n      mma_dc<T>(xo[j], zero,",
     "#ifdef NOCORR\n    for (int e = 0; e < 4; ++e) xo[j][e] = xo1[j][e] = 0.f;\n"
     "    if constexpr (false) {\n#else\n    if constexpr (CS) {\n#endif\n"
     "      mma_dc<T>(xo[j], zero,"),
    ("// Any architecture: a CTA is SK warps over 16 weight rows", WORDS + "\\0"),
    ("    offset8(v[1].z, c.magic, B + 8); offset8(v[1].w, c.magic, B + 12);\n",
     "\\0#ifdef SUB\n#pragma unroll\n    for (int i = 0; i < 16; ++i) {\n"
     "      A[i] = fma2<T>(A[i], Int4<T>::ONE, nb[0]);\n"
     "      B[i] = fma2<T>(B[i], Int4<T>::ONE, nb[1]);\n"
     "    }\n#endif\n"),
    ("    w4_chunk<T, NT, CS, ZP>(wv[d], sv[d], zv[d], xi, pp + i * STEP, live, with_pre, c, acc);",
     "#ifdef WORDS\n    w4_chunk_words<T, NT, ZP>(wv[d], sv[d], zv[d], xi, pp + i * STEP, live, "
     "with_pre, c, acc);\n#else\n\\0\n#endif"),
    ("  constexpr int STEP = SK * 128;      // k between a warp's chunks",
     "#ifdef CONTIG\n  constexpr int STEP = 128;\n#else\n\\0\n#endif"),
    ("  const int k0 = warp * 128 + 32 * t;  // this lane's first k",
     "#ifdef CONTIG\n  const int k0 = warp * ((k >> 7) / SK) * 128 + 32 * t;\n#else\n\\0\n#endif"),
    ("  const int whole = k >> 7;\n  const int mine = whole > warp ? "
     "(whole - warp + SK - 1) / SK : 0;  // whole chunks of this warp",
     "#ifdef CONTIG\n  const int whole = k >> 7;\n  const int mine = whole / SK;\n"
     "#else\n\\0\n#endif"),
    ("  for (int d = 0; d < D; ++d) load(d, d, d < mine);\n  pdl_trigger();\n  pdl_wait();\n",
     "\\0#ifdef XSMEM\n  __shared__ __align__(16) u16 xs[14336];\n"
     "  for (int i = threadIdx.x * 8; i < k; i += 32 * SK * 8)\n"
     "    *reinterpret_cast<uint4*>(xs + i) = __ldg(reinterpret_cast<const uint4*>(x + i));\n"
     "  __syncthreads();\n  xp[0] = xs + k0;\n#endif\n"),
]


def patched_source() -> str:
    src = (compiler.KERNEL_DIR / "qgemv.cuh").read_text()
    for old, new in PATCHES:
        assert src.count(old) == 1, f"qgemv.cuh changed; patch this script: {old!r}"
        src = src.replace(old, new.replace("\\0", old))
    return src


def functions(arch: str, names) -> Functions:
    src = patched_source()
    cubins = {}
    for name in names:
        defines = "".join(f"#define {m}\n" for m in VARIANTS[name][0])
        entries = "".join(f"W4_ENTRY(w4_{d}_{mb}, BF16, 1, 8, {d}, 0, true, false, {mb})\n"
                          for d, mb in CONFIGS)
        if name == "shipped":
            entries += "W8_ENTRY(w8_2_2, BF16, 1, 8, 2, 0, false, 2)\n"
        cubins[name] = compiler._compile_cached(
            f"qgemv_ablate_{name}", arch, False,
            "#define QGEMV_VARIANTS\n" + defines + src + entries)
    return Functions(arch, cubins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args = ap.parse_args()
    names = args.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    names = ["shipped"] + [n for n in names if n != "shipped"]
    cc = torch.cuda.get_device_capability()
    f = functions(f"sm_{cc[0]}{cc[1]}" + ("a" if cc[0] == 9 else ""), names)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    bf = torch.bfloat16
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; NVRTC "
          f"{'.'.join(map(str, compiler.nvrtc_version()))}; one row of x, % of 3.35 TB/s\n")
    print("| GEMM | variant | " + " | ".join(f"D={d}, {mb} CTAs an SM" for d, mb in CONFIGS)
          + " |\n|---|---|" + "---:|" * len(CONFIGS))
    for shape, k, n in SHAPES:
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k // 2)))
        calls = copies * math.ceil(CALLS / copies)
        w4 = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
              for _ in range(copies)]
        s4 = torch.rand(n, k // 128, device="cuda").to(bf) * 0.01
        x = torch.randn(1, k, device="cuda", dtype=bf)
        y = torch.empty(1, n, device="cuda", dtype=bf)
        grid = (math.ceil(n / 16), 1, 1)
        b4 = n * k // 2 + s4.numel() * 2 + k * 2 + n * 2

        def call(module, kernel, w, args, tail=()):
            ln = lr.Launch(module, kernel, grid, (256, 1, 1), pdl=True)
            a = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), *args, DevPtr(y.data_ptr()), *tail]
            return lambda: f.launch(ln, a, stream())

        int4_args = [DevPtr(s4.data_ptr()), DevPtr(0), DevPtr(0), 1, n, k,
                     lr.int4_group_shift(128)]
        for name in names:
            cells = []
            for d, mb in CONFIGS:
                t = graph_time([call(name, f"w4_{d}_{mb}", w4[i % copies], int4_args)
                                for i in range(calls)])
                cells.append(f"{b4 / t / DATASHEET_BW:.0%}")
            print(f"| {shape} | {name} | " + " | ".join(cells) + " |", flush=True)
        del w4
        w8 = [torch.randint(0, 256, (n, k), device="cuda", dtype=torch.uint8) & 0x77
              for _ in range(copies // 2 + 1)]
        s8 = torch.rand(n, device="cuda") * 1e-3
        t = graph_time([call("shipped", "w8_2_2", w8[i % len(w8)],
                             [DevPtr(s8.data_ptr()), lr.float_bits(0.05), DevPtr(0), 1, n, k],
                             [DevPtr(0)])   # no first-token rows
                        for i in range(calls)])
        print(f"| {shape} | FP8 w8_gemv (D=2, 2 CTAs an SM) | "
              f"{(n * k + n * 4 + k * 2 + n * 2) / t / DATASHEET_BW:.0%} |", flush=True)
        del w8
        torch.cuda.empty_cache()
    print("\n" + "\n".join(f"- {name}: {VARIANTS[name][1]}" for name in names))


if __name__ == "__main__":
    main()
