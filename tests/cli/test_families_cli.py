"""`llmc build` + `llmc run` on a tiny random model of each family added for issue #12 give
HF transformers' greedy tokens (the issue's done-when), through the command a user types."""

from __future__ import annotations

import json

import pytest
from test_cli import LIMITS, llmc


@pytest.mark.parametrize("kind", ["phi3-window", "qwen3-qknorm", "gemma2-softcap",
                                  "gemma3-local-global", "gpt2-learned-pos", "mixtral-top2",
                                  "qwen2moe-shared", "qwen3moe-qknorm"])
def test_build_and_run_give_hf_greedy_tokens(tiny_models, tmp_path, kind):
    from hf_steps import GREEDY_PROMPT, hf_greedy

    folder, model = tiny_models[kind]
    out = tmp_path / "m.engine"
    llmc("build", "--model", folder, "-o", out, "--backend", "reference", "--dtype", "fp32",
         *LIMITS)
    r = llmc("run", out, "-p", GREEDY_PROMPT, "--max-new-tokens", "12", "--json")
    got = json.loads(r.stdout.splitlines()[-1])["token_ids"]
    assert got == hf_greedy(model, folder)[1]
    # `llmc inspect` names a mixture's experts (Mixtral: num_local_experts)
    shape = next(ln for ln in llmc("inspect", out).stdout.splitlines() if "shape:" in ln)
    if kind.startswith(("mixtral", "qwen2moe", "qwen3moe")):   # each tiny mixture: 2 of 4
        assert shape.endswith(", top 2 of 4 experts"), shape
    else:
        assert "experts" not in shape, shape
