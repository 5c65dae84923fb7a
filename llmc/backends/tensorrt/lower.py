"""Lowering: an ONNX graph that honours the engine I/O contract -> a serialized TensorRT plan.

ONNX file -> OnnxParser (`parse_from_file`, so external data next to the model resolves)
-> strongly typed network -> one optimization profile from the build limits -> builder
config -> `build_serialized_network` -> plan bytes. `tensorrt` and `tensorrt_rtx` share this
API; `backends/tensorrt/shim.py` picks the module.

Seen with TensorRT-RTX 1.7.1 (tensorrt-rtx-cu13) on a CPU-only Linux machine:
- No flag is needed for a CPU-only build: CPU-only ahead-of-time building is the default.
  The default targets (no compute capability set on the config) are 8.0, 8.6, 8.9 and
  12.x; setting ComputeCapability.CURRENT needs a GPU. Kernels are compiled just in time
  on the target GPU when the engine is first run, so a build is quick: a 2-layer toy graph
  builds in well under a second (fp32, fp16, bf16).
- With no GPU the workspace pool limit defaults to 64 GiB; we cap it (DEFAULT_WORKSPACE_BYTES).
- `IBuilderConfig.hardware_compatibility_level` is unsupported (it logs a warning), and
  NetworkDefinitionCreationFlag has only STRONGLY_TYPED (no EXPLICIT_BATCH).
- TensorRT keeps the first ILogger a process gives it and ignores later ones, so llmc uses
  one logger per library and redirects it per call (`shim.get_logger/capture_log`).
- `Runtime.get_engine_validity(plan)` exists but needs a CUDA driver: without one it
  reports every plan INVALID, so it is no CPU-side check of a plan.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from llmc import contract
from llmc.backends.tensorrt import shim
from llmc.devices import pick_trt_gpu
from llmc.errors import LlmcError
from llmc.limits import BuildLimits

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)

# Builder workspace cap. The toy and small models need far less; large GEMMs with big
# tactics want a few GiB. TensorRT only uses what the chosen tactics need.
DEFAULT_WORKSPACE_BYTES = 4 << 30


def profile_shapes(
    onnx_inputs: Iterable[tuple[str, Sequence[int | str]]], limits: BuildLimits
) -> dict[str, ShapeRange]:
    """Map each graph input (name, shape of ints and dim names) to its (min, opt, max) shapes."""
    ranges = contract.dim_ranges(limits)
    out: dict[str, ShapeRange] = {}
    for name, shape in onnx_inputs:
        per_dim = [_dim_range(name, axis, dim, ranges) for axis, dim in enumerate(shape)]
        out[name] = tuple(tuple(r[i] for r in per_dim) for i in range(3))  # type: ignore
    return out


def check_kv_block_size(onnx_inputs, limits: BuildLimits) -> None:
    """The graph's KV pools [2, num_blocks, kv_heads, block_size, head_dim] must use the
    block size the runtime will page with (the limits' kv_block_size)."""
    for name, shape in onnx_inputs:
        if contract.kv_layer(name) is not None and len(shape) == 5 \
                and shape[3] != limits.kv_block_size:
            raise ValueError(
                f"graph input {name!r} has KV block size {shape[3]!r} (axis 3), but the build "
                f"limits say kv_block_size={limits.kv_block_size}; build the graph with that "
                "block size or change the limit"
            )


def _dim_range(name: str, axis: int, dim: Any, ranges: dict) -> tuple[int, int, int]:
    if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0:
        return (dim, dim, dim)
    if isinstance(dim, str) and dim in ranges:
        return ranges[dim]
    raise ValueError(
        f"graph input {name!r} axis {axis} has dimension {dim!r}, which is not one of the "
        f"I/O contract's symbolic dimensions {sorted(ranges)} nor a fixed size"
    )


def load_graph_only(onnx_path: str | Path):
    """The ModelProto without its external weights (cheap even for a large model)."""
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)


def check_external_data(model, onnx_path: str | Path) -> None:
    """Name the first initializer whose external weights file is missing next to the model."""
    folder = Path(onnx_path).parent
    for init in model.graph.initializer:
        if init.data_location != 1:  # TensorProto.EXTERNAL
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), "")
        if not (folder / location).is_file():
            raise FileNotFoundError(
                f"weights file {location!r} of initializer {init.name!r} is missing: "
                f"expected it at {folder / location}"
            )


def onnx_graph_inputs(model) -> list[tuple[str, tuple[int | str, ...]]]:
    """The graph inputs (not initializers) of a ModelProto with their shapes."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in dims)
        inputs.append((value.name, shape))
    return inputs


# ---------------------------------------------------------------- network description


def describe_tensor(tensor) -> dict[str, Any]:
    return {"name": tensor.name, "dtype": tensor.dtype.name, "shape": list(tensor.shape)}


def describe_network(network) -> dict[str, Any]:
    """Inputs, outputs (name, dtype, shape; -1 = dynamic) and layers counted by LayerType."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    counts = Counter(layer.type.name for layer in layers)
    return {
        "inputs": [describe_tensor(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [describe_tensor(network.get_output(i)) for i in range(network.num_outputs)],
        "num_layers": len(layers),
        "layer_types": dict(sorted(counts.items())),
    }


# ---------------------------------------------------------------- the build


class LoweringError(LlmcError):
    """The ONNX graph could not be parsed or built into a TensorRT plan."""


def create_network(trt, builder):
    """A strongly typed network: the ONNX dtypes decide each layer's precision.

    TensorRT 10 deprecated EXPLICIT_BATCH (always on) and newer releases drop the flag; it is
    only set where STRONGLY_TYPED does not exist (TensorRT 8.x).
    """
    flag_enum = trt.NetworkDefinitionCreationFlag
    flags = 0
    if hasattr(flag_enum, "STRONGLY_TYPED"):
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)
    elif hasattr(flag_enum, "EXPLICIT_BATCH"):
        flags |= 1 << int(flag_enum.EXPLICIT_BATCH)
    return builder.create_network(flags)


def parse_onnx(trt, network, onnx_path: Path, logged_errors: Sequence[str] = ()):
    """Parse the file into `network`; a failure lists every parser error by node."""
    parser = trt.OnnxParser(network, shim.get_logger(trt))
    # parse_from_file (not parse(bytes)) so that external data next to the model resolves.
    if parser.parse_from_file(str(onnx_path)):
        return parser
    errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    if not errors:  # e.g. an unreadable file: the parser logs, but records no node error
        errors = [f"  {msg}" for msg in logged_errors[-10:]]
    raise LoweringError(
        f"TensorRT's ONNX parser rejected {onnx_path}:\n" + "\n".join(errors or ["  (no detail)"])
    )


def format_parser_error(err) -> str:
    if err.node() < 0 and not err.node_name():  # not tied to a node, e.g. an initializer
        return f"  graph: {err.desc()} [{err.code().name}]"
    node = err.node_name() or f"#{err.node()}"
    return f"  node {node} ({err.node_operator() or '?'}): {err.desc()} [{err.code().name}]"


def add_profile(builder, config, network, shapes: dict[str, ShapeRange]):
    """One optimization profile covering every input of the network; returns it."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in shapes:
            raise LoweringError(f"network input {tensor.name!r} has no profile shape")
        lo, opt, hi = shapes[tensor.name]
        _check_rank(tensor, lo)
        profile.set_shape(tensor.name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise LoweringError("TensorRT refused the optimization profile (see the log above)")
    return profile


def read_profile(profile, network) -> dict[str, list[list[int]]]:
    """The (min, opt, max) shapes as TensorRT holds them, read back from the profile."""
    out = {}
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        out[name] = [list(shape) for shape in profile.get_shape(name)]
    return out


def _check_rank(tensor, shape: Shape) -> None:
    fixed = tuple(tensor.shape)
    if len(fixed) != len(shape):
        raise LoweringError(f"input {tensor.name!r}: network rank {fixed} vs profile {shape}")
    for axis, (net_dim, dim) in enumerate(zip(fixed, shape)):
        if net_dim != -1 and net_dim != dim:
            raise LoweringError(
                f"input {tensor.name!r} axis {axis}: fixed size {net_dim} in the graph, "
                f"{dim} in the profile"
            )


def make_config(trt, builder, workspace_bytes: int, rtx_targets: Sequence[str] = ()):
    """Builder config: a workspace cap and, for tensorrt-rtx, optional target GPUs.

    Without a GPU the default workspace limit is 64 GiB (there is no device to size it from),
    so it is capped. With no `rtx_targets` TensorRT-RTX targets 8.0, 8.6, 8.9 and 12.x;
    "current" pins the engine to the build machine's GPU (and fails without one). Precision
    comes from the strongly typed network, so no FP16/BF16 builder flags.
    """
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if hasattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03"):
        # PagedAttention's cache output aliases its cache input (the in-place KV update)
        config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    if rtx_targets:
        capabilities = [rtx_capability(trt, target) for target in rtx_targets]
        config.num_compute_capabilities = len(capabilities)
        for index, capability in enumerate(capabilities):
            if not config.set_compute_capability(capability, index):
                raise LoweringError(f"TensorRT-RTX refused target {rtx_targets[index]!r}")
    return config


def rtx_capability(trt, target: str):
    """'8.9' -> ComputeCapability.SM89, 'current' -> CURRENT; unknown targets are an error."""
    key = "CURRENT" if target == "current" else "SM" + target.replace(".", "")
    members = trt.ComputeCapability.__members__
    if key not in members or key == "NONE":
        known = [m[2:-1] + "." + m[-1] if m.startswith("SM") else m.lower()
                 for m in members if m != "NONE"]
        raise ValueError(f"unknown TensorRT-RTX target {target!r}; known: {', '.join(known)}")
    return members[key]


def register_plugins(backend: str, log: Callable[[str], None]) -> None:
    """Full TensorRT: register llmc's plugins, kernels compiled for the build machine's GPU.

    TensorRT-RTX gets none: its ONNX parser aborts on Python plugins, and with no plugin
    registered it inlines the llmc nodes' ONNX function bodies instead.
    """
    if backend != "tensorrt":
        return
    from llmc.plugins.trt_plugin import register

    gpu, why = pick_trt_gpu(backend)
    if gpu is None:
        raise LoweringError(f"a tensorrt build compiles llmc's kernels for its GPU: {why}")
    register(gpu.arch, gpu.sm_count)
    log(f"registered llmc plugins for {gpu.name} ({gpu.arch}, {gpu.sm_count} SMs)")


def parse_and_build(trt, errors, onnx_path, shapes, backend, options, log):
    """Parser -> network -> config + profile -> plan; returns (plan, network info, timings)."""
    register_plugins(backend, log)
    builder = trt.Builder(shim.get_logger(trt))
    network = create_network(trt, builder)
    t0 = time.perf_counter()
    parser = parse_onnx(trt, network, onnx_path, errors)
    parse_s = time.perf_counter() - t0
    info = describe_network(network)
    log(
        f"parsed the ONNX graph in {parse_s:.1f}s: {info['num_layers']} layers, "
        f"{network.num_inputs} inputs, {network.num_outputs} outputs"
    )
    config = make_config(trt, builder, **options)
    profile = add_profile(builder, config, network, shapes)
    info["profile"] = read_profile(profile, network)
    log(f"building a {backend} {shim.library_version(trt)} plan ...")
    t1 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t1
    del parser  # kept alive until here: the network refers to weights the parser owns
    if serialized is None:
        detail = "\n".join(f"  {msg}" for msg in errors[-10:]) or "  (see TensorRT's log above)"
        raise LoweringError(f"TensorRT could not build {onnx_path}:\n{detail}")
    plan = bytes(serialized)
    if not plan:
        raise LoweringError(f"TensorRT returned an empty plan for {onnx_path}")
    log(f"built in {build_s:.1f}s: plan of {len(plan) / 2**20:.1f} MiB")
    timings = {"parse_seconds": round(parse_s, 3), "build_seconds": round(build_s, 3)}
    return plan, info, timings


def build_plan(
    onnx_path: str | Path,
    limits: BuildLimits,
    backend: str,
    *,
    log: Callable[[str], None] = print,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    rtx_targets: Sequence[str] = (),
) -> tuple[bytes, dict[str, Any]]:
    """Parse and build `onnx_path` into a serialized plan; returns (plan, summary).

    `rtx_targets` (tensorrt-rtx only): compute capabilities such as ("8.9",) or ("current",);
    empty keeps the library's default set (8.0, 8.6, 8.9, 12.x).
    The parse and build run in a child process (builder.py), so Ctrl-C stops them.
    """
    limits.validate()
    if rtx_targets and backend != "tensorrt-rtx":
        raise ValueError("rtx_targets applies to the tensorrt-rtx backend only")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX model at {onnx_path}")
    graph_only = load_graph_only(onnx_path)
    check_external_data(graph_only, onnx_path)
    graph_inputs = onnx_graph_inputs(graph_only)
    check_kv_block_size(graph_inputs, limits)
    shapes = profile_shapes(graph_inputs, limits)
    shim.import_trt(backend)   # a missing library is said here, not in the child
    from llmc.backends.tensorrt.builder import run_child

    with _inlined(graph_only, onnx_path, backend) as parse_path, \
            _scratch(onnx_path.parent, ".plan") as plan_file:
        options = {"workspace_bytes": workspace_bytes, "rtx_targets": tuple(rtx_targets)}
        network_info, timings = run_child(
            (str(parse_path), shapes, backend, options, str(plan_file)), backend, log)
        plan = plan_file.read_bytes()
    summary = {
        **network_info,
        "limits": limits.to_dict(),
        "rtx_targets": list(rtx_targets) or None,  # None: the library's default targets
        **shim.versions(backend),
        **timings,
        "plan_bytes": len(plan),
    }
    return plan, summary


def build_in_child(request, log: Callable[[str], None]):
    """The builder child's work (`python -m llmc.backends.tensorrt`, builder.py): parse and
    build, the plan into `plan_file`; returns (network info, timings)."""
    onnx_path, shapes, backend, options, plan_file = request
    trt = shim.import_trt(backend)
    with shim.capture_log(shim.get_logger(trt), log) as errors:
        plan, info, timings = parse_and_build(trt, errors, Path(onnx_path), shapes, backend,
                                              options, log)
    Path(plan_file).write_bytes(plan)
    return info, timings


@contextmanager
def _inlined(model, onnx_path: Path, backend: str) -> Iterator[Path]:
    """tensorrt-rtx: the graph with the llmc nodes' function bodies inlined, beside the
    original (so its external weights resolve). TensorRT-RTX's parser inlines them itself
    but names every instance's nodes after the body's, so each layer after the first
    collides ("A node named ... already exists"); onnx's inliner prefixes each call's
    nodes. Full TensorRT keeps the nodes: its plugins stand in for them."""
    if backend != "tensorrt-rtx" or not model.functions:
        yield onnx_path
        return
    import onnx.inliner

    with _scratch(onnx_path.parent, ".inlined.onnx") as path:
        onnx.save(onnx.inliner.inline_local_functions(model), path)
        yield path


@contextmanager
def _scratch(folder: Path, suffix: str) -> Iterator[Path]:
    """A hidden temporary file in `folder`, removed afterwards whatever happens."""
    fd, name = tempfile.mkstemp(prefix=".llmc.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)
