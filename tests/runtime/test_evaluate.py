"""`llmc eval` (runtime/evaluate.py): an engine's own teacher-forced decode steps score a text.

CPU: the reference backend's scores against HF transformers' logits over the same windows
(every family variant that changes decode: a sliding window, soft-caps, learned positions),
in groups of windows of unequal length; the command's report and its comparison of two
engines; quantized engines (FP8, INT4-AWQ, an FP8 KV cache) against their builds' reports.
GPU (marked `gpu`): a cuda engine's scores against the reference backend's engine of the same
model and quantization.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmc.build import BuildOptions, build
from llmc.cli.main import main
from llmc.devices import list_gpus
from llmc.engine_file import EngineFile
from llmc.limits import BuildLimits
from llmc.quantization.quantize import QuantOptions
from llmc.runtime.evaluate import agreement, batch_size, score_engine

LIMITS = BuildLimits(max_batch_size=3, max_num_tokens=64, max_seq_len=64, kv_block_size=16)
# five windows at three a step: two groups, the last window of each shorter than the others
LENGTHS = (40, 40, 31, 40, 23)


def _windows(lengths=LENGTHS, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, n).tolist() for n in lengths]


def _engine(folder, out, backend="reference", dtype="fp32", quant="none", kv="auto",
            limits=LIMITS) -> EngineFile:
    """A tiny engine; quantized ones calibrate and are scored on words.txt beside it (600
    words of the tiny models' vocabulary)."""
    words = out.parent / "words.txt"
    words.write_text(" ".join(f"w{i}" for i in np.random.default_rng(1).integers(3, 128, 600)))
    build(BuildOptions(folder, out, backend=backend, dtype=dtype, limits=limits,
                       quant=QuantOptions(quant, calib_data=words, eval_data=words,
                                          kv_cache_dtype=kv)), log=lambda _: None)
    return EngineFile(out)


def _score(file: EngineFile, windows, batch=None, **options):
    return score_engine(file, windows, batch, **options)[0]


def _hf_scores(model, windows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HF's log-probabilities of each window's tokens after its first, its greedy tokens and
    the margin between its two most likely tokens, window after window."""
    import torch

    logp, greedy, margin = [], [], []
    with torch.no_grad():
        for w in windows:
            x = model(torch.tensor([w])).logits[0, :-1].double().log_softmax(-1)
            logp.append(x[torch.arange(len(w) - 1), torch.tensor(w[1:])].numpy())
            top2 = x.topk(2).values
            greedy.append(x.argmax(-1).numpy())
            margin.append((top2[:, 0] - top2[:, 1]).numpy())
    return tuple(np.concatenate(v) for v in (logp, greedy, margin))


@pytest.mark.parametrize("kind", ["llama-gqa", "mistral-window", "gemma2-softcap",
                                  "gpt2-learned-pos"])
def test_scores_are_hf_transformers_teacher_forced(tiny_models, tmp_path, kind):
    folder, model = tiny_models[kind]
    file = _engine(folder, tmp_path / "e.engine")
    windows = _windows()
    got = _score(file, windows)
    logp, greedy, margin = _hf_scores(model, windows)
    assert got.tokens == sum(n - 1 for n in LENGTHS)
    np.testing.assert_allclose(got.logp, logp, atol=2e-4, rtol=0)
    clear = margin > 1e-3   # where HF's top two tie, either is the greedy token
    np.testing.assert_array_equal(got.greedy[clear], greedy[clear])
    assert got.perplexity() == pytest.approx(np.exp(-logp.mean()), rel=1e-5)
    # a window at a time: the same scores (the batch changes no sequence's numbers)
    one = _score(file, windows, batch=1)
    np.testing.assert_allclose(one.logp, got.logp, atol=1e-5, rtol=0)


def test_batch_size_fits_the_engine_and_the_cache(tiny_models, tmp_path):
    from llmc.errors import LlmcError

    header = _engine(tiny_models["llama-gqa"][0], tmp_path / "e.engine").header
    windows = _windows()
    assert batch_size(header, windows, capacity=1000) == 3            # max_batch_size
    assert batch_size(header, windows, capacity=1000, batch=2) == 2
    assert batch_size(header, windows, capacity=8) == 2               # 3 blocks a window
    assert batch_size(header, windows[:1], capacity=1000) == 1
    with pytest.raises(LlmcError, match="needs 3 KV blocks and the cache holds 2"):
        batch_size(header, windows, capacity=2)
    with pytest.raises(LlmcError, match="longer than this engine's max_seq_len"):
        batch_size(header, _windows((65,)), capacity=1000)


def test_eval_command_reports_and_compares(tiny_models, make_tiny, tmp_path, capsys):
    file = _engine(tiny_models["qwen2-bias"][0], tmp_path / "a.engine")
    other = _engine(tiny_models["llama-gqa"][0], tmp_path / "b.engine")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(2).integers(3, 128, 300)))
    args = ["eval", file.path, "--text", text, "--tokens", 100, "--seq-len", 30]

    def llmc(*extra) -> str:
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in (*args, *extra)])
        out, err = capsys.readouterr()
        assert exit_.value.code == 0, err
        return out

    out = json.loads(llmc("--json", "--reference", other.path))
    # windows of 30, 30, 30 and 10 tokens: each scores all but its first
    assert out["tokens"] == 96 and out["windows"] == 4 and out["text"] == str(text)
    ours, theirs = (_score(f, _windows_of(text, file, 100, 30)) for f in (file, other))
    assert out["perplexity"] == pytest.approx(ours.perplexity(), rel=1e-4)
    assert out["reference_perplexity"] == pytest.approx(theirs.perplexity(), rel=1e-4)
    assert out["top1_agreement"] == pytest.approx(agreement(ours, theirs), abs=1e-4)
    assert out["delta_ppl_pct"] == pytest.approx(
        100 * (ours.perplexity() / theirs.perplexity() - 1), abs=1e-2)
    d = theirs.logp - ours.logp   # the tokens' log-prob differences, paired
    assert out["delta_ppl_se_pct"] == pytest.approx(
        100 * np.exp(d.mean()) * d.std(ddof=1) / np.sqrt(len(d)), abs=1e-3)
    assert "build_report_perplexity" not in out   # an unquantized build has no report
    plain = llmc()
    assert plain.startswith(f"perplexity {out['perplexity']:.3f} over 96 tokens of {text} "
                            "(4 windows of up to 30 tokens), reference backend")
    compared = llmc("--reference", other.path).splitlines()[-1]
    assert compared == (f"reference {other.path}: perplexity "
                        f"{out['reference_perplexity']:.3f}; {out['delta_ppl_pct']:+.2f}% ± "
                        f"{out['delta_ppl_se_pct']:.2f}, top-1 agreement "
                        f"{100 * out['top1_agreement']:.1f}%")
    # an engine of another vocabulary cannot be compared
    make_tiny("llama-gqa", tmp_path / "v100", vocab_size=100)
    odd = _engine(tmp_path / "v100", tmp_path / "c.engine")
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in (*args, "--reference", odd.path)])
    assert exit_.value.code == 2
    assert "tokenize differently" in capsys.readouterr().err


def _windows_of(text, file, tokens, seq_len):
    from llmc.quantization import measure

    return measure.token_sequences(file.header.tokenizer.json, text.read_text(), tokens,
                                   "evaluation", "--text", seq_len)


@pytest.mark.parametrize("quant, kv", [("fp8", "auto"), ("int4-awq", "auto"), ("none", "fp8")])
def test_a_quantized_engine_reproduces_its_builds_report(tiny_models, tmp_path, capsys, quant,
                                                          kv):
    """The build scores its graph in one prefill; `llmc eval` the engine a decode step a
    token (an FP8 pool: the session writes the E4M3 rows the graph hands it): the same tokens
    of the same text, the same perplexity to fp16 rounding."""
    file = _engine(tiny_models["llama-gqa"][0], tmp_path / "q.engine", dtype="fp16",
                   quant=quant, kv=kv, limits=BuildLimits(3, 256, 256, 16))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(file.path), "--text", str(tmp_path / "words.txt"), "--json"])
    assert exit_.value.code == 0
    got = json.loads(capsys.readouterr().out)
    acc = file.header.quant.accuracy
    assert got["tokens"] == acc.tokens == 597 and got["build_report_perplexity"] == acc.ppl
    assert got["perplexity"] == pytest.approx(acc.ppl, rel=1e-4)   # measured: equal to 4 decimals


@pytest.mark.slow
def test_smollm2_engine_reproduces_its_builds_report(smollm2_path, tmp_path, capsys):
    """The build scores its quantized graph in one prefill on onnxruntime; `llmc eval` the
    engine, a decode step a token: the same tokens, the same perplexity to rounding."""
    out = tmp_path / "s.engine"
    header = build(BuildOptions(smollm2_path, out, backend="reference", dtype="fp16",
                                limits=BuildLimits(4, 256, 512, 16),
                                quant=QuantOptions("int4-rtn")), log=lambda _: None)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(out), "--json"])
    assert exit_.value.code == 0
    got = json.loads(capsys.readouterr().out)
    acc = header.quant.accuracy
    assert got["tokens"] == acc.tokens and got["build_report_perplexity"] == acc.ppl
    assert got["perplexity"] == pytest.approx(acc.ppl, rel=2e-3)


# --------------------------------------------------------------------------- on the GPU

GPUS, WHY = list_gpus()


def _why_not() -> str:
    if not GPUS:
        return f"needs an NVIDIA GPU ({WHY})"
    from llmc.backends.cuda.session import runtime_missing

    return runtime_missing()


# (largest |cuda - reference| of a token's log-probability, perplexity's relative tolerance),
# fp16: the reference backend runs the same fp16 graph on onnxruntime, over the same quantized
# weights. Measured on an H200: 7.5e-4 to 7.9e-4 and 3e-5 (16-bit, INT4); FP8, where an fp16
# rounding apart moves a GEMM input across an E4M3 boundary now and then, 0.031-0.034 and
# 1e-3 (top-1 agreement 96-98%).
TOLERANCE = {"none": (5e-3, 1e-3), "int4-rtn": (5e-3, 1e-3), "fp8": (0.1, 5e-3)}


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("quant", list(TOLERANCE))
@pytest.mark.parametrize("kind", ["llama-gqa", "mistral-window"])
def test_cuda_engine_scores_as_the_reference_engine(tiny_models_d64, tmp_path, kind, quant):
    from llmc.plugins.launch_rules import FP8_ARCHS

    if quant == "fp8" and GPUS[0].arch not in FP8_ARCHS:
        pytest.skip("FP8 engines are built for Hopper (sm_90a)")
    folder, _ = tiny_models_d64[kind]
    ref = _engine(folder, tmp_path / "r.engine", dtype="fp16", quant=quant)
    cuda = _engine(folder, tmp_path / "c.engine", backend="cuda", dtype="fp16", quant=quant)
    windows = _windows()
    want, got = _score(ref, windows), _score(cuda, windows, max_kv_blocks=64)
    logp_tol, ppl_tol = TOLERANCE[quant]
    assert np.abs(got.logp - want.logp).max() < logp_tol
    assert got.perplexity() == pytest.approx(want.perplexity(), rel=ppl_tol)
    assert agreement(got, want) > 0.9
