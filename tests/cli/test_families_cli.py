"""`llmc build` + `llmc run` on a tiny random model of each family added for issue #12 give
HF transformers' greedy tokens (the issue's done-when), through the command a user types."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import LIMITS, llmc


@pytest.mark.parametrize("kind", ["phi3-window", "qwen3-qknorm", "gemma2-softcap",
                                  "gemma3-local-global", "gpt2-learned-pos", "mixtral-top2",
                                  "qwen2moe-shared", "qwen3moe-qknorm"])
def test_build_and_run_give_hf_greedy_tokens(tiny_models, tmp_path, kind):
    from tokenizers import Tokenizer

    folder, model = tiny_models[kind]
    out = tmp_path / "m.engine"
    llmc("build", "--model", folder, "-o", out, "--backend", "reference", "--dtype", "fp32",
         *LIMITS)
    prompt = "w3 w17 w5 w60 w9 w21 w33 w40 w11 w7 w50 w29 w8"   # longer than the windows
    r = llmc("run", out, "-p", prompt, "--max-new-tokens", "12", "--json")
    got = json.loads(r.stdout.splitlines()[-1])["token_ids"]
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
    if ref[-1:] == [model.generation_config.eos_token_id]:
        ref = ref[:-1]      # HF keeps the EOS it stopped at; llmc's token_ids do not
    assert got == ref
