"""Optional extras never break the core: with matplotlib, markdown, lm-eval, TensorBoard and wandb hidden
(as after `pip install -e .` with no extras), training still writes a complete final/ with its model card,
and each command that needs a missing extra exits 2 with one line naming `pip install 'llamaforge[EXTRA]'`."""

import json
import os
import subprocess
import sys

import pytest

from helpers import assert_user_error, micro

HIDDEN = ["matplotlib", "markdown", "lm_eval", "tensorboard", "wandb"]
BLOCKER = """
import sys
for name in {hidden!r}:
    sys.modules[name] = None  # `import name` raises ModuleNotFoundError; importlib.util.find_spec gives None
"""
MICRO = [*micro(positions=64), "--train.seq_len", "32", "--train.micro_batch", "2", "--train.eval_tokens", "256", "--train.warmup_steps", "1",
         "--train.sample_prompt", "The", "--batch-tokens", "128", "--max-steps", "3", "--eval-every", "3"]


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """Run `python -m llamaforge ...` with the optional extras made unimportable."""
    root = tmp_path_factory.mktemp("bare")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(BLOCKER.format(hidden=HIDDEN))
    env = dict(os.environ, PYTHONPATH=str(root / "site"))

    def run(*args, check_rc=None):
        done = subprocess.run([sys.executable, "-m", "llamaforge", *map(str, args)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, env=env)
        if check_rc is not None:
            assert done.returncode == check_rc, done.stderr[-3000:]
        return done

    probe = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "matplotlib" in probe.stderr  # the extras really are hidden
    words = "the cat sat on the mat while a dog ran to the park".split()
    with open(root / "c.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(30))}) + "\n")
    run("prepare", "--source", root / "c.jsonl", "--out", root / "d", "--val-fraction", "0.1", check_rc=0)
    run.root = root
    return run


def test_train_writes_final_with_card_without_any_extra(bare):
    run = bare.root / "run"
    bare("train", "--data", bare.root / "d", "--out", run, "--preset", "tiny", *MICRO, check_rc=0)
    final = run / "final"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "llamaforge.json"):
        assert (final / name).is_file(), name
    assert "val_loss" in (final / "README.md").read_text() or "validation" in (final / "README.md").read_text()
    assert not (run / "tensorboard").exists()


@pytest.mark.parametrize("extra,args", [
    ("report", ["report", "--run", "{run}", "--out", "{root}/rep"]),
    ("eval", ["eval", "--model", "{run}/final", "--tasks", "mmlu_offline_100"]),
    ("wandb", ["train", "--data", "{root}/d", "--out", "{root}/w", "--preset", "tiny", *MICRO, "--train.wandb", "true"]),
    ("tensorboard", ["train", "--data", "{root}/d", "--out", "{root}/t", "--preset", "tiny", *MICRO,
                     "--train.tensorboard", "true"]),
])
def test_missing_extra_is_one_line_naming_it(bare, extra, args):
    root = bare.root
    if not (root / "run" / "final").exists():
        bare("train", "--data", root / "d", "--out", root / "run", "--preset", "tiny", *MICRO, check_rc=0)
    done = bare(*[a.format(run=root / "run", root=root) for a in args])
    assert_user_error(done, f"pip install 'llamaforge[{extra}]'")
    assert not (root / "rep").exists() and not (root / "w" / "checkpoints").exists()
