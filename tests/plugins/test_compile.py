"""Every kernel module compiles with NVRTC (pip wheel, no GPU) for every target arch, and
holds every entry point the launch rules can name.

The cubins are compiled once for the session (compile_all, in parallel threads): NVRTC is the
whole cost of this file, so each test asserts on that one set."""
import pytest

pytest.importorskip("cuda.bindings.nvrtc")

from llmc.devices import MAX_SMEM_OPTIN  # noqa: E402
from llmc.plugins import attention_plan as ap  # noqa: E402
from llmc.plugins import compiler  # noqa: E402
from llmc.plugins import launch_rules as lr  # noqa: E402


def _entry_names(dtypes=tuple(lr.DTYPES)):
    names = set()
    for dt in dtypes:
        for n in (64, 63):
            for kind in ("rmsnorm", "layernorm"):
                for res in (False, True):
                    names.add(lr.norm_launch(1, n, dt, kind, res))
            names.add(lr.gated_launch(1, n, dt, "swiglu", 1))
            names.add(lr.gated_launch(1, n, dt, "geglu", 1))
            names.add(lr.swiglu2_launch(1, n, dt))
            for shared in (False, True):
                names.add(lr.moe_combine_launch(3, n, 2, dt, shared))
            names.add(lr.gelu_launch(n, dt, "tanh", 1))
            names.add(lr.gelu_launch(n, dt, "none", 1))
            names.add(lr.embedding_launch(1, n, dt))
            names.add(lr.embedding_launch(1, n, dt, scaled=True))
            names.add(lr.gather_rows_launch(1, n, dt))
            names.add(lr.cast_launch(n, dt, 1))
            names.add(lr.add_launch(n, dt, 1))
        for m in lr.GEMV_MS:
            for n in (64, 48, 32):   # on 1 SM: 4 tiles (_w32 from 3 rows on), 3 (_wide), 2
                names.add(lr.gemv_launch(m, n, 64, dt, sm_count=1))
                names.add(lr.gemv_launch(m, n, 64, dt, "float32", sm_count=1))
                names.update(lr.gemv_launch(m, n // 2, 64, dt, act=a, sm_count=1)
                             for a in lr.GEMV_ACTS)
        for m in lr.QGEMV_MS:
            for act in (None, *lr.GEMV_ACTS):
                for group in (64, 128):
                    for sms in (0, 1):   # sm_count 1: 64 rows are tiles enough for _wide
                        for kind in lr.INT4_OFFSETS:
                            names.add(lr.qgemv_launch(m, 64, 128, dt, "int4", act=act,
                                                      group=group, sm_count=sms, offsets=kind))
                            if act is None:   # a quantized LM head's fp32 logits
                                names.add(lr.qgemv_launch(m, 64, 128, dt, "int4", "float32",
                                                          group=group, sm_count=sms,
                                                          offsets=kind))
                for n in (64, 48, 24):   # on 1 SM: 4 tiles (_w16 up to 8 rows), 3 (_wide)
                    for q, group in (("fp8", 0), ("fp8-block", 64)):
                        names.add(lr.qgemv_launch(m, n, 128, dt, q, act=act, group=group,
                                                  sm_count=1))
                        names.add(lr.qgemv_launch(m, n, 128, dt, q, act=act, group=group))
            for q, group in (("fp8", 0), ("fp8-block", 64)):
                for n in (64, 48):
                    names.add(lr.qgemv_launch(m, n, 128, dt, q, "float32", group=group,
                                              sm_count=1))
                names.add(lr.qgemv_launch(m, 64, 128, dt, q, "float32", group=group))
        names.add(lr.moe_route_launch(5, 8, 2, dt))
        names.add(lr.moe_topk_launch(300, 8, 2, dt))
        # the grouping over a grid (moe_count, moe_place: either dtype's module holds them)
        names.update(ln for ln, _ in lr.moe_route_launches(1100, 8, 2, dt, True, *"lipqrm"))
        for t in (1, 300):     # the 8-row and 64-row grouped-GEMM tiles
            names.update(lr.moe_gemm_launch(t, 8, 2, 64, 128, dt, act) for act in (False, True))
        for t in (1, 64, 300):     # block-wise FP8 experts: the 8-, 64- and 128-row tiles
            names.update(lr.moe_gemm_launch(t, 8, 2, 64, 128, dt, act, 32)
                         for act in (False, True))
        for act in (None, *lr.GEMV_ACTS):     # the INT4 small-M GEMM
            for kind in lr.INT4_OFFSETS:
                names.add(lr.w4_gemm_launch(40, 64, 128, dt, act=act, group=128, offsets=kind))
                if act is None:
                    names.add(lr.w4_gemm_launch(40, 64, 128, dt, "float32", group=128,
                                                offsets=kind))
        for kind in lr.INT4_OFFSETS:
            names.add(lr.dequant_int4_launch(64, 128, dt, kind))
        names.add(lr.quantize_fp8_launch(64, dt))
        names.add(lr.dequant_fp8b_launch(64, 128, dt))
        for il in (False, True):
            for bias in (False, True):
                for cache in (False, True):
                    names.add(lr.rope_launch(1, 2, 1, 64, 32, dt, il, bias, cache))
                for e4m3 in (False, True):   # the cache in the dtype, or E4M3
                    names.add(lr.rope_launch(1, 2, 1, 64, 32, dt, il, bias, True, e4m3=e4m3))
                    names.add(lr.rope_launch(1, 2, 1, 64, 32, dt, il, bias, True, qk_norm=True,
                                             e4m3=e4m3))
        for d in ap.HEAD_DIMS:
            for smem in set(MAX_SMEM_OPTIN.values()):
                for cap in (0.0, 50.0):
                    dec = ap.attention_plan(4, 4, 8, 2, d, 4096, 16, dt, 132, max_smem=smem,
                                            softcap=cap)
                    pre = ap.attention_plan(9, 4, 8, 2, d, 64, 16, dt, 132, max_smem=smem,
                                            softcap=cap)
                    names.update({dec.main, dec.reduce, dec.kv_write, pre.main})
            for cap in (0.0, 1.0):
                names.add(ap.prefill_plan(9, 4, 8, 2, d, 16, dt, variant=ap.SM90_VARIANT,
                                          max_smem=ap.prefill_smem(d, ap.SM90_VARIANT),
                                          softcap=cap).main)
            for cap in (0.0, 1.0):
                for e4m3 in (False, True):   # the pool in the dtype, or E4M3 (written by rope)
                    kw = dict(softcap=cap, e4m3=e4m3, write_kv=not e4m3)
                    names.update(ap.prefill_plan(9, 4, 8, 2, d, 16, dt, variant=v,
                                                 max_smem=ap.prefill_smem(d, v, e4m3),
                                                 **kw).main
                                 for v in ap.PREFILL_WARPS)
                    names.update(ap.decode_plan(4, 8, 2, d, 64, 16, dt, 132,
                                                max_smem=ap.decode_smem(d, st, e4m3),
                                                **kw).main
                                 for st in ap.DECODE_STAGES)
    names.add(lr.sample_launch(1, 1000))
    names.add(lr.ban_launch(1, 1000))
    names.add(lr.softcap_launch(1000, 132))
    return {(ln.module, ln.kernel) for ln in names}


ENTRIES = _entry_names()


@pytest.fixture(scope="session")
def cubins():
    return compiler.compile_all()


@pytest.mark.slow
def test_compile_all_modules_for_every_arch(cubins):
    assert set(cubins) == {(m, a) for m in compiler.MODULES for a in compiler.DEFAULT_ARCHS}
    for module in compiler.MODULES:
        assert any(m == module for m, _ in ENTRIES), module


@pytest.mark.slow
@pytest.mark.parametrize("arch", compiler.DEFAULT_ARCHS)
def test_every_entry_point_is_in_the_cubin(cubins, arch):
    for module, kernel in ENTRIES:
        blob = cubins[module, arch]
        assert blob[:4] == b"\x7fELF", module
        assert kernel.encode() + b"\x00" in blob, (module, kernel, arch)


@pytest.mark.slow
def test_an_engines_dtype_compiles_its_entry_points_alone():
    """A build compiles its compute dtype's entry points alone (compile_all's dtype): every
    one the launch rules can name for fp16, none that only bf16 names."""
    f16 = compiler.compile_all(archs=("sm_90a",), dtype="float16")
    ours, theirs = _entry_names(("float16",)), _entry_names(("bfloat16",))
    assert theirs - ours
    for module, kernel in ours:
        assert kernel.encode() + b"\x00" in f16[module, "sm_90a"], (module, kernel)
    for module, kernel in theirs - ours:
        assert kernel.encode() + b"\x00" not in f16[module, "sm_90a"], (module, kernel)


@pytest.mark.parametrize("dtype,tag,other", (("float16", "f16", "bf16"),
                                             ("bfloat16", "bf16", "f16")))
def test_one_dtypes_entry_points(dtype, tag, other):
    ptx = compiler.compile_module("activation", "sm_90a", ptx=True, dtype=dtype)
    assert f".entry swiglu_{tag}_v8".encode() in ptx
    assert f".entry swiglu_{other}_v8".encode() not in ptx
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        compiler.compile_module("activation", "sm_90a", dtype="float32")


def test_ptx_for_tensorrt_aot():
    ptx = compiler.compile_module("activation", "sm_90a", ptx=True)
    assert b".target sm_90a" in ptx and b".entry swiglu_bf16_v8" in ptx


def test_sm90_prefill_uses_tma_and_wgmma():
    """Hopper's prefill kernel compiles for sm_90a to the copy engine and warpgroup MMAs
    (elsewhere its entries are traps, never planned)."""
    ptx = compiler.compile_module(ap.SM90_MODULE, "sm_90a", ptx=True).decode()
    for instr in ("cp.async.bulk.tensor.2d", "wgmma.mma_async.sync.aligned.m64n128k16",
                  "setmaxnreg.inc", "mbarrier.try_wait.parity"):
        assert instr in ptx, instr
    assert "wgmma" not in compiler.compile_module(ap.SM90_MODULE, "sm_80", ptx=True).decode()


def test_sm90_moe_gemm_is_wgmma():
    """The MoE GEMMs' wgmma entries (every one moe_gemm_launch names with sm90, 16-bit and
    block-wise FP8 experts) are in the sm_90a modules, built on warpgroup MMAs over
    128-byte-swizzled shared memory; the other architectures' modules have none (a session
    probes for them)."""
    for group, module in ((0, "moe"), (32, "moe_fp8b")):
        names = {lr.moe_gemm_launch(t, e, k, 64, 128, dt, act, group, sm90=True,
                                    fp8b_layer=wide).kernel
                 for dt in lr.DTYPES for act in (False, True)
                 for t, e, k in ((200, 8, 2), (4096, 8, 2)) for wide in {False, bool(group)}}
        assert {n.split("_")[-2 if n.endswith("swiglu") else -1] for n in names} == {
            "m64w", "m128w", *(["m256w"] if group else [])}
        ptx = compiler.compile_module(module, "sm_90a", ptx=True).decode()
        for name in names:
            assert f".entry {name}(" in ptx, name
        assert "wgmma.mma_async.sync.aligned.m64n" in ptx
        if group:   # the FP8 form: the tile turned around by stmatrix for its stores
            assert "stmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
        sm80 = compiler.compile_module(module, "sm_80", ptx=True).decode()
        assert "wgmma" not in sm80 and not any(f".entry {n}(" in sm80 for n in names)


def test_compile_error_is_reported(tmp_path, monkeypatch):
    (tmp_path / "common.cuh").write_text("")
    (tmp_path / "broken.cu").write_text("extern \"C\" __global__ void k() { nope; }")
    monkeypatch.setattr(compiler, "KERNEL_DIR", tmp_path)
    with pytest.raises(compiler.NvrtcError, match="nope"):
        compiler.compile_module("broken", "sm_80")
