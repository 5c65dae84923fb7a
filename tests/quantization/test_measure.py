"""The accuracy report's statistics (quantization/measure.py: compare): perplexity change, its
standard error and the KL divergence, against torch and against the spread they claim."""

from __future__ import annotations

import numpy as np
import pytest

from llmc.header import Accuracy
from llmc.quantization import measure


def _text(rng, n: int, vocab: int, noise: float):
    """A text of n scored tokens drawn from the reference's distribution, and logits of a
    reference and of a perturbed ("quantized") model at each position."""
    ref = rng.normal(0, 2, (n + 1, vocab)).astype(np.float32)
    quant = ref + rng.normal(0, noise, ref.shape).astype(np.float32)
    p = np.exp(ref[:n] - ref[:n].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    targets = [int(rng.choice(vocab, p=row)) for row in p]
    return ref, quant, [[0] + targets]


def test_compare_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    ref, quant, seqs = _text(rng, 300, 40, 0.5)
    # two sequences: each one's last row scores nothing
    seqs = [seqs[0][:120], seqs[0][120:]]
    acc = measure.compare(ref, quant, seqs, "t", 5.0)
    rows = [r for r in range(len(ref)) if r not in (119, 300)]
    targets = torch.tensor(seqs[0][1:] + seqs[1][1:])
    lr = torch.log_softmax(torch.from_numpy(ref[rows]).double(), 1)
    lq = torch.log_softmax(torch.from_numpy(quant[rows]).double(), 1)
    nll_r = torch.nn.functional.nll_loss(lr, targets).item()
    nll_q = torch.nn.functional.nll_loss(lq, targets).item()
    kl = torch.nn.functional.kl_div(lq, lr, log_target=True, reduction="batchmean").item()
    assert acc.tokens == 299
    assert acc.ppl_reference == pytest.approx(np.exp(nll_r), abs=1e-4)
    assert acc.ppl == pytest.approx(np.exp(nll_q), abs=1e-4)
    assert acc.delta_ppl_pct == pytest.approx(100 * (np.exp(nll_q - nll_r) - 1), abs=1e-3)
    assert acc.kl_divergence == pytest.approx(kl, abs=1e-5) and acc.kl_divergence > 0.01
    assert "KL divergence" in acc.describe() and " ± " in acc.describe()


def test_the_same_logits_differ_by_nothing():
    rng = np.random.default_rng(1)
    ref, _, seqs = _text(rng, 50, 30, 0.0)
    acc = measure.compare(ref, ref.copy(), seqs, "t", 5.0)
    assert (acc.delta_ppl_pct, acc.delta_ppl_se_pct, acc.kl_divergence) == (0, 0, 0)
    assert acc.top1_agreement == 1.0


def test_the_standard_error_is_the_spread_over_texts():
    """Over many texts of the same kind, the perplexity change spreads as much as one text's
    standard error says (within 15%), and its mean is the reported change's."""
    rng = np.random.default_rng(2)
    deltas, errors = [], []
    for _ in range(300):
        acc = measure.compare(*_text(rng, 200, 20, 0.8), "t", 5.0)
        deltas.append(acc.delta_ppl_pct)
        errors.append(acc.delta_ppl_se_pct)
    spread, claimed = np.std(deltas, ddof=1), np.mean(errors)
    assert spread == pytest.approx(claimed, rel=0.15), (spread, claimed)
    assert claimed > 1.0   # noise this large moves a 200-token text by points, not hundredths


def test_reports_of_older_engines_have_neither():
    """Headers written before the standard error and the KL divergence were measured."""
    old = Accuracy(text="bundled eval.txt", tokens=1020, ppl_reference=22.973, ppl=23.221,
                   delta_ppl_pct=1.08, top1_agreement=0.905, threshold_pct=5.0)
    assert old.describe() == ("perplexity 23.221 vs 22.973 unquantized (+1.08%, threshold "
                              "5%), top-1 agreement 90.5% over 1020 tokens of bundled "
                              "eval.txt")
    new = Accuracy(**{**old.__dict__, "delta_ppl_se_pct": 0.73, "kl_divergence": 0.0263})
    assert new.describe() == ("perplexity 23.221 vs 22.973 unquantized (+1.08% ± 0.73, "
                              "threshold 5%), top-1 agreement 90.5%, KL divergence 0.0263 "
                              "over 1020 tokens of bundled eval.txt")
