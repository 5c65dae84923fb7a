"""The cuda backend at run time: an engine's plan on one GPU, torch-free.

    load   cubins from the engine -> modules; the weights section -> one device blob in one
           copy from the mapped file; one activation arena; the KV pool, one buffer per layer,
           sized from a memory budget (gpu_memory_utilization of the GPU, as vLLM has it)
    step   copy the control inputs in (one pinned staging buffer, one copy each), run the
           plan's ops in order, copy the logits (or, with sampling, only the token ids) out

Each op's launch comes from the same rules the kernel tests use (plugins/launch_rules.py,
plugins/attention_plan.py), evaluated for the step's token count T, sequence count B and
block-table width W. A pure decode step (T == B) is padded to the next batch-size bucket
and replayed from a CUDA graph captured the first time that bucket runs: its block tables
are passed at full width so the graph's launches fit every later step of that bucket, and
its padding rows decode a dummy token into a scratch block that the runtime never hands
out. Prefill and mixed steps run uncaptured.
"""

from __future__ import annotations

import ctypes
import json
from typing import Callable

import numpy as np

from llmc import contract
from llmc.backends.cuda.plan import PLAN, WEIGHTS, Plan, cubin_section, itemsize, numel
from llmc.backends.cuda.program import (
    ATTN_COUNTERS,
    ATTN_WORKSPACE,
    FIRST_TOKENS,
    FP8_ROW_SCALES,
    FP8_UNIT_SCALES,
    QGEMM_WORKSPACE,
    W4G_COUNTERS,
    Step,
    decode_schedules,
    first_tokens,
    gemm_key,
    launches,
    qgemm_scratch,
)
from llmc.devices import CudaError, check, device_max_smem, list_gpus
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.plugins.attention_plan import SCHEDULE_ROW, SM90_MODULE, decode_schedule
from llmc.plugins.launch_rules import W4GW_MIN_M, moe_gemm_launch, w4_gemm_launch

GEMM_WORKSPACE = 32 << 20
FP8 = "float8e4m3fn"


def pinned(nbytes: int, ctype=ctypes.c_uint8) -> tuple[int, np.ndarray]:
    """A page-locked host buffer (copies from it run asynchronously, on the stream) and a
    numpy view of it as ctype; freed with cuMemFreeHost (CudaSession.close)."""
    from cuda.bindings import driver

    ptr = int(check(driver.cuMemHostAlloc(nbytes, 0)))
    view = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctype)),
                                 (nbytes // ctypes.sizeof(ctype),))
    return ptr, view


def runtime_missing() -> str:
    """Why this machine cannot run cuda engines for want of a library ('' if it can)."""
    for module, pip in (("cuda.bindings", "cuda-bindings"), ("nvmath.bindings", "nvmath-python")):
        try:
            __import__(module)
        except ImportError:
            return f"the cuda backend needs `{pip}`: pip install 'llmc[cuda]'"
    return ""


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes decode graphs are captured for: powers of two, then the limit itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class _DeviceMemory:
    """cuMemAlloc'd buffers freed together on close."""

    def __init__(self):
        self.buffers: list[int] = []
        self.nbytes = 0

    def alloc(self, nbytes: int, what: str) -> int:
        from cuda.bindings import driver

        nbytes = max(int(nbytes), 256)
        try:
            ptr = int(check(driver.cuMemAlloc(nbytes)))
        except CudaError as e:
            raise LlmcError(f"out of GPU memory allocating {nbytes / 2**20:.0f} MiB for {what} "
                            f"({e}); free the GPU or lower --gpu-memory-utilization") from None
        self.buffers.append(ptr)
        self.nbytes += nbytes
        return ptr

    def words(self, count: int, value: int, what: str) -> int:
        """`count` 32-bit words (at least one), each `value`'s bits."""
        from cuda.bindings import driver

        ptr = self.alloc(4 * count, what)
        check(driver.cuMemsetD32(ptr, value, max(count, 1)))
        return ptr

    def close(self) -> None:
        from cuda.bindings import driver

        for ptr in self.buffers:
            driver.cuMemFree(ptr)
        self.buffers = []


class CudaSession:
    name = "cuda"

    def __init__(self, engine: EngineFile, log: Callable[[str], None] | None = None,
                 gpu_memory_utilization: float = 0.9, max_kv_blocks: int | None = None,
                 cuda_graphs: bool = True):
        missing = runtime_missing()
        if missing:
            raise LlmcError(f"cannot run {engine.path} here: {missing}")
        if not 0 < gpu_memory_utilization <= 1:
            raise LlmcError(f"gpu_memory_utilization must be in (0, 1], got "
                            f"{gpu_memory_utilization}")
        from cuda.bindings import driver

        self.header = engine.header
        self.plan = Plan.from_dict(json.loads(engine.section(PLAN).tobytes()))
        self.limits = self.header.build.limits
        self.io = self.header.io
        self.log = log or (lambda _: None)
        gpus, why = list_gpus()
        if not gpus:
            raise LlmcError(f"cannot run {engine.path}: no NVIDIA GPU here ({why})")
        self.gpu = next((g for g in gpus if g.arch == self.plan.arch), None)
        if self.gpu is None:
            found = ", ".join(f"{g.name} ({g.arch})" for g in gpus)
            raise LlmcError(f"{engine.path} holds kernels for {self.plan.arch}, but this "
                            f"machine has {found}; rebuild it here with `llmc build --backend "
                            f"cuda` (or --gpu-arch {gpus[0].arch})")
        dev = check(driver.cuDeviceGet(self.gpu.index))
        self._ctx = check(driver.cuDevicePrimaryCtxRetain(dev))
        self._dev = dev
        check(driver.cuCtxSetCurrent(self._ctx))
        self.stream = int(check(driver.cuStreamCreate(0)))
        self.mem = _DeviceMemory()
        self._graphs: dict[int, object] = {}
        self.cuda_graphs = cuda_graphs
        self.broken = ""
        try:
            self._load(engine, gpu_memory_utilization, max_kv_blocks)
        except BaseException:
            self.close()
            raise

    # --- loading ---------------------------------------------------------------------------

    def _load(self, engine: EngineFile, utilization: float, max_kv_blocks: int | None):
        from cuda.bindings import driver

        from llmc.backends.cuda.gemm import Blas
        from llmc.plugins.launch import Functions

        plan = self.plan
        self.functions = Functions(plan.arch, {m: bytes(engine.section(cubin_section(m)))
                                               for m in plan.modules})
        self.sm_count = self.gpu.sm_count
        self.max_smem = device_max_smem(self.gpu.index)
        # Prefill steps take Hopper's TMA + wgmma attention where the engine holds it
        # (sm_90a engines built since it exists); False runs the mma.sync kernel instead.
        self.sm90_attention = SM90_MODULE in plan.modules
        # INT4 steps of 33-128 rows take the small-M GEMM's wgmma kernel where the engine holds
        # it (sm_90a engines with INT4 weights built since it exists).
        probe = w4_gemm_launch(W4GW_MIN_M, 16, 128, plan.dtype, group=128, sm90=True)
        self.w4_sm90 = plan.arch == "sm_90a" and "qgemv" in plan.modules and \
            self.functions.has(probe.module, probe.kernel)
        # MoE steps past the 8-row kernel's take the grouped GEMMs' wgmma kernels where the
        # engine holds them, the FP8 experts' too (sm_90a engines of a mixture built since).
        probes = [moe_gemm_launch(4096, 8, 2, 32, 32, plan.dtype, act=True, sm90=True,
                                  fp8b_group=g) for g in (0, 32)]
        self.moe_sm90 = plan.arch == "sm_90a" and "moe" in plan.modules and all(
            self.functions.has(p.module, p.kernel) for p in probes
            if p.module in plan.modules)
        # ... and a mixture whose GEMMs are both over FP8 experts takes tiles of 256 positions
        # for steps of many rows where the engine holds them (sm_90a engines built since).
        wide = moe_gemm_launch(4096, 8, 2, 32, 32, plan.dtype, act=True, sm90=True,
                               fp8b_group=32, fp8b_layer=True)
        self.moe_fp8b_wide = self.moe_sm90 and wide.module in plan.modules and \
            self.functions.has(wide.module, wide.kernel)
        # Steps of many routed rows count and place them over a grid where the engine's moe
        # module holds those kernels (engines of a mixture built since).
        self.moe_grid_route = "moe" in plan.modules and self.functions.has("moe", "moe_place")
        # Split decode combines its splits in the decode kernel; False runs attn_reduce after
        # it, as the TensorRT plugin does (for A/B timing).
        self.fuse_attention_reduce = True
        # Decode attention takes its splits from a schedule written before each step
        # (attention_plan.decode_schedule); False: each token's context over a fixed split
        # count, as the TensorRT plugin does (for A/B timing; set before the first step).
        self.scheduled_decode = True
        self._schedule_plans = {}   # (T, B, the two switches) -> decode_schedules of a step
        weights = engine.section(WEIGHTS)
        self.weights = self.mem.alloc(weights.size, "the weights")
        check(driver.cuMemcpyHtoD(self.weights, weights.ctypes.data, weights.size))
        self.arena = self.mem.alloc(plan.arena_bytes, "the activation arena")
        self.consts = {}
        for name, v in plan.values.items():
            if v.where == "const":
                data = np.asarray(v.data, np.float32)
                self.consts[name] = self.mem.alloc(data.nbytes, name)
                check(driver.cuMemcpyHtoD(self.consts[name], data.ctypes.data, data.nbytes))
        # control inputs: device buffers at their largest, filled from one pinned staging area
        lim = self.limits
        self.max_width = lim.max_blocks_per_seq
        sizes = {contract.INPUT_IDS: lim.max_num_tokens, contract.POSITION_IDS: lim.max_num_tokens,
                 contract.SEQ_STARTS: lim.max_batch_size + 1,
                 contract.CONTEXT_LENS: lim.max_batch_size,
                 contract.BLOCK_TABLES: lim.max_batch_size * self.max_width,
                 contract.LAST_TOKEN_ROWS: lim.max_batch_size}
        # FP8 GEMMs that scale first tokens on their own read which rows those are (_run)
        self.first_tokens = first_tokens(plan)
        if self.first_tokens:
            sizes[FIRST_TOKENS] = lim.max_num_tokens
        self.inputs = {n: self.mem.alloc(4 * k, n) for n, k in sizes.items()}
        # each decode schedule at its largest (a decode step of max_batch_size tokens), staged
        # after the inputs
        full = decode_schedules(plan, self._step(lim.max_batch_size, lim.max_batch_size,
                                                 self.max_width, num_blocks=0))
        ints = {name: att.items * SCHEDULE_ROW for name, att in full.items()}
        self.schedules = {name: self.mem.alloc(4 * n, name) for name, n in ints.items()}
        self._staging_bytes = 4 * sum(sizes.values()) + 4 * sum(ints.values())
        self._staging, self._staging_view = pinned(self._staging_bytes, ctypes.c_int32)
        from llmc.plugins.attention_plan import attention_workspace_bound

        ws = counters = 0
        for op in plan.ops:
            if op.op == "attention":
                a = op.attrs
                for scheduled in (False, True):   # decode_schedule may be switched off
                    ws = max(ws, attention_workspace_bound(
                        lim.max_num_tokens, lim.max_batch_size, a["hq"], a["hkv"], a["d"],
                        self.max_width, a["block_size"], self.sm_count,
                        max_smem=self.max_smem, window=a["window"], e4m3="kv_scale" in a,
                        schedule=scheduled))
                counters = max(counters, min(lim.max_num_tokens, lim.max_batch_size) * a["hkv"])
        self.attn_ws = self.mem.alloc(ws, "the attention workspace")
        # a (token, kv head) counter for each split decode CTA group, zeroed once: the last
        # CTA of a group sets it back (attention_plan.decode_plan's fuse_reduce)
        self.attn_counters = self.mem.words(counters, 0, "the attention's split counters")
        gemm_ws = self.mem.alloc(GEMM_WORKSPACE, "the cuBLASLt workspace")
        self.blas = Blas(gemm_ws, GEMM_WORKSPACE)
        self.gemms = {}
        for op in plan.ops:
            if op.op == "gemm":
                a = op.attrs
                key = gemm_key(op)
                if key not in self.gemms:
                    fp8 = a.get("quant") == "fp8"
                    self.gemms[key] = self.blas.plan(
                        a["n"], a["k"], dtype=FP8 if fp8 else plan.dtype,
                        out_dtype=a["out_dtype"], transpose_b=a["trans_b"],
                        bias=key[4], max_m=lim.max_num_tokens)
        ws_bytes, counters = qgemm_scratch(plan, lim.max_num_tokens, lim.max_batch_size,
                                           self.sm_count, self.w4_sm90)
        self.qgemm_ws = self.mem.alloc(ws_bytes, "the quantized GEMMs' workspace")
        self.w4g_counters = self.mem.words(counters, 0, "the INT4 GEMM's tile counters")
        self.fp8_ones = self.fp8_row_scales = 0
        if any(op.attrs.get("quant") == "fp8" for op in plan.ops):
            self.fp8_ones = self.mem.words(lim.max_num_tokens, 0x3F800000,  # 1.0f
                                           "FP8 unit scales")
        if self.first_tokens:
            self.fp8_row_scales = self.mem.alloc(4 * lim.max_num_tokens, "FP8 row scales")
        self.logits_bytes = numel(plan.values[plan.output].shape, 1, lim.max_batch_size) * 4
        self._logits_host, self._logits_view = pinned(self.logits_bytes, ctypes.c_float)
        self._sampling = None
        self._sample_staging = 0
        self._ban_buffers, self._ban_staging, self._bans = None, 0, None
        self._allocate_kv_pool(utilization, max_kv_blocks)

    def _allocate_kv_pool(self, utilization: float, max_kv_blocks: int | None) -> None:
        """One pool per layer, every block zeroed. Capacity: what the memory budget allows,
        at most what the build limits can address, plus one scratch block for padded rows."""
        from cuda.bindings import driver

        io = self.io
        # The kernels read the pool as the plan says (E4M3 where its ops carry kv_scale): the
        # header's KV dtype, which sizes it, must agree.
        e4m3 = {"kv_scale" in op.attrs for op in self.plan.ops if op.op == "attention"}
        if e4m3 != {io.kv_dtype == FP8}:
            raise LlmcError(f"this engine's plan and header disagree on the KV cache dtype "
                            f"({io.kv_dtype}); rebuild it")
        # An E4M3 pool is one byte an element: the same budget holds twice the blocks.
        self.block_bytes = 2 * io.kv_heads * io.block_size * io.head_dim * itemsize(io.kv_dtype)
        per_block = self.block_bytes * io.num_layers
        free, total = check(driver.cuMemGetInfo())
        budget = int(total * utilization) - (total - free)
        wanted = self.limits.max_num_blocks if max_kv_blocks is None else max_kv_blocks
        least = self.limits.max_blocks_per_seq   # one sequence at the longest length
        fits = budget // per_block - 1
        if fits < least:
            need = (least + 1) * per_block
            raise LlmcError(
                f"the KV cache needs at least {need / 2**20:.0f} MiB (one sequence of "
                f"{self.limits.max_seq_len} tokens) but {max(budget, 0) / 2**20:.0f} MiB of the "
                f"{total / 2**30:.1f} GiB GPU are left at gpu_memory_utilization "
                f"{utilization}; raise --gpu-memory-utilization, free the GPU, or rebuild "
                "with a smaller --max-seq-len")
        self.kv_capacity = max(1, min(wanted, fits))
        self.num_blocks = self.kv_capacity + 1          # + the scratch block
        self.scratch_block = self.kv_capacity
        self.kv = [self.mem.alloc(self.block_bytes * self.num_blocks, f"layer {i}'s KV pool")
                   for i in range(io.num_layers)]
        for ptr in self.kv:
            check(driver.cuMemsetD8Async(ptr, 0, self.block_bytes * self.num_blocks,
                                         self.stream))
        check(driver.cuStreamSynchronize(self.stream))
        self.log(f"cuda: {self.gpu.name} ({self.gpu.arch}), weights "
                 f"{self.plan.weights_bytes / 2**20:.0f} MiB, KV pool {self.kv_capacity} blocks "
                 f"({self.kv_capacity * per_block / 2**20:.0f} MiB)")

    # --- the Session interface ----------------------------------------------------------------

    def allocate_kv(self, num_blocks: int) -> None:
        """The pool was sized at load; the runtime may use up to kv_capacity blocks."""
        if num_blocks > self.kv_capacity:
            raise LlmcError(f"{num_blocks} KV blocks asked for, but this GPU holds "
                            f"{self.kv_capacity}; lower the batch or the lengths")

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One ragged step -> logits float32 [B, vocab]."""
        return self._guarded(lambda: self._fetch_logits(self._run(inputs)))

    def step_sample(self, inputs: dict[str, np.ndarray], temperature, top_k, top_p, seed,
                    counter, allowed=None) -> np.ndarray:
        """One ragged step, sampled on the GPU (runtime/sampler.py's rules, one seeded
        stream per row: the draw depends on (seed, counter) alone): token ids int32 [B].
        Only the ids cross to the host. Per-row arrays (or scalars) of the parameters;
        counter = how many tokens that row's sequence has sampled before. allowed: None, or
        a function called once the step's forward is launched (so the host computes it while
        the GPU runs) that returns the rows' allowed-token bitmasks, int32 [B, ceil(V / 32)]
        (structured outputs; needs bans_tokens)."""
        return self._guarded(lambda: self._step_sample(inputs, temperature, top_k, top_p, seed,
                                                       counter, allowed))

    @property
    def bans_tokens(self) -> bool:
        """Whether step_sample takes `allowed`: the engine's sampling module has the kernel
        (engines built before it do not)."""
        if self._bans is None:
            self._bans = self.functions.has("sampling", "ban_tokens_f32")
        return self._bans

    def _step_sample(self, inputs, temperature, top_k, top_p, seed, counter,
                     allowed=None) -> np.ndarray:
        from cuda.bindings import driver

        from llmc.plugins import launch_rules as lr
        from llmc.plugins.launch import DevPtr

        b = self._run(inputs)
        if allowed is not None:
            self._ban(allowed(), b)
        params = self._sampling_buffers()
        host = self._sample_host
        per_row = [np.broadcast_to(np.asarray(x, dt), (b,)) for x, dt in (
            (temperature, np.float32), (top_k, np.int32), (top_p, np.float32),
            (seed, np.uint64), (counter, np.int32))]
        offset = 0
        for array, dev in zip(per_row, params[:5]):
            raw = np.ascontiguousarray(array).view(np.uint8)
            host[offset:offset + raw.size] = raw
            check(driver.cuMemcpyHtoDAsync(dev, self._sample_staging + offset, raw.size,
                                           self.stream))
            offset += raw.size
        vocab = self.io.vocab_size
        args = [DevPtr(self.ptr(self.plan.output)), *map(DevPtr, params[:5]), b, vocab,
                DevPtr(params[5]), DevPtr(0)]
        self.functions.launch(lr.sample_launch(b, vocab), args, self.stream)
        tokens = np.empty(b, np.int32)
        check(driver.cuMemcpyDtoHAsync(self._sample_staging + offset, params[5], 4 * b,
                                       self.stream))
        check(driver.cuStreamSynchronize(self.stream))
        tokens[:] = host[offset:offset + 4 * b].view(np.int32)
        return tokens

    def _ban(self, bitmask: np.ndarray, b: int) -> None:
        """-inf, in the step's logits on the device, at every token bitmask does not allow."""
        from cuda.bindings import driver

        from llmc.plugins import launch_rules as lr
        from llmc.plugins.launch import DevPtr

        vocab = self.io.vocab_size
        nbytes = b * ((vocab + 31) // 32) * 4
        if bitmask.dtype != np.int32 or bitmask.nbytes != nbytes:
            raise LlmcError(f"an allowed-token bitmask of {b} rows of {vocab} tokens is int32 "
                            f"[{b}, {(vocab + 31) // 32}], got {bitmask.dtype} "
                            f"{bitmask.shape}")
        if self._ban_buffers is None:   # pinned staging and its device copy, made on first use
            most = self.limits.max_batch_size * ((vocab + 31) // 32) * 4
            self._ban_staging, host = pinned(most)
            self._ban_buffers = (host, self.mem.alloc(most, "allowed-token bitmasks"))
        staging, (host, dev) = self._ban_staging, self._ban_buffers
        host[:nbytes] = np.ascontiguousarray(bitmask).view(np.uint8).reshape(-1)
        check(driver.cuMemcpyHtoDAsync(dev, staging, nbytes, self.stream))
        self.functions.launch(lr.ban_launch(b, vocab),
                              [DevPtr(self.ptr(self.plan.output)), DevPtr(dev), b, vocab],
                              self.stream)

    def _sampling_buffers(self):
        """Per-row parameters and the token ids, on the device, made on first use."""
        if self._sampling is None:
            b = self.limits.max_batch_size
            self._sampling = [self.mem.alloc(n * b, what) for n, what in (
                (4, "temperatures"), (4, "top-k"), (4, "top-p"), (8, "seeds"),
                (4, "counters"), (4, "sampled tokens"))]
            nbytes = 28 * b
            self._sample_staging, self._sample_host = pinned(nbytes)
        return self._sampling

    def close(self) -> None:
        from cuda.bindings import driver

        if getattr(self, "blas", None) is not None:
            self.blas.close()
            self.blas = None
        for g in self._graphs.values():
            driver.cuGraphExecDestroy(g)
        self._graphs = {}
        if getattr(self, "mem", None) is not None:
            check(driver.cuCtxSetCurrent(self._ctx))
            driver.cuStreamSynchronize(self.stream)
            self.mem.close()
        for attr in ("_staging", "_logits_host", "_sample_staging", "_ban_staging"):
            if getattr(self, attr, 0):
                driver.cuMemFreeHost(getattr(self, attr))
                setattr(self, attr, 0)
        if getattr(self, "stream", 0):
            driver.cuStreamDestroy(self.stream)
            self.stream = 0
        if getattr(self, "_ctx", None) is not None:
            driver.cuDevicePrimaryCtxRelease(self._dev)
            self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- one step ------------------------------------------------------------------------------

    def _guarded(self, step):
        """Run a step. A CUDA error inside one (a failed launch, a fault in a kernel) leaves
        the context unusable, so the session says so and refuses further steps: the caller
        reloads it. Bad inputs (LlmcError) leave it usable."""
        if self.broken:
            raise LlmcError(f"this cuda session hit a CUDA error earlier ({self.broken}) and "
                            "must be reloaded: open the engine again")
        try:
            return step()
        except CudaError as e:   # cuBLASLt's errors are CudaErrors too
            self.broken = str(e)
            raise LlmcError(f"a CUDA error stopped this step ({e}); the session must be "
                            "reloaded: open the engine again") from None

    def _run(self, inputs: dict[str, np.ndarray]) -> int:
        """Copy the inputs in and run the step; returns B (rows of logits)."""
        from cuda.bindings import driver

        check(driver.cuCtxSetCurrent(self._ctx))
        ids = inputs[contract.INPUT_IDS]
        t, b = int(ids.shape[0]), int(inputs[contract.CONTEXT_LENS].shape[0])
        self._check_shape(t, b, inputs)
        if self.first_tokens:
            first = np.asarray(inputs[contract.POSITION_IDS]) == 0
            inputs = {**inputs, FIRST_TOKENS: first.astype(np.int32)}
        bucket = next((x for x in decode_buckets(self.limits.max_batch_size) if x >= b), None)
        if self.cuda_graphs and t == b and bucket is not None:
            self._copy_in(self._pad_decode(inputs, bucket), bucket, bucket)
            graph = self._graphs.get(bucket)
            if graph is None:
                self._launch_ops(bucket, bucket, self.max_width)   # warm: modules, algos
                graph = self._capture(bucket)
            check(driver.cuGraphLaunch(graph, self.stream))
        else:
            width = int(inputs[contract.BLOCK_TABLES].shape[1])
            self._copy_in(inputs, t, b)
            self._launch_ops(t, b, width)
        return b

    def _check_shape(self, t: int, b: int, inputs) -> None:
        lim = self.limits
        if not (1 <= b <= lim.max_batch_size and b <= t <= lim.max_num_tokens):
            raise LlmcError(f"a step of {t} tokens in {b} sequences is outside this engine's "
                            f"limits (max_batch_size {lim.max_batch_size}, max_num_tokens "
                            f"{lim.max_num_tokens})")
        width = inputs[contract.BLOCK_TABLES].shape[1]
        if width > self.max_width:
            raise LlmcError(f"block tables of width {width} exceed the engine's "
                            f"{self.max_width} blocks a sequence")

    def _pad_decode(self, inputs, bucket: int) -> dict[str, np.ndarray]:
        """A decode step of B rows as one of `bucket` rows at full table width; the padding
        rows decode token 0 at position 0 into the scratch block."""
        b = inputs[contract.CONTEXT_LENS].shape[0]
        pad = bucket - b
        tables = np.full((bucket, self.max_width), self.scratch_block, np.int32)
        given = inputs[contract.BLOCK_TABLES]
        tables[:b, :given.shape[1]] = given
        i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
        return {
            contract.INPUT_IDS: i32(np.concatenate([inputs[contract.INPUT_IDS], [0] * pad])),
            contract.POSITION_IDS: i32(np.concatenate([inputs[contract.POSITION_IDS],
                                                       [0] * pad])),
            contract.SEQ_STARTS: np.arange(bucket + 1, dtype=np.int32),
            contract.CONTEXT_LENS: i32(np.concatenate([inputs[contract.CONTEXT_LENS],
                                                       [1] * pad])),
            contract.BLOCK_TABLES: tables,
            contract.LAST_TOKEN_ROWS: np.arange(bucket, dtype=np.int32),
            # the padding rows are at position 0 too, but no sequence's first token: the FP8
            # GEMMs would measure their rows in every padded decode step
            **({FIRST_TOKENS: i32(np.concatenate([inputs[FIRST_TOKENS], [0] * pad]))}
               if self.first_tokens else {}),
        }

    def _copy_in(self, inputs: dict[str, np.ndarray], t: int, b: int) -> None:
        """All control inputs through the pinned staging area, one async copy each; then,
        for a decode step of T = B tokens, the decode schedules made from its context
        lengths."""
        from cuda.bindings import driver

        # the previous step's copies out of the staging area must be done before reuse
        check(driver.cuStreamSynchronize(self.stream))
        arrays = [(inputs[name], dev) for name, dev in self.inputs.items()]
        if t == b:
            key = (t, b, self.scheduled_decode, self.fuse_attention_reduce)
            plans = self._schedule_plans.get(key)
            if plans is None:   # the same ops' plans every step of this shape
                plans = decode_schedules(self.plan, self._step(t, b, self.max_width))
                self._schedule_plans[key] = plans
            if plans:
                arrays += [(decode_schedule(inputs[contract.CONTEXT_LENS], att),
                            self.schedules[name])
                           for name, att in plans.items()]
        offset = 0
        for array, dev in arrays:
            a = np.ascontiguousarray(array, np.int32).reshape(-1)
            self._staging_view[offset:offset + a.size] = a
            if a.size:
                check(driver.cuMemcpyHtoDAsync(dev, self._staging + 4 * offset, 4 * a.size,
                                               self.stream))
            offset += a.size

    def _fetch_logits(self, b: int) -> np.ndarray:
        from cuda.bindings import driver

        vocab = self.io.vocab_size
        nbytes = b * vocab * 4
        check(driver.cuMemcpyDtoHAsync(self._logits_host, self.ptr(self.plan.output), nbytes,
                                       self.stream))
        check(driver.cuStreamSynchronize(self.stream))
        return self._logits_view[:b * vocab].reshape(b, vocab).copy()

    def _capture(self, bucket: int):
        from cuda.bindings import driver

        mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        check(driver.cuStreamBeginCapture(self.stream, mode))
        try:
            self._launch_ops(bucket, bucket, self.max_width)
        finally:
            graph = check(driver.cuStreamEndCapture(self.stream))
        exe = check(driver.cuGraphInstantiate(graph, 0))
        check(driver.cuGraphDestroy(graph))
        self._graphs[bucket] = exe
        return exe

    # --- the ops ---------------------------------------------------------------------------------

    def ptr(self, name: str) -> int:
        v = self.plan.values[name]
        while v.where == "view":
            name = v.base
            v = self.plan.values[name]
        if v.where == "arena":
            return self.arena + v.offset
        if v.where == "weight":
            return self.weights + v.offset
        if v.where == "input":
            return self.inputs[name]
        return self.consts[name]

    def _step(self, t: int, b: int, width: int, num_blocks: int | None = None) -> Step:
        """num_blocks: the KV pools' (default: this session's, once allocated)."""
        return Step(t, b, width, self.num_blocks if num_blocks is None else num_blocks,
                    self.sm_count, self.max_smem,
                    self.sm90_attention, self.fuse_attention_reduce, self.w4_sm90,
                    self.scheduled_decode, self.moe_sm90, self.moe_grid_route,
                    self.moe_fp8b_wide)

    def _launch_ops(self, t: int, b: int, width: int) -> None:
        stream = self.stream
        kernels = self.functions
        for item in launches(self.plan, self._step(t, b, width), self._pointers):
            if item[0] == "gemm":
                _, key, (x, w, y, m, bias, *scales) = item
                if scales:      # FP8: x_scale * w_scale per channel, ones per token
                    self.gemms[key].run(x, w, y, m, stream, bias, w_scale_ptr=scales[0],
                                        x_scale_ptr=scales[1])
                else:
                    self.gemms[key].run(x, w, y, m, stream, bias)
            else:
                _, launch, args = item
                kernels.launch(launch, args, stream)

    def _pointers(self, name: str) -> int:
        layer = contract.kv_layer(name)
        if layer is not None:
            return self.kv[layer]
        if name == ATTN_WORKSPACE:
            return self.attn_ws
        if name == ATTN_COUNTERS:
            return self.attn_counters
        if name in self.schedules:
            return self.schedules[name]
        if name == QGEMM_WORKSPACE:
            return self.qgemm_ws
        if name == W4G_COUNTERS:
            return self.w4g_counters
        if name == FP8_UNIT_SCALES:
            return self.fp8_ones
        if name == FIRST_TOKENS:
            return self.inputs[FIRST_TOKENS]
        if name == FP8_ROW_SCALES:
            return self.fp8_row_scales
        return self.ptr(name)
