import subprocess
import sys

import pytest
import torch

from llamaforge.config import ModelConfig
from llamaforge.models import build_model


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def small_model():
    def make(seed=0, **kw):
        return build_model(small_config(**kw), seed=seed).eval()

    return make


@pytest.fixture(scope="session")
def mistral():
    from llamaforge.tokenizer import load_tokenizer

    return load_tokenizer("mistral")


def run_cli(*args, check_rc=None, **kw) -> subprocess.CompletedProcess:
    """Run `python -m llamaforge ARGS` in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "llamaforge", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, **kw)
    if check_rc is not None:
        assert done.returncode == check_rc, done.stderr[-3000:]
    return done


def assert_user_error(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one line on stderr starting 'llamaforge: error:', naming the problem; no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llamaforge: error:"), done.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(0))
