"""Fixtures of the pass tests (helpers live in passes_helpers.py)."""

import pytest


@pytest.fixture(scope="session")
def tiny_folders(tiny_models):
    return {k: folder for k, (folder, _) in tiny_models.items()}
