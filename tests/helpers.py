"""Helpers the test files share (fixtures live in conftest.py): a small model config, the micro-model
overrides for CLI runs, and running the CLI (in this process through its entry point, or fresh)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys

from llamaforge.config import ModelConfig


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def micro(hidden: int = 32, layers: int = 1, intermediate: int | None = None, heads: int = 2, kv_heads: int = 1,
          positions: int | None = None) -> list[str]:
    """`--model.*` overrides that shrink a preset to a micro model (seconds per step on a CPU)."""
    out = ["--model.hidden_size", str(hidden), "--model.intermediate_size", str(intermediate or 2 * hidden),
           "--model.num_hidden_layers", str(layers), "--model.num_attention_heads", str(heads),
           "--model.num_key_value_heads", str(kv_heads)]
    if positions:
        out += ["--model.max_position_embeddings", str(positions)]
    return out


PLAIN_FLAGS = {"--lr": "train.lr", "--batch-tokens": "train.batch_tokens", "--max-steps": "train.max_steps",
               "--save-every": "train.save_every", "--eval-every": "train.eval_every", "--seed": "train.seed"}


def dotlist(flags: list[str], skip: tuple[str, ...] = ()) -> list[str]:
    """CLI flag pairs (`--model.x 3`, `--lr 0.01`) as `load_config` overrides (`model.x=3`, `train.lr=0.01`)."""
    pairs = zip(flags[::2], flags[1::2])
    return [f"{PLAIN_FLAGS.get(k, k.removeprefix('--'))}={v}" for k, v in pairs if k not in skip]


def write_stories(path, n: int) -> None:
    """A deterministic JSONL corpus of `n` short stories over a 17-word vocabulary (learnable fast)."""
    words = "the cat sat on the mat while a dog ran to the park and the bird sang in the tree".split()
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 30))
            f.write(json.dumps({"text": f"Story {i}: " + text.capitalize() + "."}) + "\n")


def run_cli(*args, check_rc=None, fresh: bool = False, **kw) -> subprocess.CompletedProcess:
    """`llamaforge ARGS` through the CLI's own entry point (`cli.main`) in this process, with stdout,
    stderr and log records captured as a terminal-less process would print them: the same exit code
    and lines without paying for a Python start and the torch import (seconds each on 2 cores).
    `fresh=True`, or subprocess options (env=, timeout=...), run `python -m llamaforge` in a new process."""
    argv = [str(a) for a in args]
    if fresh or kw:
        done = subprocess.run([sys.executable, "-m", "llamaforge", *argv], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, **kw)
    else:
        from llamaforge.cli import main

        out, err = io.StringIO(), io.StringIO()
        handler = logging.StreamHandler(err)  # what basicConfig gives a fresh process (pytest's handlers hold root)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
        done = subprocess.CompletedProcess(["llamaforge", *argv], code, out.getvalue(), err.getvalue())
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


def _bf16_param():
    """The `bf16` case of a precision parametrization, in the slow tier (`make test-slow`, which CI
    runs): runs on CPUs with AMX/AVX512-BF16 (bf16 is the `auto` choice there), skips elsewhere
    (emulated bf16 is ~100x slower) unless LLAMAFORGE_TEST_BF16=1."""
    import os

    import pytest

    from llamaforge.train.precision import cpu_flags

    fast = bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    run = fast or os.environ.get("LLAMAFORGE_TEST_BF16") == "1"
    return pytest.param("bf16", marks=[pytest.mark.slow, pytest.mark.skipif(
        not run, reason="this CPU has no AMX/AVX512-BF16 (bf16 emulated, slow); LLAMAFORGE_TEST_BF16=1 runs it anyway")])


PRECISIONS = ["fp32", _bf16_param()]
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # across process counts / compiled kernels; resume is exact in both


def stories_data(root, n: int):
    """ROOT/d: a prepared data folder (5% validation) of `n` stories from write_stories."""
    from llamaforge.data.prepare import prepare

    write_stories(root / "c.jsonl", n)
    prepare(str(root / "c.jsonl"), root / "d", val_fraction=0.05, workers=0, progress=False)
    return root / "d"


def muon_split_worker(rank: int, world: int, port: int, cases: list) -> None:
    """One gloo rank of tests/test_recipe.py's split-Newton-Schulz check, for each (ns_dtype, batched,
    out) of `cases`: the same matrices and gradients on every rank, 3 steps of Muon with `split=True`;
    rank 0 saves the parameters to `out`."""
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for ns_dtype, batched, out in cases:
            params, opt, gen = muon_params(ns_dtype, split=True, batched=batched)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            if rank == 0:
                torch.save([p.detach() for p in params] + [opt.state_dict()], out)
    finally:
        dist.destroy_process_group()


def muon_params(ns_dtype, split: bool = False, batched: bool = False):
    """Tall, wide and square matrices (uneven sizes, so the ranks' shares differ; some of one shape, a
    tall one the transpose of a wide one) and our Muon on them."""
    import torch

    from llamaforge.train.optim import Muon

    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 40), (24, 24), (8, 8), (40, 8), (24, 24), (8, 40), (24, 24)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    opt = Muon(params, ns_dtype=ns_dtype, split=split, batched=batched, lr=0.02, weight_decay=0.01, momentum=0.95,
               adjust_lr_fn="original")
    return params, opt, gen


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_train_worker(rank: int, world: int, port: int, overrides: list[str], data: str, out: str,
                     oom_rank: int | None = None, above: int = 1, sigterm_in_validation: int | None = None) -> None:
    """One gloo rank of `pretrain` (the ranks' environment as torchrun sets it); on rank `oom_rank`
    every forward of more than `above` sequences raises torch.OutOfMemoryError (injected); rank 1
    sends itself SIGTERM as validation starts after step `sigterm_in_validation` (then writes
    the step it stopped at to OUT.stopped)."""
    import os
    import signal
    from pathlib import Path

    import torch

    from llamaforge.config import load_config
    from llamaforge.train import step as step_module
    from llamaforge.train.bench import InLoopEvaluation
    from llamaforge.train.preempt import Stopped
    from llamaforge.workflows.pretrain import pretrain

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank == oom_rank:
        real = step_module.causal_loss

        def small_memory(model, inputs, *a, **k):
            if len(inputs) > above:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(model, inputs, *a, **k)

        step_module.causal_loss = small_memory
    if rank == 1 and sigterm_in_validation is not None:
        real_validation = InLoopEvaluation.validate_and_sample

        def signalled(self):
            if self.step == sigterm_in_validation:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_validation(self)

        InLoopEvaluation.validate_and_sample = signalled
    try:
        pretrain(load_config("tiny", overrides=overrides), data, out, progress=False)
    except Stopped as e:
        Path(f"{out}.stopped").write_text(str(e.step))
