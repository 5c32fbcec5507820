"""A golden file of the micro model's first 20 training losses (fp32, CPU): any change to the numerics
(init, RoPE, attention, the fused loss, accumulation, the optimizer or the schedule) shows up here.

After an intended change, regenerate it: LLAMAFORGE_REGENERATE_GOLDEN=1 pytest tests/test_golden.py
The tolerance (2e-3) covers float differences between CPU kernels (AVX2, AVX-512), not a changed recipe.
"""

import json
import os
from pathlib import Path

import pytest

from helpers import stories_data
from llamaforge.config import load_config
from llamaforge.runs import read_metrics
from llamaforge.workflows.pretrain import pretrain

GOLDEN = Path(__file__).parent / "golden" / "micro_losses.json"
OVERRIDES = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
             "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.max_position_embeddings=64",
             "train.seq_len=32", "train.micro_batch=2", "train.batch_tokens=256", "train.max_steps=20",
             "train.warmup_steps=2", "train.lr=0.01", "train.eval_every=0", "train.save_every=0", "train.sample_prompt=''",
             "train.precision=fp32",  # pinned: `auto` would pick bf16 on AMX CPUs
             "train.optimizer=adamw", "train.schedule=cosine", "train.min_lr_ratio=0.1"]  # pinned: torch's Muon
# runs Newton-Schulz in bf16, whose rounding differs between CPU kernels (tests/test_recipe.py covers Muon)


def test_first_20_losses_match_the_golden_file(tmp_path):
    stories_data(tmp_path, 300)
    pretrain(load_config("tiny", overrides=OVERRIDES), tmp_path / "d", tmp_path / "run", progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["type"] == "train"]
    assert len(losses) == 20
    if os.environ.get("LLAMAFORGE_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"overrides": OVERRIDES, "losses": losses}, indent=1) + "\n")
        pytest.skip("golden file regenerated")
    want = json.loads(GOLDEN.read_text())
    assert want["overrides"] == OVERRIDES
    assert losses == pytest.approx(want["losses"], abs=2e-3)
