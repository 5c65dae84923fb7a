"""GEMMs for the cuda backend: one cublasLtMatmul per call, on pre-planned descriptors.

What it does
------------
The model graph's matrix products, in its row-major terms:

    Y[M, N] = X[M, K] @ W[K, N] (+ bias[N])   weights stored [in, out] (the linear layers)
    Y[M, N] = X[M, K] @ E[N, K]^T             the tied LM head: E is the embedding table

with X and W/E in fp16 or bf16, accumulation and scaling in fp32 (CUBLAS_COMPUTE_32F, scale
type CUDA_R_32F) and Y in the input dtype or in fp32 (the LM head writes fp32 logits directly).
A `Blas` owns the cuBLASLt handle and the caller's workspace; `Blas.plan(n, k, ...)` makes a
`GemmPlan` once per (N, K, dtype, out dtype, transpose, bias); `GemmPlan.run(x, w, y, m,
stream)` is exactly one cublasLtMatmul on `stream`: no allocation, no synchronisation, no new
Python objects beyond the call's own ints, so it can be captured in a CUDA graph.

Why cuBLASLt, and through nvmath's bindings
-------------------------------------------
The backend launches ~200 GEMMs per decode step and captures decode steps in CUDA graphs, so
the per-call path must be the library call and nothing else.

- cuBLASLt rather than cuBLAS: descriptors (types, transposes, epilogue) are built once and
  reused; the algorithm is chosen once per M bucket with cublasLtMatmulAlgoGetHeuristic and
  passed explicitly, so no heuristic runs inside the call; the bias add is fused as an
  epilogue (CUBLASLT_EPILOGUE_BIAS) instead of a second kernel; and the workspace is the
  caller's, so nothing is allocated behind our back during graph capture.
- nvmath.bindings.cublasLt rather than nvmath's high-level `Matmul`: the high-level object
  manages its own operands, streams, workspace and per-call bookkeeping (events, logging,
  operand wrapping) - what we need is the bare C API with integer pointers, which is what
  the low-level Cython bindings are (`cublasLt.matmul(handle, desc, alpha, a, adesc, ...)`
  maps 1:1 onto cublasLtMatmul, raising cuBLASLtError on a failed status).
- rather than ctypes over libcublasLt.so: the bindings locate the library that matches the
  installed CUDA (wheels or toolkit), carry the enums and the struct layouts
  (cublasLtMatmulHeuristicResult_t as a numpy dtype), and a Cython call costs far less than a
  ctypes call with 16 converted arguments.

The layout trick
----------------
cuBLASLt is column-major. A row-major [R, C] array is, byte for byte, a column-major C x R
matrix with leading dimension C. So instead of computing Y = X W we compute its transpose,
which needs no copies:

    Y^T = W^T X^T:   D (N x M, ld N)  =  A (N x K, ld N)  *  B (K x M, ld K)
                     D = Y as stored,    A = W as stored,    B = X as stored; opA = opB = N

    tied head, Y^T = E X^T:  A = E as stored is column-major K x N (ld K), and opA = T turns
                     it into the N x K operand the product needs.

The bias of CUBLASLT_EPILOGUE_BIAS is a vector over D's rows, which are Y's columns: bias[N].
Only the B and D layouts depend on M (their column count); A and the matmul descriptor are
fixed per plan.

Per-M state: layouts are created per exact M (lazily, cached)
--------------------------------------------------------------
The B and D layouts of a given M are created once (cublasLtMatrixLayoutCreate is host-only
and cheap) and cached by M, rather than re-set per call with cublasLtMatrixLayoutSetAttribute
(ROWS/COLS). Re-setting would cost two more binding calls per GEMM and would mutate
descriptors shared by every call of the plan, so an algorithm validated for one M could be run
with another; cached per-M layouts are immutable after creation. The algorithm comes from
heuristics run at plan time for M buckets 1, 2, 4, ... max_m; an M that is not itself a bucket
takes its bucket's best algorithm that cublasLtMatmulAlgoCheck accepts for the exact M (or, if
none does, its own heuristic query). `GemmPlan.prepare(*ms)` builds these entries ahead of
time: call it (or run once) for every M before capturing a CUDA graph, so capture does only
the matmul itself.

Constraints worth knowing
-------------------------
- C and D: cuBLASLt's supported-type table pairs each (A, B) type with one C/D type; C must
  have D's type and layout. Here beta = 0 and C is D (same pointer, same layout), so this holds
  for both outputs: fp16 x fp16 -> fp16 or fp32, bf16 x bf16 -> bf16 or fp32, all with
  COMPUTE_32F and an fp32 scale type.
- The bias vector has D's type (CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE left at its default):
  16-bit for a 16-bit output, fp32 for an fp32 output.
- Pointers (X, W/E, Y) must be aligned to `alignment` bytes (default 256, as torch and
  cudaMalloc give): heuristics are told so (MIN_ALIGNMENT_*_BYTES) and `run` checks it, since an
  algorithm chosen for 256-byte alignment may fail or misbehave on less.
- A plan is not re-entrant: `run` sets the bias pointer on the shared matmul descriptor when it
  changes. Use one plan per stream (or one Blas per stream, since the workspace is shared too).

`import llmc.backends.cuda.gemm` needs neither nvmath nor a GPU; nvmath is imported when a
`Blas` is made.
"""

from __future__ import annotations

import numpy as np

from llmc.devices import CudaError, check

# cudaDataType_t values (library_types.h; a stable ABI): the dtypes a plan takes.
CUDA_R = {"float32": 0, "float16": 2, "bfloat16": 14}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
            "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
INPUT_DTYPES = ("float16", "bfloat16")

DEFAULT_WORKSPACE = 32 * 1024 * 1024
# Headroom kept out of the workspace size told to the heuristics: nvmath's own Matmul adds 16
# bytes to the reported need when an epilogue is set ("workaround for library issue").
_WORKSPACE_SLACK = 256
_HEURISTIC_COUNT = 8  # algorithms asked per bucket; non-bucket Ms try them in order


class CublasError(CudaError):
    """A cuBLASLt call returned a status other than CUBLAS_STATUS_SUCCESS.

    `call` names the C function (e.g. "cublasLtMatmul"), `status` is the cublasStatus_t value
    (None if the bindings did not give one)."""

    def __init__(self, call: str, status: int | None, detail: str = ""):
        self.call = call
        self.status = status
        name = _status_name(status)
        text = f"{call} failed with {name}" + (f" ({status})" if status is not None else "")
        super().__init__(text + (f": {detail}" if detail else ""))


def _status_name(status) -> str:
    if status is None:
        return "an unknown status"
    try:
        return "CUBLAS_STATUS_" + _cublas().Status(int(status)).name
    except Exception:  # the name is a courtesy: never mask the error itself
        return "cuBLAS status"


def _lt():
    """nvmath's cuBLASLt bindings, imported on first use (CI has no nvmath)."""
    try:
        from nvmath.bindings import cublasLt
    except ImportError as exc:
        raise ImportError(
            "the cuda backend's GEMMs need nvmath-python's cuBLASLt bindings and the cuBLAS "
            "library: pip install nvmath-python==1.0.0 nvidia-cublas") from exc
    return cublasLt


def _cublas():
    """nvmath's cuBLAS bindings: the cublasComputeType_t, cublasOperation_t and status enums."""
    _lt()
    from nvmath.bindings import cublas

    return cublas


def _call(name: str, fn, *args, context: str = ""):
    """Call a binding; a cuBLASLtError becomes a CublasError naming the C call and status."""
    lt = _lt()
    try:
        return fn(*args)
    except lt.cuBLASLtError as exc:
        status = getattr(exc, "status", None)
        detail = "; ".join(s for s in (context, str(exc)) if s)
        raise CublasError(name, status, detail) from exc


def normalize_dtype(dtype) -> str:
    """'bf16' / 'bfloat16' / torch.bfloat16 / numpy float16 -> 'bfloat16' / 'float16' / ..."""
    text = str(dtype).lower().removeprefix("torch.")
    if text not in _ALIASES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose float16, bfloat16 or float32")
    return _ALIASES[text]


def _set_attr(name: str, setter, dtype_fn, obj: int, attr, value) -> None:
    """cublasLt*SetAttribute with `value` in the attribute's own C type (dtype_fn(attr))."""
    buf = np.array([value], dtype=dtype_fn(attr))
    _call(name, setter, obj, attr, buf.ctypes.data, buf.itemsize,
          context=f"attribute {getattr(attr, 'name', attr)} = {value}")


def m_buckets(max_m: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to max_m; max_m itself is the last bucket (a power of two or not)."""
    out, m = [], 1
    while m < max_m:
        out.append(m)
        m *= 2
    out.append(max_m)
    return tuple(out)


class Workspace:
    """A device buffer for cuBLASLt's workspace, cudaMalloc'd through cuda-bindings.

    One per stream is enough: every GEMM on the stream is serialised and may reuse it. A
    session that already owns device memory can pass its own pointer to Blas instead."""

    def __init__(self, size: int = DEFAULT_WORKSPACE):
        from cuda.bindings import runtime

        self.size = int(size)
        self.ptr = int(check(runtime.cudaMalloc(self.size)))

    def close(self) -> None:
        if self.ptr:
            from cuda.bindings import runtime

            ptr, self.ptr = self.ptr, 0
            check(runtime.cudaFree(ptr))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Blas:
    """A cuBLASLt handle (cublasLtCreate once, cublasLtDestroy on close) and the workspace its
    plans use: `workspace_ptr` is device memory of `workspace_size` bytes owned by the caller,
    alive until close(). The plans made here are closed with it.

    The handle is not tied to a stream; each run() names its stream. Make the Blas (and its
    plans) with the target device's context current: heuristics read that device."""

    def __init__(self, workspace_ptr: int, workspace_size: int):
        self._lt = _lt()
        self.workspace_ptr = int(workspace_ptr)
        self.workspace_size = int(workspace_size)
        if self.workspace_size and not self.workspace_ptr:
            raise ValueError("workspace_size > 0 with a null workspace pointer")
        self.handle = _call("cublasLtCreate", self._lt.create)
        self.version = int(self._lt.get_version())
        self._plans: list[GemmPlan] = []

    def plan(self, n: int, k: int, *, dtype="bfloat16", out_dtype=None,
             transpose_b: bool = False, bias: bool = False, max_m: int = 512,
             alignment: int = 256) -> GemmPlan:
        """A GemmPlan for Y[m, n] = X[m, k] @ W[k, n] (or @ E[n, k]^T with transpose_b),
        m in 1..max_m; out_dtype None means dtype."""
        if not self.handle:
            raise ValueError("this Blas is closed")
        plan = GemmPlan(self, n, k, dtype=dtype, out_dtype=out_dtype, transpose_b=transpose_b,
                        bias=bias, max_m=max_m, alignment=alignment)
        self._plans.append(plan)
        return plan

    def close(self) -> None:
        for plan in self._plans:
            plan.close()
        self._plans.clear()
        if self.handle:
            handle, self.handle = self.handle, 0
            _call("cublasLtDestroy", self._lt.destroy, handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GemmPlan:
    """Y[m, N] = X[m, K] @ W[K, N] (+ bias[N]), or X @ E[N, K]^T with transpose_b, for any
    m in 1..max_m; all row-major, pointers are device addresses (ints).

    Made by Blas.plan. Holds the matmul descriptor, A's layout, the preference, fp32 alpha = 1
    and beta = 0 (host pointer mode), the heuristic results per M bucket and, per M seen, the
    B/D layouts and the algorithm. The weight pointer is a run() argument, so one plan serves
    every layer with the same shape."""

    def __init__(self, blas: Blas, n: int, k: int, *, dtype="bfloat16", out_dtype=None,
                 transpose_b: bool = False, bias: bool = False, max_m: int = 512,
                 alignment: int = 256):
        lt = self._lt = blas._lt
        cublas = _cublas()
        self.n, self.k, self.max_m = int(n), int(k), int(max_m)
        self.dtype = normalize_dtype(dtype)
        self.out_dtype = self.dtype if out_dtype is None else normalize_dtype(out_dtype)
        self.transpose_b, self.bias = bool(transpose_b), bool(bias)
        self.alignment = int(alignment)
        if self.dtype not in INPUT_DTYPES:
            raise ValueError(f"GEMM inputs must be float16 or bfloat16, not {self.dtype}")
        if self.out_dtype not in (self.dtype, "float32"):
            raise ValueError(f"a {self.dtype} GEMM writes {self.dtype} or float32, "
                             f"not {self.out_dtype}")
        if min(self.n, self.k, self.max_m) < 1:
            raise ValueError(f"GEMM sizes must be positive: n={n}, k={k}, max_m={max_m}")
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise ValueError(f"alignment must be a power of two, not {alignment}")
        self._align_mask = self.alignment - 1
        self._blas = blas
        self._handle = blas.handle
        self._ws_ptr, self._ws_size = blas.workspace_ptr, blas.workspace_size
        self._matmul = lt.matmul
        self._error = lt.cuBLASLtError
        self._desc = self._pref = self._a = 0
        self._layouts: list[int] = []
        self._by_m: dict[int, tuple[int, int, int]] = {}
        self._algos: list[np.ndarray] = []  # owns the algorithm structs _by_m points into
        self._buckets: dict[int, np.ndarray] = {}
        try:
            self._build(lt, cublas)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        form = "X @ E^T" if self.transpose_b else "X @ W"
        return (f"GemmPlan({form}, N={self.n}, K={self.k}, {self.dtype} -> {self.out_dtype}"
                f"{', bias' if self.bias else ''}, M<={self.max_m})")

    # ------------------------------------------------------------------ plan time

    def _build(self, lt, cublas) -> None:
        mda = lt.MatmulDescAttribute
        self._desc = _call("cublasLtMatmulDescCreate", lt.matmul_desc_create,
                           int(cublas.ComputeType.COMPUTE_32F), CUDA_R["float32"])
        setd = lt.get_matmul_desc_attribute_dtype

        def set_desc(attr, value):
            _set_attr("cublasLtMatmulDescSetAttribute", lt.matmul_desc_set_attribute, setd,
                      self._desc, attr, value)

        op_a = cublas.Operation.T if self.transpose_b else cublas.Operation.N
        set_desc(mda.TRANSA, int(op_a))
        set_desc(mda.TRANSB, int(cublas.Operation.N))
        # The bias pointer lives in the descriptor; run() rewrites it only when it changes.
        self._bias_buf = np.zeros(1, dtype=setd(mda.BIAS_POINTER))
        self._bias_addr, self._bias_attr = self._bias_buf.ctypes.data, mda.BIAS_POINTER
        self._bias_size = self._bias_buf.itemsize
        self._bias_ptr = 0
        self._set_desc = lt.matmul_desc_set_attribute
        if self.bias:
            set_desc(mda.EPILOGUE, int(lt.Epilogue.BIAS))
        # A: W as stored is column-major N x K (ld N); E as stored is K x N (ld K), used as E^T.
        rows, cols = (self.k, self.n) if self.transpose_b else (self.n, self.k)
        self._a = self._layout(self.dtype, rows, cols, rows)

        self._alpha = np.ones(1, dtype=np.float32)  # the scale type is fp32
        self._beta = np.zeros(1, dtype=np.float32)
        self._alpha_ptr, self._beta_ptr = self._alpha.ctypes.data, self._beta.ctypes.data

        self._pref = _call("cublasLtMatmulPreferenceCreate", lt.matmul_preference_create)
        pa = lt.MatmulPreferenceAttribute

        def set_pref(attr, value):
            _set_attr("cublasLtMatmulPreferenceSetAttribute", lt.matmul_preference_set_attribute,
                      lt.get_matmul_preference_attribute_dtype, self._pref, attr, value)

        self._ws_budget = max(0, self._ws_size - _WORKSPACE_SLACK)
        set_pref(pa.MAX_WORKSPACE_BYTES, self._ws_budget)
        for attr in (pa.MIN_ALIGNMENT_A_BYTES, pa.MIN_ALIGNMENT_B_BYTES,
                     pa.MIN_ALIGNMENT_C_BYTES, pa.MIN_ALIGNMENT_D_BYTES):
            set_pref(attr, min(self.alignment, 256))

        for bucket in m_buckets(self.max_m):
            self.prepare(bucket)

    def _layout(self, dtype: str, rows: int, cols: int, ld: int) -> int:
        layout = _call("cublasLtMatrixLayoutCreate", self._lt.matrix_layout_create,
                       CUDA_R[dtype], rows, cols, ld,
                       context=f"{dtype} {rows} x {cols}, ld {ld}")
        self._layouts.append(layout)
        return layout

    def _heuristic(self, b: int, d: int, m: int) -> np.ndarray:
        """The algorithms cuBLASLt's heuristics rank for this plan at M = m, best first."""
        lt = self._lt
        results = np.zeros(_HEURISTIC_COUNT, dtype=lt.matmul_heuristic_result_dtype)
        count = np.zeros(1, dtype=np.int32)
        _call("cublasLtMatmulAlgoGetHeuristic", lt.matmul_algo_get_heuristic, self._handle,
              self._desc, self._a, b, d, d, self._pref, _HEURISTIC_COUNT, results.ctypes.data,
              count.ctypes.data, context=f"{self!r} at M={m}")
        results = results[:int(count[0])]
        results = results[(results["state"] == 0)
                          & (results["workspace_size"] <= self._ws_budget)]
        if not len(results):
            raise CublasError("cublasLtMatmulAlgoGetHeuristic", None,
                              f"no algorithm for {self!r} at M={m} within a "
                              f"{self._ws_budget}-byte workspace")
        return results

    def _checked(self, candidates: np.ndarray, b: int, d: int) -> np.ndarray | None:
        """The first candidate cublasLtMatmulAlgoCheck accepts for these exact layouts."""
        lt = self._lt
        result = np.zeros(1, dtype=lt.matmul_heuristic_result_dtype)
        for i in range(len(candidates)):
            algo = candidates[i:i + 1].copy()
            try:
                lt.matmul_algo_check(self._handle, self._desc, self._a, b, d, d,
                                     algo.ctypes.data, result.ctypes.data)
            except lt.cuBLASLtError:
                continue
            if int(result[0]["workspace_size"]) <= self._ws_budget:
                return algo
        return None

    def prepare(self, *ms: int) -> None:
        """Build the per-M state (B and D layouts, the algorithm) for each M now. Host-only;
        call it for every M a CUDA graph will capture, before the capture."""
        if not self._desc:
            raise ValueError(f"{self!r} is closed")
        for m in ms:
            m = int(m)
            if m in self._by_m:
                continue
            if not 1 <= m <= self.max_m:
                raise ValueError(f"M={m} is outside 1..{self.max_m} of {self!r}")
            b = self._layout(self.dtype, self.k, m, self.k)       # X as stored: K x M, ld K
            d = self._layout(self.out_dtype, self.n, m, self.n)   # Y as stored: N x M, ld N
            bucket = next(x for x in m_buckets(self.max_m) if x >= m)
            if bucket == m:
                self._buckets[m] = self._heuristic(b, d, m)
                algo = self._buckets[m][:1].copy()
            else:
                if bucket not in self._buckets:
                    self.prepare(bucket)
                algo = self._checked(self._buckets[bucket], b, d)
                if algo is None:  # none of the bucket's algorithms fits this M: ask for it
                    algo = self._heuristic(b, d, m)[:1].copy()
            self._algos.append(algo)
            # algo (cublasLtMatmulAlgo_t) sits at offset 0 of the heuristic-result struct
            self._by_m[m] = (b, d, algo.ctypes.data)

    # ------------------------------------------------------------------ run time

    def run(self, x_ptr: int, w_ptr: int, y_ptr: int, m: int, stream: int,
            bias_ptr: int | None = None) -> None:
        """Enqueue Y = X @ W (+ bias) on `stream` as one cublasLtMatmul; returns at once.

        x_ptr: X[m, K]; w_ptr: W[K, N] (or E[N, K] with transpose_b); y_ptr: Y[m, N] in the
        out dtype; bias_ptr: bias[N] in the out dtype, required iff the plan has a bias.
        stream: a cudaStream_t/CUstream as an int (torch: stream.cuda_stream), 0 = legacy."""
        entry = self._by_m.get(m)
        if entry is None:
            self.prepare(m)
            entry = self._by_m[m]
        if (x_ptr | w_ptr | y_ptr) & self._align_mask:
            raise ValueError(f"{self!r}: X, W and Y must be {self.alignment}-byte aligned "
                             f"(got {x_ptr:#x}, {w_ptr:#x}, {y_ptr:#x})")
        if bias_ptr is not None or self.bias:
            self._use_bias(bias_ptr)
        b, d, algo = entry
        try:
            self._matmul(self._handle, self._desc, self._alpha_ptr, w_ptr, self._a, x_ptr, b,
                         self._beta_ptr, y_ptr, d, y_ptr, d, algo, self._ws_ptr,
                         self._ws_size, int(stream))
        except self._error as exc:
            raise CublasError("cublasLtMatmul", getattr(exc, "status", None),
                              f"{self!r} at M={m}; {exc}") from exc

    def _use_bias(self, bias_ptr: int | None) -> None:
        if not self.bias:
            raise ValueError(f"{self!r} was planned without a bias; plan with bias=True")
        if not bias_ptr:
            raise ValueError(f"{self!r} needs a bias pointer")
        if bias_ptr != self._bias_ptr:
            self._bias_buf[0] = bias_ptr
            try:
                self._set_desc(self._desc, self._bias_attr, self._bias_addr, self._bias_size)
            except self._error as exc:
                raise CublasError("cublasLtMatmulDescSetAttribute",
                                  getattr(exc, "status", None), f"BIAS_POINTER; {exc}") from exc
            self._bias_ptr = bias_ptr

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Destroy the descriptors (idempotent). The Blas closes its plans when it closes."""
        lt = self._lt
        for layout in self._layouts:
            _call("cublasLtMatrixLayoutDestroy", lt.matrix_layout_destroy, layout)
        self._layouts.clear()
        self._by_m.clear()
        self._algos.clear()
        self._buckets.clear()
        if self._pref:
            pref, self._pref = self._pref, 0
            _call("cublasLtMatmulPreferenceDestroy", lt.matmul_preference_destroy, pref)
        if self._desc:
            desc, self._desc = self._desc, 0
            _call("cublasLtMatmulDescDestroy", lt.matmul_desc_destroy, desc)
