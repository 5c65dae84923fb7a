"""Fixtures of the quantization tests."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="session")
def words(tmp_path_factory):
    """Text in the tiny tokenizer's words (w3 .. w127), for calibration and evaluation: the
    bundled English texts are all unknown tokens to it."""
    r = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(f"w{r.randrange(3, 128)}" for _ in range(600)))
    return path
