"""Launch the plugin kernels on torch CUDA tensors through the CUDA driver API.

This is the same path the engine takes (cubin -> cuModuleLoadData -> cuLaunchKernel), used by
the GPU tests and the benchmarks; TensorRT enqueue does the equivalent with its own pointers.
"""
from __future__ import annotations

import ctypes
import functools

from llmc.devices import CudaError, arch_for_capability, check, device_max_smem

from . import attention_plan as ap
from . import compiler
from . import launch_rules as lr
from .launch_rules import Launch

_P, _I = ctypes.c_void_p, ctypes.c_int


class DevPtr(int):
    """A raw device address (TensorRT's enqueue pointers): passed as a pointer, not int32."""


def arg_type(a):
    """How a kernel argument is passed: ctypes' void pointer (DevPtr, or an object with
    data_ptr(): a torch tensor), int32 (a Python int), or None for a PoolMap (its CUtensorMap,
    128 bytes, by value)."""
    if isinstance(a, bool) or a is None:
        raise TypeError("kernel arguments are pointers or ints")
    if isinstance(a, DevPtr):
        return _P
    if isinstance(a, ap.PoolMap):
        return None
    return _I if isinstance(a, int) else _P


def arg_sizes(types) -> list[int]:
    """The bytes each argument of these types (arg_type's) gives the kernel."""
    return [128 if t is None else ctypes.sizeof(t) for t in types]


class Functions:
    """Cubins loaded into the current CUDA context; functions looked up and configured once.
    Needs no torch: the TensorRT glue uses it with its own pointers and stream."""

    def __init__(self, arch: str, cubins: dict[str, bytes] | None = None):
        """cubins: module -> cubin compiled ahead of time (an engine's); other modules are
        compiled with NVRTC on first use."""
        from cuda.bindings import driver

        check(driver.cuInit(0))
        self.arch = arch
        # Launches marked pdl may overlap the previous kernel (kernels/common.cuh): sm_90+.
        self.pdl = int(arch[3:].rstrip("a")) >= 90
        self._pdl_attr = None
        self._cubins = dict(cubins or {})
        self._modules = {}
        self._funcs = {}
        self._smem_set = {}   # (module, kernel) -> the dynamic shared memory it may take
        self._params = {}     # (module, kernel) -> its parameters' sizes in bytes
        self._checked = set()   # (module, kernel, argument types) that match them
        self._maps = {}       # PoolMap (with its pointer resolved) -> encoded CUtensorMap

    def func(self, launch: Launch):
        from cuda.bindings import driver

        key = (launch.module, launch.kernel)
        if key not in self._funcs:
            err, f = driver.cuModuleGetFunction(self._module(launch.module),
                                                launch.kernel.encode())
            if err == driver.CUresult.CUDA_ERROR_NOT_FOUND:
                # an engine's cubins hold the entry points of its compute dtype alone
                raise CudaError(f"no kernel {launch.kernel} in module {launch.module}"
                                + (" (the engine's, compiled for one dtype)"
                                   if launch.module in self._cubins else ""))
            self._funcs[key] = check((err, f))
        f = self._funcs[key]
        if launch.smem > self._smem_set.get(key, 0):
            # past 48 KB of shared memory, static and dynamic together, a kernel must opt in
            fa = driver.CUfunction_attribute
            static = check(driver.cuFuncGetAttribute(fa.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f))
            if launch.smem + static > 48 * 1024:
                check(driver.cuFuncSetAttribute(
                    f, fa.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, launch.smem))
            self._smem_set[key] = launch.smem
        return f

    def has(self, module: str, kernel: str) -> bool:
        """Whether the module (as func loads it) holds an entry point of that name."""
        from cuda.bindings import driver

        err, _ = driver.cuModuleGetFunction(self._module(module), kernel.encode())
        return err == driver.CUresult.CUDA_SUCCESS

    def _module(self, module: str):
        from cuda.bindings import driver

        if module not in self._modules:
            cubin = self._cubins.get(module) or compiler.compile_module(module, self.arch)
            self._modules[module] = check(driver.cuModuleLoadData(cubin))
        return self._modules[module]

    def launch(self, launch: Launch, args: list, stream: int):
        """args: ints (int32), DevPtr, PoolMap, or objects with data_ptr() (torch tensors)."""
        from cuda.bindings import driver

        types = tuple(map(arg_type, args))
        vals = tuple(self._tensor_map(a) if t is None   # a driver struct, by value
                     else int(a) if isinstance(a, int) else a.data_ptr()
                     for a, t in zip(args, types))
        params = (vals, types)
        if (launch.module, launch.kernel, types) not in self._checked:
            self._check_params(launch, types)
            self._checked.add((launch.module, launch.kernel, types))
        if launch.pdl and self.pdl:
            check(driver.cuLaunchKernelEx(self._pdl_config(launch, stream), self.func(launch),
                                          params, 0))
            return
        check(driver.cuLaunchKernel(self.func(launch), *launch.grid, *launch.block, launch.smem,
                                  driver.CUstream(stream), params, 0))

    def _check_params(self, launch: Launch, types: list) -> None:
        """The driver copies as many arguments as the kernel declares, from the list it is
        given: too short a list is read past its end (a crash, or garbage pointers in the
        kernel), and an int in a pointer's place is half a pointer. So the arguments are
        checked against the kernel's parameters: at least as many, each of its size. More is
        allowed and unread: an engine built before a kernel gained a trailing parameter
        carries the old kernel, which the session still passes the new argument."""
        sizes = self._param_sizes(launch)
        if sizes is None:
            return
        given = arg_sizes(types)
        if len(given) < len(sizes) or given[:len(sizes)] != sizes:
            raise CudaError(f"kernel {launch.kernel} ({launch.module}) takes {len(sizes)} "
                            f"parameters of {sizes} bytes; the launch passes {len(given)} of "
                            f"{given}")

    def _param_sizes(self, launch: Launch) -> list[int] | None:
        """Each parameter's size, from the driver (cuFuncGetParamInfo, CUDA 12.4); None where
        the driver cannot say."""
        from cuda.bindings import driver

        key = (launch.module, launch.kernel)
        if key not in self._params:
            f, get = self.func(launch), getattr(driver, "cuFuncGetParamInfo", None)
            sizes = [] if get else None
            while sizes is not None:
                err, _, size = get(f, len(sizes))
                if err == driver.CUresult.CUDA_ERROR_INVALID_VALUE:
                    break   # past the last parameter
                if err != driver.CUresult.CUDA_SUCCESS:
                    sizes = None   # an older driver
                    break
                sizes.append(size)
            self._params[key] = sizes
        return self._params[key]

    def _tensor_map(self, m: "ap.PoolMap"):
        """The pool's CUtensorMap, encoded once per (pointer, shape): a host-side descriptor
        that the kernel's TMA copies read from its parameters."""
        from cuda.bindings import driver

        ptr = int(m.pool) if isinstance(m.pool, int) else m.pool.data_ptr()
        key = (ptr, m.rows, m.cols, m.box_rows, m.dtype)
        if key not in self._maps:
            dt, u64, u32 = driver.CUtensorMapDataType, driver.cuuint64_t, driver.cuuint32_t
            self._maps[key] = check(driver.cuTensorMapEncodeTiled(
                dt.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 if m.dtype == "bfloat16"
                else dt.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                2, ptr, [u64(m.cols), u64(m.rows)], [u64(m.cols * 2)],
                [u32(64), u32(m.box_rows)], [u32(1), u32(1)],
                driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
                driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
                driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))
        return self._maps[key]

    def _pdl_config(self, launch: Launch, stream: int):
        from cuda.bindings import driver

        if self._pdl_attr is None:
            attr = driver.CUlaunchAttribute()
            ids = driver.CUlaunchAttributeID
            attr.id = ids.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            self._pdl_attr = attr
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = launch.grid
        config.blockDimX, config.blockDimY, config.blockDimZ = launch.block
        config.sharedMemBytes = launch.smem
        config.hStream = driver.CUstream(stream)
        config.attrs = [self._pdl_attr]
        config.numAttrs = 1
        return config


class Kernels:
    """The plugin ops on torch CUDA tensors, on torch's current stream."""

    def __init__(self, torch_device=None):
        import torch

        self.torch = torch
        dev = torch.device(torch_device or "cuda")
        torch.zeros(1, device=dev)  # makes torch's primary context current on this thread
        major, minor = torch.cuda.get_device_capability(dev)
        self.arch = arch_for_capability(major, minor)
        self.sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
        self.max_smem = device_max_smem(torch.cuda.current_device() if dev.index is None
                                        else dev.index)
        self.functions = Functions(self.arch)
        self._split_counters = None   # paged_attention's: zeroed once, each launch resets them
        self._schedules = {}          # paged_attention's decode schedules, for CUDA graph capture

    def launch(self, launch: Launch, args: list):
        """args: torch tensors (passed as pointers) and python ints (int32)."""
        self.functions.launch(launch, args, self.torch.cuda.current_stream().cuda_stream)

    # -- ops on torch tensors (output allocation mirrors the shape rules in launch_rules) --

    def _dtype(self, t) -> str:
        return str(t.dtype).removeprefix("torch.")

    def rms_norm(self, x, weight, eps, residual=None, bias=None, kind="rmsnorm"):
        n = x.shape[-1]
        rows = x.numel() // n
        ln = lr.norm_launch(rows, n, self._dtype(x), kind, residual is not None)
        out = self.torch.empty_like(x)
        e = lr.float_bits(eps)
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
        out = self.torch.empty(lr.gated_output_shape(gu.shape), dtype=gu.dtype,
                               device=gu.device)
        ln = lr.gated_launch(rows, two_i // 2, self._dtype(gu), act, self.sm_count)
        self.launch(ln, [gu, rows, two_i // 2, out])
        return out

    def gated2(self, gate, up):
        """silu(gate) * up of two [rows, I] tensors (the swiglu2 kernel)."""
        rows, inter = gate.shape
        out = self.torch.empty_like(gate)
        self.launch(lr.swiglu2_launch(rows, inter, self._dtype(gate)),
                    [gate, up, rows, inter, out])
        return out

    def gelu(self, x, approximate="tanh"):
        out = self.torch.empty_like(x)
        ln = lr.gelu_launch(x.numel(), self._dtype(x), approximate, self.sm_count)
        self.launch(ln, [x, x.numel(), out])
        return out

    def gemv(self, x, w, bias=None, out_dtype=None, act=None, sm_count=None):
        """x [m, K] @ w [N, K]^T (+ bias) for m <= 8; with act ("swiglu"/"geglu") w is the
        fused gate-up weight [2I, K] and the result act(gate) * up [m, I]. sm_count: the
        GPU's unless given (it picks the kernel, launch_rules.gemv_launch)."""
        m, k = x.shape
        n = w.shape[0] // (2 if act else 1)
        od = out_dtype or x.dtype
        out = self.torch.empty(m, n, dtype=od, device=x.device)
        ln = lr.gemv_launch(m, n, k, self._dtype(x), self._dtype(out), act,
                            self.sm_count if sm_count is None else sm_count)
        self.launch(ln, [x, w, DevPtr(0) if bias is None else bias, m, n, k, out])
        return out

    def _int4_offsets(self, zp) -> str:
        """What an INT4 kernel's zp argument holds (launch_rules.INT4_OFFSETS): zero points
        (uint8), offsets (16-bit) or nothing."""
        if zp is None:
            return "none"
        return "zero_points" if zp.dtype == self.torch.uint8 else "offsets"

    def w4_gemv(self, x, w, scale, group, pre=None, bias=None, act=None, sm_count=None,
                zp=None, out_dtype=None):
        """x [m, K] @ dequant(w)^T for m <= 16: w the packed INT4 weight [N, K / 2] (uint8, as
        lower.pack_int4 writes it), scale [N, K / group] in x's dtype, pre AWQ's 1 / s [K], zp
        the zero points [N, K / group] (uint8; the codes are u - zp rather than u - 8) or the
        offsets (in x's dtype; W = (u - 8) scale + zp); out_dtype float32: fp32 y (and bias).
        sm_count: the GPU's unless given (it picks the kernel, launch_rules.qgemv_launch)."""
        m, k = x.shape
        n = w.shape[0] // (2 if act else 1)
        out = self.torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
        ln = lr.qgemv_launch(m, n, k, self._dtype(x), "int4", self._dtype(out), act, group,
                             self.sm_count if sm_count is None else sm_count,
                             offsets=self._int4_offsets(zp))
        self.launch(ln, [x, w, scale, DevPtr(0) if pre is None else pre,
                         DevPtr(0) if bias is None else bias, m, n, k,
                         lr.int4_group_shift(group), out, *([] if zp is None else [zp])])
        return out

    def w4_gemm(self, x, w, scale, group, pre=None, bias=None, act=None, zp=None,
                out_dtype=None, sm_count=None, sm90=None):
        """w4_gemv's product for any number of rows, by the small-M GEMM (the backend's steps of
        17 to launch_rules.W4_GEMM_MAX_M rows); sm_count: the GPU's unless given (it sets the
        K splits; 0: none); sm90: its wgmma kernel (default: on sm_90a)."""
        m, k = x.shape
        n = w.shape[0] // (2 if act else 1)
        out = self.torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
        ln = lr.w4_gemm_launch(m, n, k, self._dtype(x), self._dtype(out), act, group,
                               sm_count=self.sm_count if sm_count is None else sm_count,
                               offsets=self._int4_offsets(zp),
                               sm90=self.arch == "sm_90a" if sm90 is None else sm90)
        nbytes, tiles_ = lr.w4_gemm_scratch(ln, m, n, act)
        part = self.torch.empty(max(nbytes, 4), dtype=self.torch.uint8, device=x.device)
        arrived = self.torch.zeros(max(tiles_, 1), dtype=self.torch.int32, device=x.device)
        self.launch(ln, [x, w, scale, DevPtr(0) if pre is None else pre,
                         DevPtr(0) if bias is None else bias, m, n, k,
                         lr.int4_group_shift(group), out, part, arrived,
                         *([] if zp is None else [zp])])
        assert not arrived.any(), "a split-K tile counter was not reset"
        return out

    def w8_gemv(self, x, w, w_scale, x_scale, bias=None, out_dtype=None, act=None,
                sm_count=None, first=None):
        """e4m3(x / x_scale) @ w^T * x_scale * w_scale for m <= 16: w the E4M3 weight [N, K]
        (uint8 or float8_e4m3fn), w_scale fp32 [N]. sm_count: the GPU's unless given (it
        picks the kernel, launch_rules.qgemv_launch). first: int32 [m], nonzero for the rows
        of sequences' first tokens, each rounded with a scale of its own."""
        m, k = x.shape
        n = w.shape[0] // (2 if act else 1)
        out = self.torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
        ln = lr.qgemv_launch(m, n, k, self._dtype(x), "fp8", self._dtype(out), act,
                             sm_count=self.sm_count if sm_count is None else sm_count)
        self.launch(ln, [x, w, (w_scale * x_scale).float(), lr.float_bits(x_scale),
                         DevPtr(0) if bias is None else bias, m, n, k, out,
                         DevPtr(0) if first is None else first])
        return out

    def w8b_gemv(self, x, w, scale, group, bias=None, out_dtype=None, act=None, sm_count=None):
        """x [m, K] @ dequant(w)^T for m <= 16: w the E4M3 weight [N, K] (uint8 or
        float8_e4m3fn), scale [N, K / group] in x's dtype (kernels/qgemv_fp8b.cu). sm_count:
        the GPU's unless given (it picks the kernel, launch_rules.qgemv_launch)."""
        m, k = x.shape
        n = w.shape[0] // (2 if act else 1)
        out = self.torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
        ln = lr.qgemv_launch(m, n, k, self._dtype(x), "fp8-block", self._dtype(out), act, group,
                             self.sm_count if sm_count is None else sm_count)
        self.launch(ln, [x, w, scale, DevPtr(0) if bias is None else bias, m, n, k,
                         lr.fp8b_group_shift(group), out])
        return out

    def dequant_fp8b(self, w, scale, group, dtype):
        n, k = w.shape
        out = self.torch.empty(n, k, dtype=dtype, device=w.device)
        self.launch(lr.dequant_fp8b_launch(n, k, self._dtype(out)),
                    [w, scale, n, k, lr.fp8b_group_shift(group), out])
        return out

    def dequant_int4(self, w, scale, group, dtype, pre=None, zp=None):
        n, k = w.shape[0], 2 * w.shape[1]
        out = self.torch.empty(n, k, dtype=dtype, device=w.device)
        self.launch(lr.dequant_int4_launch(n, k, self._dtype(out), self._int4_offsets(zp)),
                    [w, scale, DevPtr(0) if pre is None else pre, n, k,
                     lr.int4_group_shift(group), out, *([] if zp is None else [zp])])
        return out

    def quantize_fp8(self, x, x_scale):
        out = self.torch.empty(x.shape, dtype=self.torch.uint8, device=x.device)
        self.launch(lr.quantize_fp8_launch(x.numel(), self._dtype(x)),
                    [x, lr.float_bits(x_scale), x.numel(), out])
        return out

    def quantize_fp8_rows(self, x, x_scale, first):
        """(E4M3 codes of x [rows, K], each row's scale over x_scale fp32 [rows]): first
        (int32 [rows]) nonzero marks a row rounded with a scale of its own."""
        rows, k = x.shape
        out = self.torch.empty(x.shape, dtype=self.torch.uint8, device=x.device)
        row_scale = self.torch.full((rows,), float("nan"), device=x.device)
        self.launch(lr.quantize_fp8_rows_launch(rows, k, self._dtype(x)),
                    [x, lr.float_bits(x_scale), k, first, out, row_scale])
        return out, row_scale

    def rope(self, qkv, positions, inv_freq, hq, hkv, d, rot, interleaved=False, bias=None,
             cache=None, seq_starts=None, block_tables=None, qk_norm=None, eps=1e-6,
             kv_scales=None):
        """qk_norm: (q weight [D], k weight [D]) of a per-head RMSNorm before the rotation
        (with a cache only, as the kernel has it). kv_scales: (K, V) scales of an E4M3 cache
        (uint8 or float8_e4m3fn), which gets the bytes of x / scale."""
        t = qkv.shape[0]
        q, k, v = (self.torch.empty(s, dtype=qkv.dtype, device=qkv.device)
                   for s in lr.rope_output_shapes(qkv.shape, hq, hkv, d))
        self._check_pool(cache, kv_scales)
        ln = lr.rope_launch(t, hq, hkv, d, rot, self._dtype(qkv), interleaved,
                            bias is not None, cache is not None, qk_norm is not None,
                            kv_scales is not None)
        ins = [qkv] + ([bias] if bias is not None else []) + list(qk_norm or ())
        ins += [positions, inv_freq]
        if cache is None:
            self.launch(ln, ins + [t, hq, hkv, d, rot, q, k, v])
        else:
            b, mb = block_tables.shape
            ins += [seq_starts, block_tables]
            sc = [t, hq, hkv, d, rot, b, mb, cache.shape[3], cache.shape[1]]
            sc += [lr.float_bits(eps)] if qk_norm is not None else []
            sc += [lr.float_bits(x) for x in kv_scales] if kv_scales is not None else []
            self.launch(ln, ins + sc + [q, k, v, cache])
        return q, k, v

    def _check_pool(self, cache, kv_scales):
        """An E4M3 pool (one byte an element) comes with its (K, V) scales, and only it."""
        if cache is not None and (cache.element_size() == 1) != (kv_scales is not None):
            raise TypeError(f"a {cache.dtype} KV pool with kv_scales={kv_scales}: an E4M3 "
                            "pool (uint8 / float8_e4m3fn) takes its (K, V) scales, a 16-bit "
                            "one none")

    def paged_attention(self, q, k, v, seq_starts, context_lens, block_tables, kv_cache,
                        scale=None, write_kv=True, force=None, window=0, max_smem=None,
                        softcap=0.0, kv_scales=None, sm90=None, fuse_reduce=True,
                        schedule=None, out=None, **prefill):
        """force: None, 'decode' or 'prefill' picks the kernel regardless of the plan (tests
        run both kernels on the same mixed batch); `prefill` (variant=, pack=) goes to
        attention_plan.prefill_plan. window: sliding window, 0 = none. softcap: logit soft-cap
        cap * tanh(s / cap) of the scaled scores, 0 = none. max_smem: the shared-memory
        limit the plan must respect, default the device's (tests pass less to force the
        fallbacks that smaller GPUs take). kv_scales: (K, V) scales of an E4M3 pool (uint8
        or float8_e4m3fn), whose new rows the rope kernel wrote: then write_kv must be False
        and k, v may be None. sm90: let prefill plans take the sm_90a kernel (TMA + wgmma);
        default: where the device is sm_90a. fuse_reduce: a split decode combines its splits
        in its last CTA (as the cuda backend runs it) rather than in attn_reduce (as the
        TensorRT plugin does). schedule: a decode takes its splits from a schedule built
        here from context_lens (attention_plan.decode_schedule), as the cuda backend runs it;
        default: where fuse_reduce. Under CUDA graph capture the schedule built by the last
        uncaptured call with the same seq_starts and context_lens tensors and plan is reused
        (the host cannot read them then). out: where to write (tests pass it poisoned), else a new
        tensor."""
        t, hq, d = q.shape
        _, nb, hkv, bs, _ = kv_cache.shape
        b, mb = block_tables.shape
        dt = self._dtype(q)
        self._check_pool(kv_cache, kv_scales)
        lim = dict(max_smem=self.max_smem if max_smem is None else max_smem, window=window,
                   softcap=softcap, e4m3=kv_scales is not None)
        schedule = fuse_reduce if schedule is None else schedule
        if force == "decode":
            plan = ap.decode_plan(t, hq, hkv, d, mb, bs, dt, self.sm_count, write_kv, **lim,
                                  fuse_reduce=fuse_reduce, schedule=schedule)
        else:
            sm90 = self.arch == "sm_90a" if sm90 is None else sm90
            if force == "prefill":
                plan = ap.prefill_plan(t, b, hq, hkv, d, bs, dt, write_kv, **prefill, **lim,
                                       sm90=sm90)
            else:
                plan = ap.attention_plan(t, b, hq, hkv, d, mb, bs, dt, self.sm_count, write_kv,
                                         **lim, sm90=sm90, fuse_reduce=fuse_reduce,
                                         schedule=schedule)
        self.last_plan = plan  # for tests: which kernels a call took
        scale = d ** -0.5 if scale is None else scale
        out = self.torch.empty_like(q) if out is None else out
        ws = self.torch.empty(max(plan.workspace_bytes // 4, 1), dtype=self.torch.float32,
                              device=q.device)
        lse = ap.workspace_lse_offset(plan, t, hq, d) // 4
        arrived = DevPtr(0)
        if plan.counters:   # kept across calls, as a session keeps its own (graph-safe)
            if self._split_counters is None or self._split_counters.numel() < plan.counters:
                self._split_counters = self.torch.zeros(plan.counters, dtype=self.torch.int32,
                                                        device=q.device)
            arrived = self._split_counters
        sched = DevPtr(0)
        if plan.items:
            key = (seq_starts.data_ptr(), context_lens.data_ptr(), plan)
            if not self.torch.cuda.is_current_stream_capturing():
                self._schedules[key] = self.torch.from_numpy(ap.decode_schedule(
                    context_lens.cpu().numpy(), plan, seq_starts.cpu().numpy())).to(q.device)
            sched = self._schedules[key]
        ptr = dict(q=q, k=k, v=v, seq_starts=seq_starts, context_lens=context_lens,
                   block_tables=block_tables, cache=kv_cache, out=out, ws_o=ws,
                   ws_lse=ws[lse:] if plan.workspace_bytes else ws, arrived=arrived,
                   sched=sched)
        dims = ap.paged_attention_dims(q.shape, kv_cache.shape, block_tables.shape)
        for ln, args in ap.attention_launches(plan, dims, scale, ptr, kv_scales):
            self.launch(ln, args)
        if plan.counters and not self.torch.cuda.is_current_stream_capturing():
            assert not arrived.any(), "a decode split counter was not reset"
        return out

    # -- glue and sampling (cuda backend) --

    def embedding(self, ids, table, scale=None):
        """table[ids] (* scale, rounded to the dtype) for int32 ids of any shape; rows of ids
        outside [0, V) are zeros."""
        v, h = table.shape
        self._int32(ids)
        out = self.torch.empty(*ids.shape, h, dtype=table.dtype, device=table.device)
        if ids.numel():
            ln = lr.embedding_launch(ids.numel(), h, self._dtype(table), scale is not None)
            sc = [] if scale is None else [lr.float_bits(scale)]
            self.launch(ln, [ids, table, ids.numel(), h, v, *sc, out])
        return out

    def softcap(self, logits, cap):
        """cap * tanh(logits / cap) of fp32 logits."""
        out = self.torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if logits.numel():
            self.launch(lr.softcap_launch(logits.numel(), self.sm_count),
                        [logits, logits.numel(), lr.float_bits(cap), out])
        return out

    def gather_rows(self, x, rows):
        n, h = x.shape
        self._int32(rows)
        out = self.torch.empty(rows.numel(), h, dtype=x.dtype, device=x.device)
        if rows.numel():
            self.launch(lr.gather_rows_launch(rows.numel(), h, self._dtype(x)),
                        [x, rows, rows.numel(), h, n, out])
        return out

    def cast_f32(self, x):
        out = self.torch.empty(x.shape, dtype=self.torch.float32, device=x.device)
        if x.numel():
            self.launch(lr.cast_launch(x.numel(), self._dtype(x), self.sm_count),
                        [x, x.numel(), out])
        return out

    def add(self, a, b):
        out = self.torch.empty_like(a)
        if a.numel():
            self.launch(lr.add_launch(a.numel(), self._dtype(a), self.sm_count),
                        [a, b, a.numel(), out])
        return out

    # -- mixture of experts (kernels/moe.cu), as the cuda backend's moe op runs it --

    def moe_route(self, logits, top_k, renormalise, sm90=None, fp8b=False):
        """Router logits [T, E] (16-bit) -> (ids [T, k] int32, wts [T, k] fp32, pos_of [T, k]
        int32, perm [T k] int32, meta int32); kernels/moe.cu says what each holds. sm90: tiles
        for the wgmma GEMMs (moe_gemm's; default: on sm_90a); fp8b: for both GEMMs over FP8
        experts (moe_gemm's fp8b_layer)."""
        sm90 = self.arch == "sm_90a" if sm90 is None else sm90
        t, e = logits.shape
        torch, dev = self.torch, logits.device
        ids = torch.empty(t, top_k, dtype=torch.int32, device=dev)
        wts = torch.empty(t, top_k, dtype=torch.float32, device=dev)
        pos_of = torch.empty(t, top_k, dtype=torch.int32, device=dev)
        perm = torch.empty(t * top_k, dtype=torch.int32, device=dev)
        meta = torch.empty(t * lr.moe_meta_ints(e, top_k), dtype=torch.int32, device=dev)
        for launch, args in lr.moe_route_launches(t, e, top_k, self._dtype(logits), renormalise,
                                                  logits, ids, wts, pos_of, perm, meta,
                                                  sm90=sm90, fp8b=fp8b):
            self.launch(launch, args)
        return ids, wts, pos_of, perm, meta

    def moe_gemm(self, x, w, perm, meta, tokens, top_k, act, scale=None, sm90=None,
                 fp8b_layer=False):
        """The grouped GEMM over a step of `tokens` tokens' routed rows: w [E, N, K] (each
        expert's [out, in]). act: gate-up with SwiGLU, w [E, 2n, K], x the tokens [T, K]
        (through perm) -> [T k, n]; else down, x [T k, K] by position -> [T k, N]. scale:
        w is E4M3 (uint8 or float8_e4m3fn) with these block scales [E, K / B, N] in x's
        dtype (kernels/moe_fp8b.cu). sm90: past the 8-row kernel, the wgmma one and its tiles
        (give moe_route the same; default: on sm_90a). fp8b_layer: the routing's fp8b."""
        e, nw, k = w.shape
        sm90 = self.arch == "sm_90a" if sm90 is None else sm90
        n = nw // 2 if act else nw
        group = k // scale.shape[1] if scale is not None else 0
        out = self.torch.empty(tokens * top_k, n, dtype=x.dtype, device=x.device)
        self.launch(lr.moe_gemm_launch(tokens, e, top_k, n, k, self._dtype(x), act, group,
                                       sm90, fp8b_layer),
                    [x, w, perm if act else DevPtr(0), meta, e, n, k, out] +
                    ([scale, lr.fp8b_group_shift(group)] if group else []))
        return out

    def moe_combine(self, y, pos_of, wts, gate=None, shared=None):
        """out [T, H] = sum_j wts[t, j] y[pos_of[t, j]] (+ sigmoid(gate [T, 1]) shared)."""
        t, k = pos_of.shape
        h = y.shape[1]
        out = self.torch.empty(t, h, dtype=y.dtype, device=y.device)
        self.launch(lr.moe_combine_launch(t, h, k, self._dtype(y), shared is not None),
                    [y, pos_of, wts, DevPtr(0) if gate is None else gate,
                     DevPtr(0) if shared is None else shared, t, h, k, out])
        return out

    def moe(self, x, logits, gate_up, down, top_k, renormalise, gate=None, shared=None,
            scales=(None, None), sm90=None):
        """The moe op: x [T, H], logits [T, E], gate_up [E, 2I, H], down [E, H, I] ->
        (out [T, H], dict of the intermediate buffers). scales: block-wise FP8 experts'
        (gate-up's [E, H / B, 2I], down's [E, I / B, H]), None where 16-bit. sm90: moe_gemm's
        (as the cuda backend: both GEMMs on wgmma or neither; both over FP8 experts, the wider
        tiles too). The dict's bm: the tile height the routing grouped for."""
        t, e = logits.shape
        sm90 = self.arch == "sm_90a" if sm90 is None else sm90
        fp8b = sm90 and all(s is not None for s in scales)
        ids, wts, pos_of, perm, meta = self.moe_route(logits, top_k, renormalise, sm90, fp8b)
        act = self.moe_gemm(x, gate_up, perm, meta, t, top_k, act=True, scale=scales[0],
                            sm90=sm90, fp8b_layer=fp8b)
        y = self.moe_gemm(act, down, perm, meta, t, top_k, act=False, scale=scales[1],
                          sm90=sm90, fp8b_layer=fp8b)
        out = self.moe_combine(y, pos_of, wts, gate, shared)
        return out, dict(ids=ids, wts=wts, pos_of=pos_of, perm=perm, meta=meta, act=act, y=y,
                         bm=lr.moe_block_m(t, e, top_k, sm90, fp8b))

    def _int32(self, idx):
        if idx.dtype != self.torch.int32 or not idx.is_contiguous():
            raise TypeError(f"indices must be contiguous int32, got {idx.dtype}")

    def _per_row(self, v, b, dtype, device):
        t = self.torch
        if isinstance(v, t.Tensor):
            return v.to(device=device, dtype=dtype).expand(b).contiguous()
        return t.full((b,), v, dtype=dtype, device=device)

    def sample(self, logits, temperature, top_k, top_p, seed, counter, logprobs=False):
        """Token ids int32 [B] from fp32 logits [B, V] (and their logprobs with logprobs=True).
        Each parameter is a per-row tensor or one value for every row; seeds are uint64 bit
        patterns (python ints are taken modulo 2^64)."""
        t = self.torch
        b, v = logits.shape
        if logits.dtype != t.float32:
            raise TypeError(f"logits must be float32 (cast_f32 first), got {logits.dtype}")
        dev = logits.device
        if not isinstance(seed, t.Tensor):
            seed = (seed + 2**63) % 2**64 - 2**63  # the int64 with seed's low 64 bits
        args = [logits.contiguous(), self._per_row(temperature, b, t.float32, dev),
                self._per_row(top_k, b, t.int32, dev), self._per_row(top_p, b, t.float32, dev),
                self._per_row(seed, b, t.int64, dev), self._per_row(counter, b, t.int32, dev),
                b, v]
        tokens = t.empty(b, dtype=t.int32, device=dev)
        lp = t.empty(b, dtype=t.float32, device=dev) if logprobs else None
        self.launch(lr.sample_launch(b, v), args + [tokens, lp if logprobs else DevPtr(0)])
        return (tokens, lp) if logprobs else tokens

    def ban_tokens(self, logits, allowed):
        """In place: -inf at every token of fp32 logits [B, V] whose bit is clear in allowed,
        int32 [B, ceil(V / 32)] (llguidance's bitmask layout)."""
        t = self.torch
        b, v = logits.shape
        if logits.dtype != t.float32 or not logits.is_contiguous():
            raise TypeError(f"logits must be contiguous float32, got {logits.dtype}")
        if allowed.dtype != t.int32 or tuple(allowed.shape) != (b, (v + 31) // 32):
            raise TypeError(f"allowed must be int32 [{b}, {(v + 31) // 32}], got "
                            f"{allowed.dtype} {tuple(allowed.shape)}")
        self.launch(lr.ban_launch(b, v), [logits, allowed.contiguous(), b, v])
        return logits


@functools.lru_cache(maxsize=None)
def kernels() -> Kernels:
    return Kernels()
