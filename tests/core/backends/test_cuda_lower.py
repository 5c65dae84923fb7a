"""The cuda backend's build half, on the CPU: every family variant and SmolLM2 lower for every
target architecture (every node mapped, the plan well formed, the cubins compiled), the
activation arena's arithmetic, and clear errors for what the kernels cannot run."""

from __future__ import annotations

import json

import pytest

from llmc.backends.cuda.lower import MODULES, UnsupportedGraph, check_plan, lower
from llmc.backends.cuda.plan import (
    PLAN,
    Plan,
    align,
    cubin_section,
    itemsize,
    live_intervals,
    numel,
)
from llmc.build import BuildOptions, build
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.plugins.attention_plan import SM90_MODULE

pytest.importorskip("cuda.bindings.nvrtc", reason="the kernels extra (NVRTC) is not installed")

ARCHS = ("sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120")
LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=128, kv_block_size=16)
KINDS = ("llama-gqa", "llama-tied-rope3", "mistral-window", "qwen2-bias", "qwen3-qknorm",
         "gemma2-softcap", "gemma3-local-global", "gpt2-learned-pos")
# Phi-3's checkpoint-fused projections lower to the plan of a llama graph; one architecture
# shows it (the kernels compiled do not depend on the family).
MORE_KINDS = {"sm_90a": ("phi3-window",)}
# What differs between the kinds' plans: the gated activation fused into the gate-up GEMM
# (GPT-2: none, a plain GELU after its c_fc), the QKV bias added in rope_cache, each layer's
# window (Gemma: sliding layers, then full), q/k norms folded into rope_cache
ACT = {"gemma2-softcap": "geglu", "gemma3-local-global": "geglu", "gpt2-learned-pos": None}
QKV_BIAS = ("qwen2-bias", "gpt2-learned-pos")
WINDOWS = {"mistral-window": [12, 12], "phi3-window": [12, 12], "gemma2-softcap": [12, 0],
           "gemma3-local-global": [12, 0]}
QK_NORM = ("qwen3-qknorm", "gemma3-local-global")


def _build(folder, out, arch, dtype="bf16", limits=LIMITS, log=lambda _: None, **kw):
    build(BuildOptions(folder, out, backend="cuda", dtype=dtype, limits=limits, gpu_arch=arch,
                       **kw), log=log)
    return EngineFile(out)


def _plan(engine: EngineFile) -> Plan:
    return Plan.from_dict(json.loads(engine.section(PLAN).tobytes()))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_lowers(tiny_models_d64, tmp_path, arch):
    for kind in KINDS + MORE_KINDS.get(arch, ()):
        folder, model = tiny_models_d64[kind]
        said = []
        engine = _build(folder, tmp_path / f"{kind}.engine", arch, log=said.append)
        plan = _plan(engine)
        check_plan(plan)
        # the build says what it compiles: the plan's modules, for its dtype alone
        assert any(line.startswith(f"compiling {len(plan.modules)} kernel modules for {arch}, "
                                   "bfloat16 entry points") for line in said), said
        layers = model.config.num_hidden_layers
        counts = {op: sum(o.op == op for o in plan.ops) for op in ("rope_cache", "attention",
                                                                   "gemm", "swiglu", "gelu")}
        # per layer: q/k/v + o + gate-up (its SwiGLU/GeGLU fused in) + down GEMMs; + LM head
        act = ACT.get(kind, "swiglu")
        assert counts == {"rope_cache": layers, "attention": layers, "gemm": 4 * layers + 1,
                          "swiglu": 0, "gelu": 0 if act else layers}, kind
        gemms = [o for o in plan.ops if o.op == "gemm"]
        assert [o.attrs.get("act") for o in gemms] == [None, None, act, None] * layers + [None]
        gated = gemms[2]
        if act:
            assert len(gated.outputs) == 2 and gated.attrs["inter"] * 2 == gated.attrs["n"]
        assert all(o.attrs["trans_b"] for o in gemms)   # every weight stored [N, K]
        for o in gemms:
            assert plan.values[o.inputs[1]].shape == [o.attrs["n"], o.attrs["k"]]
        ropes = [o for o in plan.ops if o.op == "rope_cache"]
        assert all((o.inputs[1] is not None) == (kind in QKV_BIAS) for o in ropes)
        # Qwen3's and Gemma 3's per-head q/k norms are folded into rope_cache: two weights
        # and an eps
        assert all(("qk_norm_eps" in o.attrs) == (len(o.inputs) == 8) == (kind in QK_NORM)
                   for o in ropes)
        window = [o.attrs["window"] for o in plan.ops if o.op == "attention"]
        assert window == WINDOWS.get(kind, [0] * layers)
        head = [o for o in plan.ops if o.op == "gemm"][-1]   # Gemma 2: the soft-cap after it
        assert head.op == "gemm" and head.attrs["out_dtype"] == "float32"
        assert head.attrs.get("transposed", False) != model.config.tie_word_embeddings
        assert plan.arch == arch and engine.header.lowering["gpu_arch"] == arch
        # the soft-capped attention kernels: a module of their own, for Gemma 2 only; Hopper's
        # prefill kernel (16-bit pools, soft-capped or not) for sm_90a only
        assert plan.modules == list(MODULES) + (
            ["paged_attention_softcap"] if kind == "gemma2-softcap" else []) + (
            [SM90_MODULE] if arch == "sm_90a" else [])
        for module in plan.modules:
            cubin = engine.section(cubin_section(module))
            assert bytes(cubin[:4]) == b"\x7fELF", f"{module} for {arch} is not a cubin"
        assert engine.header.io.kv_dtype == "bfloat16"


@pytest.fixture(scope="module")
def smollm2_fused(smollm2_path, tmp_path_factory):
    from llmc.graph import save_onnx
    from llmc.model_zoo import load_model
    from llmc.passes import run_passes

    model = load_model(smollm2_path)
    graph, weights = model.build_graph("float16", 16)
    graph, weights, _ = run_passes(graph, weights)
    return save_onnx(graph, weights, tmp_path_factory.mktemp("smollm2-fused"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_smollm2_lowers(smollm2_fused, arch):
    from llmc.plugins.compiler import compile_all

    plan = lower(smollm2_fused, BuildLimits(), arch)
    kinds = {op.op for op in plan.ops}
    assert kinds == {"embedding", "rmsnorm", "add_rmsnorm", "gemm", "rope_cache", "attention",
                     "add", "gather_rows"}
    assert sum(op.op == "attention" for op in plan.ops) == 30
    assert plan.weights_bytes >= 134_000_000 * 2           # fp16 weights, aligned
    cubins = compile_all(archs=(arch,), modules=MODULES)
    assert all(cubins[(m, arch)] for m in MODULES)


def test_gemm_weights_are_rewritten_out_by_in(smollm2_fused, tmp_path):
    """rewrite_weights turns every MatMul weight [in, out] of the graph into [out, in] in
    place (same offsets), and leaves the tied head's table and every other weight alone."""
    import shutil

    import numpy as np

    from llmc.backends.cuda.lower import rewrite_weights

    plan = lower(smollm2_fused, BuildLimits(), "sm_90a")
    before = np.fromfile(smollm2_fused.parent / "weights.bin", dtype=np.uint16)
    copy = tmp_path / "weights.bin"
    shutil.copy(smollm2_fused.parent / "weights.bin", copy)
    moved = rewrite_weights(copy, plan)
    after = np.fromfile(copy, dtype=np.uint16)
    rewritten = np.zeros(before.size, bool)
    for op in plan.ops:
        if op.op == "gemm" and op.attrs.get("transposed"):
            v = plan.values[op.inputs[1]]
            n, k = v.shape
            lo, hi = v.offset // 2, v.offset // 2 + n * k
            np.testing.assert_array_equal(after[lo:hi].reshape(n, k),
                                          before[lo:hi].reshape(k, n).T)
            rewritten[lo:hi] = True
    assert moved == 2 * rewritten.sum() > 0
    np.testing.assert_array_equal(after[~rewritten], before[~rewritten])


@pytest.mark.parametrize("limits", [LIMITS, BuildLimits(8, 512, 2048, 16)])
def test_arena_holds_every_live_value_without_overlap(tiny_models_d64, tmp_path, limits):
    plan = _plan(_build(tiny_models_d64["qwen2-bias"][0], tmp_path / "q.engine", "sm_90a",
                        limits=limits))
    t, b = limits.max_num_tokens, limits.max_batch_size
    ranges = live_intervals(plan.values, plan.ops, plan.output)
    spans = {n: (plan.values[n].offset,
                 plan.values[n].offset + numel(plan.values[n].shape, t, b)
                 * itemsize(plan.values[n].dtype)) for n in ranges}
    for n, (lo, hi) in spans.items():
        assert lo % 256 == 0 and hi <= plan.arena_bytes, n
    names = sorted(ranges)
    for i, a in enumerate(names):
        for c in names[i + 1:]:
            live_together = ranges[a][0] <= ranges[c][1] and ranges[c][0] <= ranges[a][1]
            apart = spans[a][1] <= spans[c][0] or spans[c][1] <= spans[a][0]
            assert apart or not live_together, f"{a} and {c} share arena bytes while live"
    largest = max(align(hi - lo) for lo, hi in spans.values())
    assert largest <= plan.arena_bytes <= sum(align(hi - lo) for lo, hi in spans.values())


def test_clear_errors(tiny_models, tiny_models_d64, tmp_path):
    folder = tiny_models_d64["llama-gqa"][0]
    with pytest.raises(LlmcError, match="computes in fp16 or bf16, not float32"):
        _build(folder, tmp_path / "a.engine", "sm_90a", dtype="fp32")
    with pytest.raises(LlmcError, match="no fused PagedAttention node"):
        _build(folder, tmp_path / "b.engine", "sm_90a", disable_passes=("paged_attention",))
    with pytest.raises(LlmcError, match="unknown --gpu-arch 'sm_91'"):
        _build(folder, tmp_path / "c.engine", "sm_91")
    # head_dim 16: the attention kernels take 64 or 128
    with pytest.raises(UnsupportedGraph, match="head_dim 16 not in"):
        _build(tiny_models["llama-gqa"][0], tmp_path / "d.engine", "sm_90a")
    with pytest.raises(LlmcError, match="--gpu-arch applies to --backend cuda only"):
        build(BuildOptions(folder, tmp_path / "e.engine", gpu_arch="sm_90a"), log=print)
    assert not any(p.suffix == ".engine" for p in tmp_path.iterdir())


def test_no_gpu_and_no_arch_asks_for_one(tiny_models_d64, tmp_path):
    from llmc.devices import list_gpus

    if list_gpus()[0]:
        pytest.skip("this machine has a GPU, whose architecture is the default")
    with pytest.raises(LlmcError, match="pass --gpu-arch"):
        _build(tiny_models_d64["llama-gqa"][0], tmp_path / "a.engine", None)


def test_inspect_shows_the_plan(tiny_models_d64, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "m.engine"
    _build(tiny_models_d64["mistral-window"][0], out, "sm_89")
    r = subprocess.run([sys.executable, "-m", "llmc", "inspect", str(out)], capture_output=True,
                       text=True, check=True)
    assert "backend: cuda" in r.stdout
    launches = len(_plan(EngineFile(out)).ops)
    assert f"plan: sm_89, {launches} launches a step" in r.stdout
    assert "attention 2" in r.stdout and "memory: arena" in r.stdout


def test_a_plan_of_another_format_asks_for_a_rebuild(tiny_models_d64, tmp_path):
    out = tmp_path / "m.engine"
    _build(tiny_models_d64["llama-gqa"][0], out, "sm_90a")
    d = json.loads(EngineFile(out).section(PLAN).tobytes())
    assert Plan.from_dict(d).format == d["format"]
    with pytest.raises(LlmcError, match="rebuild the engine with this llmc"):
        Plan.from_dict(dict(d, format=d["format"] - 1))


def test_running_a_cuda_engine_without_a_gpu_is_one_clear_error(tiny_models_d64, tmp_path):
    import subprocess
    import sys

    from llmc.backends.cuda.session import runtime_missing
    from llmc.devices import list_gpus

    if list_gpus()[0] and not runtime_missing():
        pytest.skip("this machine can run cuda engines")
    out = tmp_path / "m.engine"
    _build(tiny_models_d64["llama-gqa"][0], out, "sm_90a")
    r = subprocess.run([sys.executable, "-m", "llmc", "run", str(out), "-p", "w3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot run {out}") and (
        "pip install 'llmc[cuda]'" in last or "no NVIDIA GPU" in last)


def _fused(folder, out):
    """The fused graph of a checkpoint, saved as the build saves it (fp16)."""
    from llmc.graph import save_onnx
    from llmc.model_zoo import load_model
    from llmc.passes import run_passes

    graph, weights = load_model(folder).build_graph("float16", 16)
    graph, weights, _ = run_passes(graph, weights)
    return save_onnx(graph, weights, out)


def test_qk_norm_folds_into_rope_cache(tiny_models_d64, tmp_path):
    """Qwen3's per-head RMSNorms of q and k (between the QKV split and RoPE) become part of
    the rope_cache op: no norm op of their own, their weights read as stored, the graph's
    epsilon; the model's other norms stay norm ops."""
    folder, model = tiny_models_d64["qwen3-qknorm"]
    plan = lower(_fused(folder, tmp_path / "fused"), LIMITS, "sm_90a")
    layers = model.config.num_hidden_layers
    ropes = [o for o in plan.ops if o.op == "rope_cache"]
    for i, op in enumerate(ropes):
        assert op.inputs[6:] == [f"model.layers.{i}.self_attn.{x}_norm.weight" for x in "qk"]
        assert op.attrs["qk_norm_eps"] == pytest.approx(model.config.rms_norm_eps, rel=1e-6)
        assert all(plan.values[w].where == "weight" and plan.values[w].shape == [64]
                   for w in op.inputs[6:])
    norms = [o for o in plan.ops if o.op in ("rmsnorm", "add_rmsnorm")]
    assert len(norms) == 2 * layers + 1 and all(o.attrs["n"] == 256 for o in norms)


@pytest.mark.parametrize("mode", ["schedule", "grid", "reduce"])
def test_split_decode_combines_in_the_decode_kernel(tiny_models_d64, tmp_path, mode):
    """A decode step that splits its contexts launches no attn_reduce: each decode launch
    takes the session's split counters, and its last CTA combines. By default its splits
    come from the schedule the session writes (a grid row an item, the schedule buffer of
    its window and kv heads as the last argument); with Step.schedule off (bench/e2e.py
    --no-decode-schedule) each token's context over the grid's splits, the schedule pointer
    null. With Step.fuse_reduce off (--attn-reduce) attn_reduce follows each decode launch,
    whose counters argument is then null (a non-null one would make the kernel combine as
    well)."""
    from llmc.backends.cuda.program import (
        ATTN_COUNTERS,
        Step,
        decode_schedules,
        launches,
        schedule_name,
    )

    folder, model = tiny_models_d64["llama-gqa"]
    plan = lower(_fused(folder, tmp_path / "fused"), LIMITS, "sm_90a")
    layers = model.config.num_hidden_layers
    counters, sched = 0xC000, 0xD000
    fuse = mode != "reduce"
    step = Step(1, 1, 8, 65, sm_count=132, max_smem=227 * 1024, fuse_reduce=fuse,
                schedule=mode == "schedule")
    attention = [op for op in plan.ops if op.op == "attention"]
    names = {schedule_name(op) for op in attention}
    kernels = [(ln, args) for kind, ln, args in launches(
        plan, step, lambda name: counters if name == ATTN_COUNTERS else
        sched if name in names else 1 << 20) if kind == "kernel"]
    decode = [(ln, args) for ln, args in kernels if ln.kernel.startswith("attn_decode")]
    reduce = [ln for ln, _ in kernels if ln.kernel.startswith("attn_reduce")]
    assert len(decode) == layers
    assert [args[-2:] for _, args in decode] == [
        [counters if fuse else 0, sched if mode == "schedule" else 0]] * layers
    assert len(reduce) == (0 if fuse else layers)
    schedules = decode_schedules(plan, step)
    if mode == "schedule":
        (name, att), = schedules.items()   # one window, one kv-head count: one schedule
        assert names == {name} and all(ln == att.main for ln, _ in decode)
        assert all(ln.grid == (model.config.num_key_value_heads, att.items, 1)
                   for ln, _ in decode)
    else:
        assert schedules == {} and all(ln.grid[2] > 1 for ln, _ in decode)   # splits


def test_qk_norm_on_one_side_only_is_refused(tiny_models_d64, tmp_path):
    """The kernel norms q and k together: a graph with k's norm taken out is one clear error
    (not a kernel that norms k anyway)."""
    import onnx

    path = _fused(tiny_models_d64["qwen3-qknorm"][0], tmp_path / "fused")
    model = onnx.load(str(path), load_external_data=False)
    norm = next(n for n in model.graph.node if n.op_type == "RMSNormalization"
                and n.input[1].endswith("k_norm.weight"))
    for n in model.graph.node:
        n.input[:] = [norm.input[0] if i == norm.output[0] else i for i in n.input]
    model.graph.node.remove(norm)
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedGraph, match="an RMSNorm before RoPE on one of q and k "
                       "only"):
        lower(path, LIMITS, "sm_90a")


def test_gemma_conventions_lower(tiny_models_d64, tmp_path):
    """Gemma 2 and 3 on the cuda backend: the embedding times sqrt(hidden) (the constant in
    the dtype, as HF has it) in the lookup kernel; the post-attention and post-MLP norms as
    norm ops (4 RMSNorms a layer + the final one); the scale query_pre_attn_scalar^-0.5;
    Gemma 2's attention soft-cap on each attention op and its final-logit soft-cap as the
    last op on the fp32 logits; Gemma 3's sliding and full layers each with their own RoPE
    table (local and global theta)."""
    from llmc.config import rope_inv_freq

    for kind in ("gemma2-softcap", "gemma3-local-global"):
        folder, model = tiny_models_d64[kind]
        c = model.config
        plan = lower(_fused(folder, tmp_path / kind), LIMITS, "sm_90a")
        first = plan.ops[0]
        assert first.op == "embedding" and first.attrs["scale"] == 16.0   # sqrt(256) in fp16
        norms = [o for o in plan.ops if o.op in ("rmsnorm", "add_rmsnorm")]
        assert len(norms) == 4 * c.num_hidden_layers + 1
        attn = [o for o in plan.ops if o.op == "attention"]
        assert all(o.attrs["scale"] == pytest.approx(24 ** -0.5) for o in attn)
        caps = [o.attrs["softcap"] for o in attn]
        if kind == "gemma2-softcap":
            assert caps == [1.0, 1.0]
            last = plan.ops[-1]
            assert last.op == "softcap" and last.attrs["cap"] == 1.5
            assert last.inputs == plan.ops[-2].outputs and plan.storage(plan.output) == \
                last.outputs[0]
        else:
            assert caps == [0.0, 0.0] and plan.ops[-1].op == "gemm"
            tables = [plan.values[o.inputs[3]].data for o in plan.ops if o.op == "rope_cache"]
            assert tables[0] == pytest.approx(rope_inv_freq(64, 100.0, None).tolist())
            assert tables[1] == pytest.approx(rope_inv_freq(64, 1_000_000.0, None).tolist())


def test_a_softcap_of_two_caps_is_refused(tiny_models_d64, tmp_path):
    """cap * tanh(x / cap) is one kernel only when both constants are the cap: a graph whose
    Mul takes another constant is one clear error, not a silently wrong cap."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    path = _fused(tiny_models_d64["gemma2-softcap"][0], tmp_path / "fused")
    model = onnx.load(str(path), load_external_data=False)
    tanh = next(n for n in model.graph.node if n.op_type == "Tanh")
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and tanh.output[0] in n.input)
    model.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "cap2"))
    mul.input[:] = [i if i == tanh.output[0] else "cap2" for i in mul.input]
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedGraph, match=r"only a soft-cap of the fp32 logits, cap \* "
                       r"tanh\(x / cap\) \(Gemma 2\), is lowered"):
        lower(path, LIMITS, "sm_90a")


def test_gpt2_lowers(tiny_models_d64, tmp_path):
    """GPT-2 on the cuda backend: token and position embeddings are two lookups (their sum
    goes into the first AddLayerNorm), LayerNorms with their biases, c_attn's bias added in
    rope_cache, which rotates nothing (rot 0, no inv_freq table) and writes K/V into the
    pool, every other linear's bias as its GEMM's epilogue, a plain tanh GELU after c_fc."""
    folder, model = tiny_models_d64["gpt2-learned-pos"]
    layers = model.config.num_hidden_layers
    plan = lower(_fused(folder, tmp_path / "fused"), LIMITS, "sm_90a")
    tok, pos = plan.ops[:2]
    assert (tok.op, tok.inputs) == ("embedding", ["transformer.wte.weight", "input_ids"])
    assert (pos.op, pos.inputs) == ("embedding", ["transformer.wpe.weight", "position_ids"])
    first = plan.ops[2]
    assert first.op == "add_layernorm" and first.inputs[:2] == tok.outputs + pos.outputs
    assert first.inputs[2:] == ["transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias"]
    kinds = [o.op for o in plan.ops]
    assert kinds.count("add_layernorm") == 2 * layers and kinds.count("layernorm") == 1
    assert kinds.count("gelu") == layers and kinds[-3:] == ["gather_rows", "layernorm", "gemm"]
    assert all(o.attrs["approximate"] == "tanh" for o in plan.ops if o.op == "gelu")
    for o in plan.ops:
        if o.op == "rope_cache":
            assert o.attrs["rot"] == 0 and o.inputs[3] is None and o.attrs["hq"] == o.attrs["hkv"]
            assert o.inputs[1] == f"transformer.h.{o.attrs['layer']}.attn.c_attn.bias"
    gemms = [o for o in plan.ops if o.op == "gemm"]
    # c_attn (bias in rope_cache), c_proj, c_fc, mlp c_proj (biases in the GEMM); tied head
    assert [o.inputs[2] is not None for o in gemms] == [False, True, True, True] * layers \
        + [False]
    assert all(plan.values[o.inputs[2]].shape == [o.attrs["n"]] for o in gemms if o.inputs[2])


def test_rope_on_one_side_only_is_refused(tiny_models_d64, tmp_path):
    """The rope kernel rotates q and k or neither: a graph whose k skips its RoPE is one
    clear error."""
    import onnx

    path = _fused(tiny_models_d64["llama-gqa"][0], tmp_path / "fused")
    model = onnx.load(str(path), load_external_data=False)
    nodes = {o: n for n in model.graph.node for o in n.output}
    attn = next(n for n in model.graph.node if n.op_type == "PagedAttention")
    rope = nodes[nodes[attn.input[1]].input[0]]            # Squeeze(RotaryEmbedding(...))
    attn.input[1] = nodes[rope.input[0]].input[0]          # the Reshape under its Unsqueeze
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedGraph, match="RoPE on one of q and k only"):
        lower(path, LIMITS, "sm_90a")


MOE_KINDS = ("mixtral-top2", "qwen2moe-shared", "qwen3moe-qknorm")
# what each MoE kind's sparse layers are: (layers with experts, renormalised, shared expert)
MOE = {"mixtral-top2": ([0, 1], True, False), "qwen2moe-shared": ([0], False, True),
       "qwen3moe-qknorm": ([0], True, False)}
# graph ops a moe op replaces: none of them may be left in a plan
MOE_GRAPH_OPS = {"TopK", "Softmax", "ScatterElements", "ReduceSum", "Transpose", "Sigmoid",
                 "Unsqueeze", "ConstantOfShape", "Shape", "Div", "Mul"}


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_mixture_of_experts_lowers_to_one_moe_op(tiny_models_d64, tmp_path, kind):
    """Each sparse layer's routed experts, from the router's logits to the Cast of their
    weighted sum (with Qwen2-MoE's sigmoid-gated shared-expert sum), become one moe op: its
    inputs are the router GEMM's output (the model dtype, as the graph rounds it), x, the
    stacked expert weights stored [E, out, in], and the shared expert's gate and output;
    the router and the shared expert stay ordinary GEMMs (and the shared expert's two-input
    SwiGLU a swiglu2 op). The dense layers keep their fused gate-up GEMM."""
    folder, model = tiny_models_d64[kind]
    c = model.config
    sparse, renorm, shared = MOE[kind]
    engine = _build(folder, tmp_path / "m.engine", "sm_90a")
    plan = _plan(engine)
    check_plan(plan)
    moes = [o for o in plan.ops if o.op == "moe"]
    assert len(moes) == len(sparse) and plan.modules == list(MODULES) + ["moe", SM90_MODULE]
    assert {o.op for o in plan.ops} <= {"embedding", "rmsnorm", "add_rmsnorm", "gemm",
                                        "rope_cache", "attention", "moe", "swiglu2", "add",
                                        "gather_rows"}
    experts = getattr(c, "num_local_experts", None) or c.num_experts
    inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    h = c.hidden_size
    for layer, op in zip(sparse, moes):
        a = op.attrs
        assert a == dict(experts=experts, top_k=c.num_experts_per_tok, hidden=h, inter=inter,
                         renormalise=renorm, transposed=True)
        logits, x, gate_up, down, gate, shared_out = op.inputs
        router = next(o for o in plan.ops if o.outputs == [logits])
        assert router.op == "gemm" and router.attrs["n"] == experts
        assert router.attrs["out_dtype"] == "bfloat16" and router.inputs[0] == x
        assert plan.values[gate_up].shape == [experts, 2 * inter, h]
        assert plan.values[down].shape == [experts, h, inter]
        assert all(plan.values[w].where == "weight" for w in (gate_up, down))
        assert plan.values[op.outputs[0]].shape == ["T", h]
        assert (gate is not None) == (shared_out is not None) == shared
        if shared:
            gate_op = next(o for o in plan.ops if o.outputs == [gate])
            assert gate_op.op == "gemm" and gate_op.attrs["n"] == 1
            assert next(o for o in plan.ops if o.outputs == [shared_out]).op == "gemm"
        # the scratch buffers live in the arena while the op runs
        assert [plan.values[v].dtype for v in op.outputs[1:6]] == [
            "int32", "float32", "int32", "int32", "int32"]
    assert sum(o.op == "swiglu2" for o in plan.ops) == (1 if shared else 0)
    dense = c.num_hidden_layers - len(sparse)
    assert sum(o.attrs.get("act") == "swiglu" for o in plan.ops if o.op == "gemm") == dense


@pytest.mark.parametrize("arch", ARCHS)
def test_mixture_of_experts_lowers_for_every_arch(tiny_models_d64, tmp_path, arch):
    engine = _build(tiny_models_d64["mixtral-top2"][0], tmp_path / "m.engine", arch)
    plan = _plan(engine)
    assert sum(o.op == "moe" for o in plan.ops) == 2
    for module in plan.modules:
        assert bytes(engine.section(cubin_section(module))[:4]) == b"\x7fELF", module


def test_expert_weights_are_rewritten_out_by_in(tiny_models_d64, tmp_path):
    """rewrite_weights turns each expert of a stacked [E, in, out] weight into [out, in] in
    place, one expert at a time, bit for bit."""
    import shutil

    import numpy as np

    from llmc.backends.cuda.lower import rewrite_weights

    path = _fused(tiny_models_d64["mixtral-top2"][0], tmp_path / "fused")
    plan = lower(path, LIMITS, "sm_90a")
    before = np.fromfile(path.parent / "weights.bin", dtype=np.uint16)
    copy = tmp_path / "weights.bin"
    shutil.copy(path.parent / "weights.bin", copy)
    rewrite_weights(copy, plan)
    after = np.fromfile(copy, dtype=np.uint16)
    seen = 0
    for op in (o for o in plan.ops if o.op == "moe"):
        for name in op.inputs[2:4]:
            v = plan.values[name]
            e, n, k = v.shape
            lo = v.offset // 2
            got = after[lo:lo + e * n * k].reshape(e, n, k)
            want = before[lo:lo + e * n * k].reshape(e, k, n).transpose(0, 2, 1)
            np.testing.assert_array_equal(got, want)
            seen += 1
    assert seen == 4


def _rewire(path, drop):
    """Remove the node `drop` from a saved graph, its consumers reading its first input."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    node = next(n for n in model.graph.node if drop(n))
    for n in model.graph.node:
        n.input[:] = [node.input[0] if i == node.output[0] else i for i in n.input]
    model.graph.node.remove(node)
    onnx.save(model, str(path))


def test_moe_layers_the_kernels_cannot_take_are_refused_by_name(tiny_models_d64, make_tiny,
                                                                 tmp_path):
    """A routed-experts layer in another form (here: the experts' SwiGLU left unfused), or
    of a size the kernels do not take (top 9), is one clear error naming the MoE layer."""
    with pytest.raises(UnsupportedGraph, match="routes tokens to experts \\(TopK node "
                       "'layers.0.mlp/TopK_[0-9]+': a mixture-of-experts layer\\) in a form "
                       "the cuda backend's MoE kernels do not take: .*FusedSwiGLU"):
        _build(tiny_models_d64["mixtral-top2"][0], tmp_path / "a.engine", "sm_90a",
               disable_passes=("swiglu", "gated_split"))
    path = _fused(tiny_models_d64["qwen3moe-qknorm"][0], tmp_path / "fused")
    _rewire(path, lambda n: n.op_type == "Div" and "mlp" in n.name)   # renormalise, half-cut
    with pytest.raises(UnsupportedGraph, match="mixture-of-experts layer"):
        lower(path, LIMITS, "sm_90a")
    folder = tmp_path / "top9"
    make_tiny("mixtral-top2", folder, head_dim_64=True, num_local_experts=10,
              num_experts_per_tok=9)
    with pytest.raises(UnsupportedGraph, match="top_k <= 8 of at most 256 experts, not top 9"):
        _build(folder, tmp_path / "b.engine", "sm_90a")
    assert not any(p.suffix == ".engine" for p in tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["mixtral-top2", "qwen2moe-shared"])
def test_the_moe_op_carries_the_graphs_layer(tiny_models_d64, tmp_path, kind):
    """What the plan hands the moe op (router logits, x, the shared expert's gate and
    output, renormalise, the expert weights as rewrite_weights leaves them, [E, out, in])
    computes the graph's layer: the kernels' function (kernels/moe.cu, here in numpy:
    softmax top-k, each expert's SwiGLU and down rounded to fp16, the fp32 weighted sum in
    ascending experts, the gated shared expert) equals onnxruntime's value of the layer's
    output on a ragged fp16 step, within fp16 rounding (1e-2 of the largest value)."""
    import shutil

    import numpy as np
    import onnx
    import onnxruntime as ort

    from llmc import contract
    from llmc.backends.cuda.lower import rewrite_weights

    folder, model = tiny_models_d64[kind]
    c = model.config
    path = _fused(folder, tmp_path / "fused")
    plan = lower(path, LIMITS, "sm_90a")
    op = next(o for o in plan.ops if o.op == "moe")
    logits, x, gate_up, down, gate, shared = op.inputs
    out = op.outputs[0]
    probes = [n for n in (logits, x, gate, shared, out) if n is not None]
    graph = onnx.load(str(path), load_external_data=False)
    graph.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT16,
                                                                 None) for n in probes)
    onnx.save(graph, str(path.parent / "probe.onnx"))   # beside weights.bin, which it reads
    rng = np.random.default_rng(0)
    feeds = contract.pack_step([contract.Chunk(rng.integers(3, 128, n).tolist(), 0,
                                               [2 * i, 2 * i + 1])
                                for i, n in enumerate((5, 17, 1))], 16)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for i in range(c.num_hidden_layers):
        feeds[contract.kv_cache_input(i)] = np.zeros((2, 8, c.num_key_value_heads, 16,
                                                      head_dim), np.float16)
    sess = ort.InferenceSession(str(path.parent / "probe.onnx"),
                                providers=["CPUExecutionProvider"])
    got = dict(zip(probes, (v.astype(np.float32) for v in sess.run(probes, feeds))))

    weights = tmp_path / "weights.bin"
    shutil.copy(path.parent / "weights.bin", weights)
    rewrite_weights(weights, plan)
    raw = np.fromfile(weights, np.float16)

    def stored(name):
        v = plan.values[name]
        return raw[v.offset // 2:v.offset // 2 + int(np.prod(v.shape))].reshape(
            v.shape).astype(np.float32)

    def f16(v):
        return v.astype(np.float16).astype(np.float32)

    a = op.attrs
    k, inter = a["top_k"], a["inter"]
    lg = got[logits]
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, -1)
    if a["renormalise"]:
        w /= w.sum(-1, keepdims=True)
    wgu, wd = stored(gate_up), stored(down)
    ref = np.zeros((lg.shape[0], a["hidden"]), np.float32)
    for t in range(lg.shape[0]):
        for j in np.argsort(ids[t]):
            gu = f16(wgu[ids[t, j]] @ got[x][t])
            act = f16(f16(gu[:inter] / (1 + np.exp(-gu[:inter]))) * gu[inter:])
            ref[t] += np.float32(w[t, j]) * f16(wd[ids[t, j]] @ act)
    ref = f16(ref)
    if gate is not None:
        ref = f16(ref + f16(f16(1 / (1 + np.exp(-got[gate]))) * got[shared]))
    err = np.abs(ref - got[out]).max() / np.abs(got[out]).max()
    assert err < 1e-2, err


def test_decode_gemvs_take_the_kernel_their_tiles_an_sm_pick(tiny_models_d64, tmp_path):
    """A decode step of 8 sequences runs the 16-bit GEMMs on the tensor-core GEMV, each on
    the variant its tiles against the session's SM count pick (launch_rules.gemv_launch):
    the tiny model's few tiles take the plain kernel on a large GPU and _wide or _w32 on one
    SM."""
    from llmc.backends.cuda.program import Step, launches
    from llmc.plugins import launch_rules as lr

    plan = lower(_fused(tiny_models_d64["llama-gqa"][0], tmp_path / "fused"), LIMITS, "sm_90a")

    def gemvs(sm_count):
        step = Step(8, 8, 8, 65, sm_count=sm_count, max_smem=227 * 1024)
        return [ln for kind, ln, _ in launches(plan, step, lambda name: 1 << 20)
                if kind == "kernel" and ln.kernel.startswith("gemv_")]

    large, one = gemvs(132), gemvs(1)
    assert large and all("_m8" in ln.kernel for ln in large)
    assert all(ln.block == (32 * lr.GEMV_TC_WARPS, 1, 1) for ln in large)
    seen = set()
    for plain, ln in zip(large, one, strict=True):
        tiles = plain.grid[0]
        variant = "" if tiles <= 2 else "_wide" if tiles <= 3 else "_w32"
        seen.add(variant)
        assert ln.kernel == plain.kernel.replace("_m8", f"_m8{variant}")
        assert ln.grid == plain.grid
        assert ln.block == (32 * lr.GEMV_TC_VARIANT_WARPS[variant], 1, 1)
    assert "_w32" in seen
