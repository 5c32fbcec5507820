"""Fixtures. Shared helper functions are in helpers.py."""

import pytest
import torch

from helpers import small_config
from llamaforge.model.io import build_model


@pytest.fixture
def small_model():
    def make(seed=0, **kw):
        return build_model(small_config(**kw), seed=seed).eval()

    return make


@pytest.fixture(scope="session")
def mistral():
    from llamaforge.tokenizer import load_tokenizer

    return load_tokenizer("mistral")


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(0))
