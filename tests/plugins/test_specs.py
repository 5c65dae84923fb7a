"""CPU tests of the plugins' plain-Python rules: shapes, launch parameters, serialization."""
import math
import struct

import pytest

from llmc.plugins import specs


def test_norm_launch_covers_every_element():
    for n in (1, 7, 8, 1000, 4095, 4096, 5120, 8192, 16384, 32768):
        ln = specs.norm_launch(3, n, "bfloat16")
        vec = 8 if n % 8 == 0 else 1
        assert ln.kernel.endswith(f"_v{vec}")
        threads = ln.block[0]
        assert threads % 32 == 0 and threads <= 1024
        assert threads * (32 // vec) * vec >= n  # register budget holds the whole row
        assert ln.grid == (3, 1, 1)
    with pytest.raises(ValueError):
        specs.norm_launch(1, 32769, "bfloat16")
    with pytest.raises(ValueError):
        specs.norm_launch(1, 64, "float32")


def test_norm_names_and_shapes():
    assert specs.norm_launch(1, 64, "float16", "layernorm", True).kernel == "add_layernorm_f16_v8"
    assert specs.norm_output_shapes((5, 64), True) == [(5, 64), (5, 64)]
    assert specs.norm_output_shapes((5, 64), False) == [(5, 64)]


def test_gated_shapes_and_launch():
    assert specs.gated_output_shape((7, 22016)) == (7, 11008)
    with pytest.raises(ValueError):
        specs.gated_output_shape((7, 11))
    ln = specs.gated_launch(7, 11008, "bfloat16", "swiglu", sm_count=132)
    assert ln.kernel == "swiglu_bf16_v8" and ln.grid[0] == 7
    assert ln.grid[1] * ln.block[0] * 8 >= 11008 > (ln.grid[1] - 1) * ln.block[0] * 8
    assert specs.gated_launch(3, 13, "float16", "geglu", 132).kernel == "geglu_f16_v1"
    assert specs.gelu_launch(10, "float16", "none", 132).kernel == "gelu_erf_f16_v1"


def test_rope_shapes_and_names():
    assert specs.rope_output_shapes((9, (32 + 16) * 128), 32, 8, 128) == [
        (9, 32, 128), (9, 8, 128), (9, 8, 128)]
    with pytest.raises(ValueError):
        specs.rope_output_shapes((9, 100), 32, 8, 128)
    ln = specs.rope_launch(9, 32, 8, 128, 64, "bfloat16", interleaved=True, bias=True,
                           write_cache=True)
    assert ln.kernel == "rope_bias_cache_interleaved_bf16" and ln.grid == (9, 1, 1)
    with pytest.raises(ValueError):
        specs.rope_launch(9, 32, 8, 128, 130, "bfloat16")


def test_llama3_inv_freq_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 500000.0}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=scaling)
    ref, _ = _compute_llama3_parameters(cfg)
    ours = torch.tensor(specs.llama3_inv_freq(64, 500000.0, rope_scaling=scaling))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-6, atol=0)
    plain = specs.llama3_inv_freq(64, 10000.0)
    assert plain[1] == pytest.approx(10000.0 ** (-2 / 64))
    assert plain != ours.tolist()


def test_decode_plan_fills_the_gpu_and_splits_long_contexts():
    big = specs.attention_plan(64, 64, 32, 8, 128, 2048 // 16, 16, "bfloat16", 132)
    assert big.decode and big.n_split == 1 and big.reduce is None
    assert big.main.grid == (64, 8, 1) and big.main.smem == specs.decode_smem(128)
    small = specs.attention_plan(2, 2, 32, 8, 128, 32768 // 16, 16, "bfloat16", 132)
    assert small.n_split > 1 and small.reduce is not None
    assert small.chunk % specs.ATTN_BN == 0
    assert small.n_split * small.chunk >= 32768 > (small.n_split - 1) * small.chunk
    assert small.main.grid[0] * small.main.grid[1] * small.main.grid[2] >= 2 * 132
    assert small.workspace_bytes == 2 * 32 * small.n_split * 129 * 4
    assert small.reduce.grid == (64, 1, 1)


def test_prefill_plan_tiles_cover_any_ragged_split():
    # tiles = ceil(T/64) + B bounds sum_s ceil(n_s/64) for every split of T into B parts
    for lens in ([1, 1, 1], [2, 1, 1], [65, 1, 130], [64] * 4, [63, 2, 1000, 5]):
        t, b = sum(lens), len(lens)
        plan = specs.attention_plan(t, b, 12, 4, 64, 64, 32, "float16", 132)
        assert plan.decode == (t == b)
        if plan.decode:
            continue
        assert plan.main.grid[0] >= sum(math.ceil(n / 64) for n in lens)
        assert plan.main.grid[1] == 12
        assert plan.kv_write.grid == (t, 1, 1)
    assert specs.attention_plan(5, 2, 8, 8, 64, 4, 16, "float16", 1, write_kv=False).kv_write \
        is None


@pytest.mark.parametrize("bad", [dict(head_dim=96), dict(block_size=8), dict(num_kv_heads=3),
                                 dict(num_q_heads=64, num_kv_heads=2)])
def test_attention_plan_rejects(bad):
    args = dict(tokens=4, batch=2, num_q_heads=8, num_kv_heads=2, head_dim=64, max_blocks=4,
                block_size=16, dtype="float16", sm_count=10)
    args.update(bad)
    with pytest.raises(ValueError):
        specs.attention_plan(**args)


def test_smem_fits_hopper_and_ampere():
    for d in specs.HEAD_DIMS:
        assert specs.prefill_smem(d) <= 48 * 1024
        assert specs.decode_smem(d) <= 163 * 1024  # sm_80 opt-in limit per block
        assert 4 * 16 * d * 4 + 512 <= specs.decode_smem(d) - 16 * d * 2


def test_serialize_roundtrip_and_refusals():
    attrs = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=32, scale=0.125,
                 write_kv=1)
    blob = specs.serialize("PagedAttention", attrs)
    assert specs.deserialize("PagedAttention", blob) == attrs
    assert len(blob) == 8 + struct.calcsize("<iiiifB")
    with pytest.raises(ValueError, match="not for|plugin id"):
        specs.deserialize("RmsNorm", blob)
    with pytest.raises(ValueError, match="version"):
        specs.deserialize("PagedAttention", blob[:4] + b"\x09\x00" + blob[6:])
    with pytest.raises(ValueError, match="bytes"):
        specs.deserialize("PagedAttention", blob[:-1])
    with pytest.raises(ValueError, match="missing"):
        specs.serialize("RmsNorm", {"eps": 1e-5})
    rms = specs.deserialize("RmsNorm", specs.serialize("RmsNorm", dict(eps=1e-6, residual=1)))
    assert rms["eps"] == pytest.approx(1e-6) and rms["residual"] == 1


def test_float_bits():
    assert specs.float_bits(1.0) == 0x3F800000
    assert struct.unpack("<f", struct.pack("<i", specs.float_bits(1e-5)))[0] == \
        pytest.approx(1e-5)
