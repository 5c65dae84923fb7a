"""PagedAttention as a class-based TensorRT IPluginV3 (Python), for the full `tensorrt` package.

Why not the ahead-of-time API like the other plugins: one step is up to three launches (K/V
cache write, attention, split-K reduce), needs a workspace, and its second output is the
cache updated in place, aliased to the cache input (IPluginV3OneBuildV2.get_aliased_input;
the builder needs PreviewFeature.ALIASED_PLUGIN_IO_10_03). The engine then calls back into
Python at enqueue, so it runs only where Python and this package are installed.

Thin on purpose: attributes, shapes, plans, workspace bounds and kernel arguments all come
from attention_plan.py (CPU-tested), the I/O names from nodes.py, the launches go through
launch.Functions (GPU-tested by the kernel tests through the same
attention_plan.attention_launches). This file itself has never been
executed: the full tensorrt package cannot be installed in our development setup, and
TensorRT-RTX (installable) does not run on Hopper and has no add_plugin.
"""
from __future__ import annotations

from llmc import contract
from llmc.devices import device_max_smem

from . import attention_plan as ap
from .launch import DevPtr, Functions
from .nodes import PA_ALIASES, PA_INPUTS, PA_OUTPUTS
from .records import serialize

NAME, VERSION, NAMESPACE = "PagedAttention", "1", "llmc"


def register_paged_attention(arch: str, sm_count: int, max_smem: int | None = None) -> None:
    """Register the PagedAttention creator (call before parsing the ONNX graph). max_smem: the
    target's per-block opt-in shared memory; None reads it from the current CUDA device."""
    import numpy as np
    import tensorrt as trt

    if max_smem is None:
        max_smem = device_max_smem()

    dtypes = {trt.float16: "float16", trt.bfloat16: "bfloat16"}

    class PagedAttention(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuildV2,
                         trt.IPluginV3OneRuntime):
        def __init__(self, attrs: dict):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuildV2.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = \
                NAME, VERSION, NAMESPACE
            self.num_outputs = len(PA_OUTPUTS)
            self.attrs = attrs
            self.functions = None  # loaded in the execution context's CUDA context

        # -- core / build --
        def get_capability_interface(self, type):
            return self

        def get_output_data_types(self, input_types):
            return [input_types[0], input_types[3]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0]), trt.DimsExprs(inputs[3])]

        def get_aliased_input(self, output_index):
            return PA_ALIASES.get(output_index, -1)

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            name = (PA_INPUTS + PA_OUTPUTS)[pos]
            if name in contract.ATTENTION_INPUTS:
                return desc.type == trt.int32
            # q, k, v, the cache and both outputs share q's dtype (fp16 or bf16)
            return desc.type in dtypes and desc.type == in_out[0].desc.type

        def configure_plugin(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            q, cache, tables = (inputs[i].max for i in (0, 3, 4))
            d = ap.paged_attention_dims(q, cache, tables)
            return ap.attention_workspace_bound(
                d["tokens"], d["batch"], d["hq"], d["hkv"], d["d"], d["max_blocks"],
                d["block_size"], sm_count, max_smem=max_smem,
                window=self.attrs["sliding_window"])

        def get_fields_to_serialize(self):
            rec = np.frombuffer(serialize(NAME, self.attrs), dtype=np.uint8)
            return trt.PluginFieldCollection(
                [trt.PluginField("record", rec, trt.PluginFieldType.UNKNOWN)])

        # -- runtime --
        def on_shape_change(self, inputs, outputs):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def clone(self):
            return PagedAttention(dict(self.attrs))

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            if self.functions is None:
                self.functions = Functions(arch)
            a = self.attrs
            dims = ap.paged_attention_dims(input_desc[0].dims, input_desc[3].dims,
                                              input_desc[4].dims)
            plan = ap.attention_plan(
                dims["tokens"], dims["batch"], dims["hq"], dims["hkv"], dims["d"],
                dims["max_blocks"], dims["block_size"], dtypes[input_desc[0].type],
                sm_count, bool(a["write_kv"]), max_smem=max_smem,
                window=a["sliding_window"])
            ptr = {n: DevPtr(inputs[i]) for i, n in enumerate(PA_INPUTS)}
            ptr["out"] = DevPtr(outputs[0])  # outputs[1] is inputs[3], the same memory
            lse = ap.workspace_lse_offset(plan, dims["tokens"], dims["hq"], dims["d"])
            ptr["ws_o"], ptr["ws_lse"] = DevPtr(workspace), DevPtr(workspace + lse)
            # TensorRT's workspace is neither zeroed nor kept between enqueues, so no split
            # counters: attn_reduce combines the splits (the plan's default); and no host
            # view of the context lengths at enqueue, so no decode schedule either
            ptr["arrived"], ptr["sched"] = DevPtr(0), DevPtr(0)
            for ln, args in ap.attention_launches(plan, dims, a["scale"], ptr):
                self.functions.launch(ln, args, stream)

    class PagedAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = NAME, VERSION, NAMESPACE
            fields = [trt.PluginField(n, np.array([]), t) for n, t in (
                ("num_heads", trt.PluginFieldType.INT32),
                ("num_kv_heads", trt.PluginFieldType.INT32),
                ("head_dim", trt.PluginFieldType.INT32),
                ("block_size", trt.PluginFieldType.INT32),
                ("scale", trt.PluginFieldType.FLOAT32),
                ("sliding_window", trt.PluginFieldType.INT32),
                ("softcap", trt.PluginFieldType.FLOAT32),
                ("record", trt.PluginFieldType.UNKNOWN))]
            self.field_names = trt.PluginFieldCollection(fields)

        def create_plugin(self, name, fc, phase):
            return PagedAttention(ap.paged_attention_attrs({f.name: f.data for f in fc}))

    trt.get_plugin_registry().register_creator(PagedAttentionCreator(), NAMESPACE)
