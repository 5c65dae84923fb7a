"""A wgmma reads its A operand's registers and reads and writes its accumulators until a
wgmma.wait_group covers it. PTX leaves touching them earlier undefined, and ptxas can accept
it without a warning: the results are then wrong on the GPU, sometimes. So the sm_90a SASS of
every wgmma kernel (the INT4 small-M GEMM's w4gw entries, the Hopper prefill attention, the
MoE GEMMs' wgmma tiles, the FP8 experts' with A in registers) is
checked on the CPU: between an HGMMA and the next WARPGROUP.DEPBAR, along any path (the
loop's back edge included), no instruction but another HGMMA may write its A registers or
use its accumulators.

NVRTC compiles (pip wheel, no GPU); nvdisasm (the nvidia-cuda-nvdisasm wheel) disassembles."""
import re
import subprocess

import pytest

pytest.importorskip("cuda.bindings.nvrtc")
pathfinder = pytest.importorskip("cuda.pathfinder")

from llmc.plugins import compiler  # noqa: E402

NVDISASM = pathfinder.find_nvidia_binary_utility("nvdisasm")
pytestmark = pytest.mark.skipif(NVDISASM is None,
                                reason="nvdisasm not found (pip install nvidia-cuda-nvdisasm)")

# HGMMA.64xNx16: accumulators R(d) .. R(d + N / 2 - 1) a thread, A in R(a) .. R(a + 3) or
# in shared memory (gdesc)
HGMMA = re.compile(r"HGMMA\.64x(\d+)x16\S*\s+R(\d+),\s*(?:R(\d+)|gdesc)")
BRANCH = re.compile(r"BRA\s+`\((\.L\w+)\)")
WRITE = re.compile(r"^(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s+R(\d+)\b")
NOT_A_WRITE = ("ST", "RED", "ATOM")   # their first register operand is read


def sass(cubin: bytes, tmp_path) -> str:
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    return subprocess.run([NVDISASM, "-c", str(path)], check=True, capture_output=True,
                          text=True).stdout


def written(instruction: str) -> set[int]:
    """The registers an instruction writes: its first operand, wider for 64/128-bit results."""
    w = WRITE.match(instruction)
    if not w or w.group(1).startswith(NOT_A_WRITE):
        return set()
    op, first = w.group(1), int(w.group(2))
    return set(range(first, first + (4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op)
                                     else 1)))


def used(instruction: str) -> set[int]:
    """Every register an instruction names (a .64 operand is a pair)."""
    return {r for n, wide in re.findall(r"\bR(\d+)(\.64)?\b", instruction)
            for r in range(int(n), int(n) + (2 if wide else 1))}


def hgmma_hazards(text: str) -> tuple[dict[str, tuple[int, int]], list[tuple[str, ...]]]:
    """({function: (HGMMAs, of them with A in registers)}, [(function, HGMMA, the instruction
    that touches its registers before the next WARPGROUP.DEPBAR, "A" or "accumulators")])."""
    parts = re.split(r"\.text\.(\w+):", text)
    counts, hazards = {}, []
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [re.sub(r"/\*[0-9a-f]+\*/", "", ln).strip().rstrip(" ;") for ln in
                 body.splitlines()]
        lines = [ln for ln in lines if ln and (ln.startswith(".L") or not ln.startswith("."))]
        labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.fullmatch(r"\.L\w+:", ln)}
        n = n_rs = 0
        for i, ln in enumerate(lines):
            m = HGMMA.search(ln)
            if not m:
                continue
            acc = set(range(int(m.group(2)), int(m.group(2)) + int(m.group(1)) // 2))
            a = set(range(int(m.group(3)), int(m.group(3)) + 4)) if m.group(3) else set()
            n, n_rs = n + 1, n_rs + bool(a)
            todo, seen = [i + 1], set()
            while todo:
                j = todo.pop()
                while j < len(lines) and j not in seen:
                    seen.add(j)
                    here = lines[j]
                    if "WARPGROUP.DEPBAR" in here:
                        break
                    if "HGMMA" not in here:
                        kind = ("A" if written(here) & a else
                                "accumulators" if used(here) & acc else None)
                        if kind:
                            hazards.append((name, ln, here, kind))
                            break
                    b = BRANCH.search(here)
                    unconditional = not here.startswith("@")
                    if b and b.group(1) in labels:
                        todo.append(labels[b.group(1)])
                    if (b and unconditional) or (here.startswith("EXIT") and unconditional):
                        break
                    j += 1
        if n:
            counts[name] = (n, n_rs)
    return counts, hazards


# The loop of the INT4 GEMM's (64 x rows, 3 stages, D = 1, 2 CTAs an SM) variant before its fix
# (NVRTC 13.0, sm_90a; abridged): the next chunk's dequantization writes R56, which the last
# chunk's HGMMA still reads, before the DEPBAR that waits for it.
HAZARD = """
        .text.w4gw_d1:
        .L_x_227:
        /*0f30*/   SHF.R.U32.HI R20, RZ, 0x4, R16.reuse ;
        /*0f40*/   SHF.R.U32.HI R56, RZ, 0xc, R16 ;
        /*0f50*/   HADD2.BF16_V2 R72, R23, R114.reuse ;
        /*1200*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*1210*/   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*1220*/   @P0 LDG.E.NA.128.CONSTANT R16, desc[UR10][R90.64] ;
        /*1300*/   WARPGROUP.ARRIVE ;
        /*1310*/   HGMMA.64x64x16.F32.BF16 R24, R56, gdesc[UR16], R24, gsb0 ;
        /*1320*/   @P0 BRA `(.L_x_227) ;
        /*1330*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*1340*/   EXIT ;
"""


def test_the_check_follows_the_loop_back_to_the_write():
    counts, hazards = hgmma_hazards(HAZARD)
    assert counts == {"w4gw_d1": (1, 1)}
    assert [h[2:] for h in hazards] == [("SHF.R.U32.HI R56, RZ, 0xc, R16", "A")]
    # the write after the wait, or no way back to it: none
    assert not hgmma_hazards(HAZARD.replace("R56, RZ, 0xc", "R99, RZ, 0xc"))[1]
    assert not hgmma_hazards(HAZARD.replace("@P0 BRA `(.L_x_227)", "NOP"))[1]
    # a 128-bit load into R56-R59 writes R59 too
    wide = HAZARD.replace("SHF.R.U32.HI R56, RZ, 0xc, R16", "LDS.128 R56, [R3]")
    assert hgmma_hazards(wide.replace("R24, R56, gdesc", "R24, R59, gdesc"))[1]


def test_the_check_finds_an_accumulator_used_before_the_wait():
    # R24-R55 are the 64 x 64 accumulators: read (a store of them) before the DEPBAR
    early = HAZARD.replace("@P0 BRA `(.L_x_227)", "STG.E desc[UR4][R2.64+0x8], R26")
    assert [h[2:] for h in hgmma_hazards(early)[1]] == [
        ("STG.E desc[UR4][R2.64+0x8], R26", "accumulators")]
    # A from shared memory (two descriptors): accumulators alone are checked
    ss = early.replace("R24, R56, gdesc[UR16]", "R24, gdesc[UR8], gdesc[UR16]")
    counts, hazards = hgmma_hazards(ss)
    assert counts == {"w4gw_d1": (1, 0)} and [h[3] for h in hazards] == ["accumulators"]


def variants_cubin(entries: str) -> bytes:
    """qgemv's source with its own entry points replaced by `entries` (as the benchmark's
    sweep compiles its variants)."""
    return compiler._compile_cached("qgemv_variants", "sm_90a", False,
                                    "#define QGEMV_VARIANTS\n" + compiler.source("qgemv")
                                    + entries)


@pytest.mark.slow
@pytest.mark.parametrize("module,register_a", (("qgemv", True), ("qgemv_zp", True),
                                               ("paged_attention_sm90", True), ("moe", False),
                                               ("moe_fp8b", True)))
def test_shipped_wgmma_kernels_leave_their_registers_alone(module, register_a, tmp_path):
    # both dtypes, as compile_all compiles them (tests/plugins/test_compile.py: the same cubin)
    counts, hazards = hgmma_hazards(sass(compiler.compile_module(module, "sm_90a"), tmp_path))
    assert counts, f"{module} has no HGMMA: is it still a wgmma kernel?"
    # each has register-A wgmma (INT4, the FP8 experts' MoE GEMM: all of them), or none (the
    # 16-bit MoE GEMM: A and B in shared memory)
    assert all(bool(rs) == register_a for _, rs in counts.values()), counts
    assert not hazards, hazards[:3]


@pytest.mark.slow
@pytest.mark.parametrize("rows,stages,chunks,ctas", ((64, 3, 1, 2), (128, 3, 1, 1),
                                                     (64, 4, 2, 1), (128, 3, 3, 1)))
def test_int4_gemm_launches_leave_wgmma_registers_alone(rows, stages, chunks, ctas, tmp_path):
    """Any chunks in flight (D), not only the shipped 2: with D odd the kernel's loop body is
    2D steps, so consecutive chunks' fragments are distinct registers (kernels/qgemv.cuh)."""
    entry = (f"W4G_ENTRY(w4gw_v, BF16, 8, {rows // 8}, {stages}, {chunks}, {ctas}, 0, false, "
             "true)\n")
    counts, hazards = hgmma_hazards(sass(variants_cubin(entry), tmp_path))
    assert counts["w4gw_v"][1] > 0
    assert not hazards, hazards[:3]
