"""Launch the plugin kernels on torch CUDA tensors through the CUDA driver API.

This is the same path the engine takes (cubin -> cuModuleLoadData -> cuLaunchKernel), used by
the GPU tests and the benchmarks; TensorRT enqueue does the equivalent with its own pointers.
"""
from __future__ import annotations

import ctypes
import functools

from . import compiler, specs

_P, _I = ctypes.c_void_p, ctypes.c_int


def _ck(res):
    from cuda.bindings import driver

    err = res[0] if isinstance(res, tuple) else res
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver error {err.name}")
    return res[1] if isinstance(res, tuple) and len(res) == 2 else None


class Kernels:
    """Modules loaded for the current device; functions looked up and configured once."""

    def __init__(self, torch_device=None):
        import torch
        from cuda.bindings import driver

        self.torch = torch
        dev = torch.device(torch_device or "cuda")
        torch.zeros(1, device=dev)  # makes torch's primary context current on this thread
        major, minor = torch.cuda.get_device_capability(dev)
        self.arch = compiler.arch_for_capability(major, minor)
        self.sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
        _ck(driver.cuInit(0))
        self._modules = {}
        self._funcs = {}

    def func(self, launch: specs.Launch):
        from cuda.bindings import driver

        key = (launch.module, launch.kernel)
        if key not in self._funcs:
            if launch.module not in self._modules:
                cubin = compiler.compile_module(launch.module, self.arch)
                self._modules[launch.module] = _ck(driver.cuModuleLoadData(cubin))
            f = _ck(driver.cuModuleGetFunction(self._modules[launch.module],
                                               launch.kernel.encode()))
            self._funcs[key] = f
        f = self._funcs[key]
        if launch.smem > 48 * 1024:
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _ck(driver.cuFuncSetAttribute(f, attr, launch.smem))
        return f

    def launch(self, launch: specs.Launch, args: list):
        """args: torch tensors (passed as pointers) and python ints (int32)."""
        from cuda.bindings import driver

        vals, types = [], []
        for a in args:
            if isinstance(a, bool) or a is None:
                raise TypeError("kernel arguments are tensors or ints")
            if isinstance(a, int):
                vals.append(a)
                types.append(_I)
            else:
                vals.append(a.data_ptr())
                types.append(_P)
        stream = driver.CUstream(self.torch.cuda.current_stream().cuda_stream)
        _ck(driver.cuLaunchKernel(self.func(launch), *launch.grid, *launch.block, launch.smem,
                                  stream, (tuple(vals), tuple(types)), 0))

    # -- ops on torch tensors (output allocation mirrors the shape rules in specs) --

    def _dtype(self, t) -> str:
        return str(t.dtype).removeprefix("torch.")

    def rms_norm(self, x, weight, eps, residual=None, bias=None, kind="rmsnorm"):
        n = x.shape[-1]
        rows = x.numel() // n
        ln = specs.norm_launch(rows, n, self._dtype(x), kind, residual is not None)
        out = self.torch.empty_like(x)
        e = specs.float_bits(eps)
        ins = [x] + ([residual] if residual is not None else []) + [weight]
        ins += [bias] if kind == "layernorm" else []
        if residual is None:
            self.launch(ln, ins + [rows, n, e, out])
            return out
        res_out = self.torch.empty_like(x)
        self.launch(ln, ins + [rows, n, e, out, res_out])
        return out, res_out

    def layer_norm(self, x, weight, bias, eps, residual=None):
        return self.rms_norm(x, weight, eps, residual, bias, kind="layernorm")

    def gated(self, gu, act="swiglu"):
        rows, two_i = gu.shape
        out = self.torch.empty(specs.gated_output_shape(gu.shape), dtype=gu.dtype,
                               device=gu.device)
        ln = specs.gated_launch(rows, two_i // 2, self._dtype(gu), act, self.sm_count)
        self.launch(ln, [gu, rows, two_i // 2, out])
        return out

    def gelu(self, x, approximate="tanh"):
        out = self.torch.empty_like(x)
        ln = specs.gelu_launch(x.numel(), self._dtype(x), approximate, self.sm_count)
        self.launch(ln, [x, x.numel(), out])
        return out

    def rope(self, qkv, positions, inv_freq, hq, hkv, d, rot, interleaved=False, bias=None,
             cache=None, seq_starts=None, block_tables=None):
        t = qkv.shape[0]
        q, k, v = (self.torch.empty(s, dtype=qkv.dtype, device=qkv.device)
                   for s in specs.rope_output_shapes(qkv.shape, hq, hkv, d))
        ln = specs.rope_launch(t, hq, hkv, d, rot, self._dtype(qkv), interleaved,
                               bias is not None, cache is not None)
        ins = [qkv] + ([bias] if bias is not None else []) + [positions, inv_freq]
        if cache is None:
            self.launch(ln, ins + [t, hq, hkv, d, rot, q, k, v])
        else:
            b, mb = block_tables.shape
            ins += [seq_starts, block_tables]
            sc = [t, hq, hkv, d, rot, b, mb, cache.shape[3], cache.shape[1]]
            self.launch(ln, ins + sc + [q, k, v, cache])
        return q, k, v

    def paged_attention(self, q, k, v, seq_starts, context_lens, block_tables, kv_cache,
                        scale=None, write_kv=True, force=None):
        """force: None, 'decode' or 'prefill' picks the kernel regardless of the plan (tests
        run both kernels on the same mixed batch)."""
        t, hq, d = q.shape
        hkv = k.shape[1]
        b, mb = block_tables.shape
        _, nb, _, bs, _ = kv_cache.shape
        dt = self._dtype(q)
        if force == "decode":
            plan = specs.decode_plan(t, hq, hkv, d, mb, bs, dt, self.sm_count, write_kv)
        elif force == "prefill":
            plan = specs.prefill_plan(t, b, hq, hkv, d, bs, dt, write_kv)
        else:
            plan = specs.attention_plan(t, b, hq, hkv, d, mb, bs, dt, self.sm_count, write_kv)
        scale = d ** -0.5 if scale is None else scale
        sc = [t, b, hq, hkv, mb, bs, nb, specs.float_bits(scale)]
        meta = [seq_starts, context_lens, block_tables, kv_cache]
        if plan.kv_write:
            self.launch(plan.kv_write, [k, v, seq_starts, context_lens, block_tables,
                                        t, b, hkv, d, mb, bs, nb, kv_cache])
        out = self.torch.empty_like(q)
        if not plan.decode:
            self.launch(plan.main, [q] + meta + sc + [out])
            return out
        ws = self.torch.empty(max(plan.workspace_bytes // 4, 1), dtype=self.torch.float32,
                              device=q.device)
        rows = t * hq
        ws_o, ws_lse = ws[: rows * plan.n_split * d], ws[rows * plan.n_split * d:]
        if plan.n_split == 1:
            ws_lse = ws_o = ws
        self.launch(plan.main, [q] + meta + sc + [plan.n_split, plan.chunk, out, ws_o, ws_lse])
        if plan.reduce:
            self.launch(plan.reduce, [ws_o, ws_lse, rows, d, plan.n_split, out])
        return out


@functools.lru_cache(maxsize=None)
def kernels() -> Kernels:
    return Kernels()
