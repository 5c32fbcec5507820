"""`make gpu-check`'s multi-GPU part (DDP and FSDP2 vs one process, SIGKILL + resume) is the same code
on gloo: run here on the CPU with a micro model, so the checker itself is tested where no GPU is."""

import os
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import distributed_checks, main
from helpers import micro, stories_data
from llamaforge.runs import read_metrics


@pytest.mark.slow  # ~50 s: DDP and FSDP2 themselves are in test_train.py; this checks the checker
@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun not installed")
def test_distributed_checks_pass_on_gloo(tmp_path):
    stories_data(tmp_path, 300)
    over = [*micro(layers=2, positions=64), "--train.seq_len", "32", "--train.micro_batch", "2", "--batch-tokens", "128",
            "--train.eval_tokens", "256", "--lr", "0.003", "--train.warmup_steps", "1", "--train.precision", "fp32",
            "--eval-every", "1"]  # an evaluation and a sample every step: slow enough to be killed mid-run
    fail: list[str] = []
    (tmp_path / "runs").mkdir()
    distributed_checks(str(tmp_path / "d"), tmp_path / "runs", 12, over, fail, tolerance=1e-4, preset="tiny",
                       env={"OMP_NUM_THREADS": "1"})
    assert fail == []
    killed = [r for r in read_metrics(tmp_path / "runs" / "ddp-killed") if r.get("event") == "resumed"]
    assert killed and killed[0]["checkpoint"] in ("step_4", "step_8")  # killed mid-run, then resumed


def test_gpu_check_without_cuda_says_so_and_exits_0(capsys):
    if os.environ.get("CUDA_VISIBLE_DEVICES") != "" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: `make gpu-check` runs the real check")
    assert main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
