"""Running a saved graph on onnxruntime over a text: calibration statistics of the GEMM inputs,
and the accuracy of a quantized graph against the unquantized one.

A text is fed as a few prefill sequences in one engine step (the contract's own inputs,
`contract.pack_step`), asking for the logits of every row, so one run scores every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from llmc import contract
from llmc.contract import Chunk, EngineIO
from llmc.dtypes import np_dtype
from llmc.errors import LlmcError
from llmc.header import Accuracy
from llmc.quantization.numerics import fp8_activation_amax
from llmc.quantization.ort import feed, session_options

SEQ_LEN = 256            # tokens a sequence when a text is cut up (short: a CPU build runs it)


def bundled_text(name: str) -> str:
    """quantization/data/{calib,eval}.txt: public-domain texts (data/README.md)."""
    return resources.files("llmc.quantization").joinpath(f"data/{name}.txt").read_text()


def bundled_paragraphs(name: str, min_words: int = 20) -> list[str]:
    """The bundled text's paragraphs of at least `min_words` words, each on one line: the
    short texts the benches score from their start (bench/short_texts.py, fp8_scales.py,
    lm_eval_serve.py)."""
    return [" ".join(p.split()) for p in bundled_text(name).split("\n\n")
            if len(p.split()) >= min_words]


def read_text(path: Path | None, default: str) -> tuple[str, str]:
    """(text, its name for the report): the file given, or the bundled text."""
    if path is None:
        return bundled_text(default), f"bundled {default}.txt"
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise LlmcError(f"cannot read the text file {path} ({e}); give a UTF-8 text file") \
            from None


def token_sequences(tokenizer_json: str, text: str, n_tokens: int, what: str, option: str,
                    seq_len: int = SEQ_LEN) -> list[list[int]]:
    """The text's first ``n_tokens`` tokens cut into sequences of up to ``seq_len``;
    ``what`` names the text and ``option`` the option that gives it, for the errors."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(text, add_special_tokens=False).ids
    ids = ids[:n_tokens]
    if len(ids) < 16:
        raise LlmcError(f"the {what} text has {len(ids)} tokens; it needs at least 16")
    if len(set(ids)) < 8:   # e.g. all unknown: the text is not in the model's vocabulary
        raise LlmcError(f"the {what} text is {len(set(ids))} distinct tokens to this model's "
                        f"tokenizer; give a text in its language ({option})")
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:]) > 1]


class GraphRunner:
    """onnxruntime over a saved graph (model.onnx + weights.bin), optionally returning
    intermediate values (``observe``) as well as the logits."""

    def __init__(self, onnx_path: Path, io: EngineIO, observe: Sequence[str] = ()):
        import onnx
        import onnxruntime as ort

        model = onnx.load(onnx_path, load_external_data=False)
        for name in observe:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
        opts = session_options()
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(Path(onnx_path).parent.resolve()))
        self.sess = ort.InferenceSession(model.SerializeToString(), opts,
                                         providers=["CPUExecutionProvider"])
        self.io, self.observe = io, list(observe)

    def run(self, seqs: list[list[int]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Every row's logits [T, vocab] (float32) and the observed values, for ``seqs``
        prefilled together from position 0."""
        bs, chunks, used = self.io.block_size, [], 0
        for s in seqs:
            n = -(-len(s) // bs)
            chunks.append(Chunk(s, 0, list(range(used, used + n))))
            used += n
        feeds = contract.pack_step(chunks, bs)
        # every row's logits: the head gathers the rows it is given, as many as there are
        feeds[contract.LAST_TOKEN_ROWS] = np.arange(sum(map(len, seqs)), dtype=np.int32)
        pool = feed(np.zeros(self.io.kv_shape(used), np_dtype(self.io.kv_dtype)),
                    self.io.kv_dtype)
        feeds.update({contract.kv_cache_input(i): pool for i in range(self.io.num_layers)})
        out = self.sess.run([contract.LOGITS, *self.observe], feeds)
        return out[0], dict(zip(self.observe, out[1:]))


@dataclass
class Calibration:
    """Per GEMM (keyed by its weight): its input's |max| (FP8's activation scale) and up to
    ``rows`` of its input rows (AWQ's search); ``values``: the other values asked for, whole
    (the new K/V rows of an FP8 KV cache's calibration)."""

    amax: dict[str, float]
    rows: dict[str, np.ndarray]
    tokens: int
    values: dict[str, np.ndarray]


def calibrate(onnx_path: Path, io: EngineIO, inputs: dict[str, str],
              seqs: list[list[int]], keep_rows: int = 0,
              values: Sequence[str] = (), fp8_scale_dtype: str | None = None) -> Calibration:
    """Run the unquantized graph over ``seqs``; ``inputs`` maps weight -> its GEMM's input.
    ``fp8_scale_dtype``: given (the dtype FP8 scales are stored in), each |max| is the one
    numerics.fp8_activation_amax picks: the step above it whose scale rounds the inputs best."""
    names = sorted(set(inputs.values()) | set(values))
    _, seen = GraphRunner(onnx_path, io, names).run(seqs)
    rng = np.random.default_rng(0)
    amax, rows = {}, {}
    for weight, x in inputs.items():
        v = seen[x].reshape(-1, seen[x].shape[-1]).astype(np.float32)
        amax[weight] = fp8_activation_amax(v, fp8_scale_dtype) if fp8_scale_dtype else \
            float(np.abs(v).max())
        if keep_rows:
            pick = rng.choice(len(v), min(keep_rows, len(v)), replace=False)
            rows[weight] = v[np.sort(pick)]
    return Calibration(amax, rows, sum(map(len, seqs)), {v: seen[v] for v in values})


def _targets(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose next token is known, that token): all but each sequence's last row."""
    rows, targets, start = [], [], 0
    for s in seqs:
        rows.extend(range(start, start + len(s) - 1))
        targets.extend(s[1:])
        start += len(s)
    return np.asarray(rows), np.asarray(targets)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Each row's log-probabilities (float64)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each row's log-probability of its target token (log-softmax in float64)."""
    return log_softmax(logits)[np.arange(len(logits)), targets]


def delta_ppl_pct(logp_reference: np.ndarray, logp: np.ndarray) -> float:
    """100 * (ppl / ppl_reference - 1) from the same tokens' log-probabilities under both."""
    return float(100 * (np.exp(np.mean(logp_reference) - np.mean(logp)) - 1))


def delta_ppl_se_pct(logp_reference: np.ndarray, logp: np.ndarray) -> float:
    """The standard error of 100 * (ppl / ppl_reference - 1) over the scored tokens: both
    perplexities come from the same tokens, so it is the spread of the tokens' log-prob
    differences over sqrt(tokens), carried through exp. It treats the tokens as independent
    draws from text of this kind (what another text of the same length would give); how the
    quantization's own choices fall (calibration, rounding ties) is not in it."""
    d = np.asarray(logp_reference, np.float64) - np.asarray(logp, np.float64)
    if len(d) < 2:
        return 0.0
    return float(100 * np.exp(d.mean()) * d.std(ddof=1) / np.sqrt(len(d)))


def compare(reference: np.ndarray, quantized: np.ndarray, seqs: list[list[int]], text: str,
            threshold_pct: float) -> Accuracy:
    """Perplexity of both on the text (the change with its standard error), how often their
    top-1 (greedy) tokens agree with the same prefix (teacher-forced over every position),
    and the mean KL divergence of the quantized distribution from the reference's over the
    scored positions (llama.cpp's measure of a quantization: unlike perplexity it compares
    every token's probability, not the text's next token's alone)."""
    rows, targets = _targets(seqs)
    lp_ref, lp, kl = [], [], []
    for i in range(0, len(rows), 256):   # float64 [rows, vocab] a few at a time
        r, t = rows[i:i + 256], targets[i:i + 256]
        ref, quant = log_softmax(reference[r]), log_softmax(quantized[r])
        at = np.arange(len(r))
        lp_ref.append(ref[at, t])
        lp.append(quant[at, t])
        kl.append((np.exp(ref) * (ref - quant)).sum(axis=1))
    lp_ref, lp = np.concatenate(lp_ref), np.concatenate(lp)
    ppl_ref, ppl = float(np.exp(-lp_ref.mean())), float(np.exp(-lp.mean()))
    kl = float(np.concatenate(kl).mean())
    agree = float(np.mean(reference.argmax(axis=1) == quantized.argmax(axis=1)))
    return Accuracy(text=text, tokens=len(targets), ppl_reference=round(ppl_ref, 4),
                    ppl=round(ppl, 4), delta_ppl_pct=round(delta_ppl_pct(lp_ref, lp), 3),
                    top1_agreement=round(agree, 4), threshold_pct=threshold_pct,
                    delta_ppl_se_pct=round(delta_ppl_se_pct(lp_ref, lp), 3),
                    kl_divergence=round(kl, 5))


def measure(reference_onnx: Path, quantized_onnx: Path, io: EngineIO, seqs: list[list[int]],
            text: str, threshold_pct: float, quantized_io: EngineIO | None = None) -> Accuracy:
    """``quantized_io``: the quantized graph's own I/O where it differs (an FP8 KV pool)."""
    ref, _ = GraphRunner(reference_onnx, io).run(seqs)
    quant, _ = GraphRunner(quantized_onnx, quantized_io or io).run(seqs)
    return compare(ref, quant, seqs, text, threshold_pct)
