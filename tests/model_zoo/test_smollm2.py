"""SmolLM2-135M-Instruct (real weights from its GGUF file): greedy generation equals HF's."""

from __future__ import annotations

import pytest

from llmc.runtime.runner import Runner

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was"]
NEW_TOKENS = 40


@pytest.mark.slow
def test_greedy_tokens_equal_hf(smollm2_engine, hf_smollm2):
    import torch
    from transformers import GenerationConfig

    tok, model = hf_smollm2
    # Neither side stops at EOS, so the comparison always covers NEW_TOKENS tokens.
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    model.generation_config.eos_token_id = None
    runner = Runner(smollm2_engine)
    ids = [runner.encode(p) for p in PROMPTS]
    assert ids == [tok(p)["input_ids"] for p in PROMPTS]   # same tokenizer
    from llmc.runtime.sampler import SamplingParams

    results = runner.complete(ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    for prompt_ids, result in zip(ids, results):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt_ids]), generation_config=greedy)
        ref = ref[0, len(prompt_ids):].tolist()
        assert result.token_ids == ref, (tok.decode(result.token_ids), tok.decode(ref))
    assert all(len(r.token_ids) == NEW_TOKENS for r in results)
    runner.close()


@pytest.mark.slow
def test_runner_text(smollm2_engine):
    out = Runner(smollm2_engine).generate("The capital of France is", max_new_tokens=8)
    assert out[0].strip().startswith("Paris")
