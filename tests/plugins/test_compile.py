"""Every kernel module compiles with NVRTC (pip wheel, no GPU) for every target arch, and
holds every entry point the launch rules can name."""
import pytest

pytest.importorskip("cuda.bindings.nvrtc")

from llmc.plugins import compiler, specs  # noqa: E402


def _entry_names():
    names = set()
    for dt in specs.DTYPES:
        for n in (64, 63):
            for kind in ("rmsnorm", "layernorm"):
                for res in (False, True):
                    names.add(specs.norm_launch(1, n, dt, kind, res))
            names.add(specs.gated_launch(1, n, dt, "swiglu", 1))
            names.add(specs.gated_launch(1, n, dt, "geglu", 1))
            names.add(specs.gelu_launch(n, dt, "tanh", 1))
            names.add(specs.gelu_launch(n, dt, "none", 1))
        for il in (False, True):
            for bias in (False, True):
                for cache in (False, True):
                    names.add(specs.rope_launch(1, 2, 1, 64, 32, dt, il, bias, cache))
        for d in specs.HEAD_DIMS:
            for smem in set(specs.MAX_SMEM_OPTIN.values()):
                dec = specs.attention_plan(4, 4, 8, 2, d, 4096, 16, dt, 132, max_smem=smem)
                pre = specs.attention_plan(9, 4, 8, 2, d, 64, 16, dt, 132, max_smem=smem)
                names.update({dec.main, dec.reduce, dec.kv_write, pre.main})
            names.update(specs.prefill_plan(9, 4, 8, 2, d, 16, dt, variant=v,
                                            max_smem=specs.prefill_smem(d, v)).main
                         for v in specs.PREFILL_WARPS)
            names.update(specs.decode_plan(4, 8, 2, d, 64, 16, dt, 132,
                                           max_smem=specs.decode_smem(d, st)).main
                         for st in specs.DECODE_STAGES)
    return {(ln.module, ln.kernel) for ln in names}


ENTRIES = _entry_names()


@pytest.mark.parametrize("arch", compiler.DEFAULT_ARCHS)
def test_compile_all_modules(arch):
    cubins = compiler.compile_all([arch])
    assert set(cubins) == {(m, arch) for m in compiler.MODULES}
    for (module, _), blob in cubins.items():
        assert blob[:4] == b"\x7fELF", module
        wanted = [k for m, k in ENTRIES if m == module]
        assert wanted
        for kernel in wanted:
            assert kernel.encode() + b"\x00" in blob, (module, kernel, arch)


def test_ptx_for_tensorrt_aot():
    ptx = compiler.compile_module("activation", "sm_90a", ptx=True)
    assert b".target sm_90a" in ptx and b".entry swiglu_bf16_v8" in ptx


def test_compile_error_is_reported(tmp_path, monkeypatch):
    (tmp_path / "common.cuh").write_text("")
    (tmp_path / "broken.cu").write_text("extern \"C\" __global__ void k() { nope; }")
    monkeypatch.setattr(compiler, "KERNEL_DIR", tmp_path)
    with pytest.raises(compiler.NvrtcError, match="nope"):
        compiler.compile_module("broken", "sm_80")


def test_arch_for_capability():
    assert compiler.arch_for_capability(9, 0) == "sm_90a"
    assert compiler.arch_for_capability(10, 0) == "sm_100a"
    assert compiler.arch_for_capability(8, 9) == "sm_89"
