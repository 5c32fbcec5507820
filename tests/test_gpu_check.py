"""`make gpu-check`'s multi-GPU part (DDP and FSDP2 vs one process, SIGKILL + resume) is the same code
on gloo: run here on the CPU with a micro model, so the checker itself is tested where no GPU is."""

import os
import sys
from pathlib import Path

import pytest

import torch

from benchmarks.gpu_check import distributed_checks, main
from benchmarks.gpu_plan import agree, check_attention, estimate_seconds, plan
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
    started = [r for r in read_metrics(tmp_path / "runs" / "ddp") if r.get("event") == "started"][0]
    assert "Muon" in started["recipe"] and started["world"] == 2  # the preset's recipe under DDP
    killed = [r for r in read_metrics(tmp_path / "runs" / "ddp-killed") if r.get("event") == "resumed"]
    assert killed and killed[0]["checkpoint"] in ("step_4", "step_8")  # killed mid-run, then resumed


def test_gpu_check_without_cuda_says_so_and_exits_0(capsys):
    if os.environ.get("CUDA_VISIBLE_DEVICES") != "" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: `make gpu-check` runs the real check")
    assert main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


GB = 10**9


@pytest.mark.parametrize("card, capability, memory, kernel, dtype, micro", [
    ("T4", (7, 5), 15.8 * GB, "EFFICIENT_ATTENTION", torch.float16, 32),
    ("V100 16GB", (7, 0), 16.9 * GB, "EFFICIENT_ATTENTION", torch.float16, 32),
    ("V100 32GB", (7, 0), 34.1 * GB, "EFFICIENT_ATTENTION", torch.float16, 64),
    ("RTX 3060 12GB", (8, 6), 12.5 * GB, "FLASH_ATTENTION", torch.bfloat16, 32),
    ("RTX 4060 8GB", (8, 9), 8.2 * GB, "FLASH_ATTENTION", torch.bfloat16, 16),
    ("A100 40GB", (8, 0), 42.4 * GB, "FLASH_ATTENTION", torch.bfloat16, 64),
    ("H100 80GB", (9, 0), 85.0 * GB, "FLASH_ATTENTION", torch.bfloat16, 64),
    ("a 2 GB card", (8, 6), 2.0 * GB, "FLASH_ATTENTION", torch.bfloat16, 1),
])
def test_gpu_check_adapts_to_the_card(card, capability, memory, kernel, dtype, micro):
    """Flash attention needs compute capability 8.0: T4/V100 check the memory-efficient kernel in fp16
    (and `auto` trains in fp16 there, so no separate fp16 run); the micro-batch fits the memory."""
    p = plan(capability, int(memory))
    assert (p.kernel, p.dtype, p.micro_batch) == (kernel, dtype, micro), p
    runs = ["eager", "compile", "compile+loss"]
    assert [r[0] for r in p.runs] == (runs + ["fp16"] if capability >= (8, 0) else runs)
    assert f"micro-batch {micro}" in p.why and f"{memory / GB:.1f} GB" in p.why
    assert plan(capability, int(memory), micro_batch=8).micro_batch == 8


def test_the_time_split_and_the_loss_kernel_check_run_on_any_device(tmp_path):
    """gpu-check's time split (data wait, forward, loss, backward, optimizer) and its fused-loss
    comparison are device-agnostic: here on the CPU with a micro model, eager and fully compiled."""
    from benchmarks.time_split import PARTS, compare_loss_kernels, time_split
    from llamaforge.config import load_config
    from llamaforge.train.compiling import inductor_problem

    stories_data(tmp_path, 200)
    cpu = torch.device("cpu")
    cfg = load_config("tiny", overrides=["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
                                         "model.num_attention_heads=2", "model.num_key_value_heads=1", "train.seq_len=64",
                                         "train.micro_batch=2", "train.precision=fp32"])
    modes = [(False, False)] + ([] if inductor_problem(cpu) else [(True, True)])
    for blocks, loss in modes:
        split = time_split(cfg, str(tmp_path / "d"), cpu, 6, blocks, loss)
        assert list(split.ms) == list(PARTS) and all(v >= 0 for v in split.ms.values()) and split.tokens_per_s > 0
        assert "data wait" in split.line("eager") and "tokens/s" in split.line("eager")
    if len(modes) > 1:
        c = compare_loss_kernels(cpu, torch.float32, rows=256, dim=32, vocab=500)
        assert max(c["loss_rel"], c["grad_h_rel"], c["grad_w_rel"]) < 1e-4 and c["grad_h_norm"] > 0 and c["grad_w_norm"] > 0


CARDS = [  # name, compute capability, memory, spec TFLOP/s in the dtype auto picks
    ("T4", (7, 5), 15.8 * GB, 65), ("V100", (7, 0), 34.1 * GB, 125), ("A10", (8, 6), 24.1 * GB, 125),
    ("L4", (8, 9), 23.8 * GB, 121), ("A100 40GB", (8, 0), 42.4 * GB, 312), ("A100 80GB", (8, 0), 85.1 * GB, 312),
    ("H100", (9, 0), 85.0 * GB, 989), ("H200", (9, 0), 150.0 * GB, 989)]


@pytest.mark.parametrize("card, capability, memory, tflops", CARDS)
def test_the_plan_and_its_duration_estimate_per_card(card, capability, memory, tflops):
    """The kernel the model's attention must get, the micro-batch and the estimate printed first: on
    an H100/H200 the whole check within 8 minutes and --quick within 4 (estimates from its figures)."""
    full, quick = plan(capability, int(memory), tflops=tflops), plan(capability, int(memory), quick=True, tflops=tflops)
    assert full.kernel == ("FLASH_ATTENTION" if capability >= (8, 0) else "EFFICIENT_ATTENTION")
    assert [r[0] for r in quick.runs] == ["eager", "compile"]
    long, short = estimate_seconds(full, 50, 1), estimate_seconds(quick, 20, 1, quick=True)
    assert short < long
    if card in ("H100", "H200"):
        assert long < 8 * 60 and short < 4 * 60, (long, short)
    assert estimate_seconds(full, 50, 2) > long  # the multi-GPU part adds its runs


def test_tolerances_that_a_head_that_does_not_learn_cannot_pass():
    import math

    learning = [10 - 3.5 * (1 - math.exp(-s / 15)) for s in range(50)]
    noisy = [x + 0.08 * (-1) ** s for s, x in enumerate(learning)]
    stuck_head = [x + min(1.0, s / 25) for s, x in enumerate(learning)]  # the blocks learn, the head lags
    assert agree(learning, noisy)[0]
    ok, figures = agree(learning, stuck_head)
    assert not ok and figures["last_mean_diff"] > 0.5
    assert not agree(learning, learning[:-1])[0]


def test_the_attention_check_runs_the_models_own_attention_causal_and_padded():
    """On the CPU through the math kernel (the same calls gpu-check restricts to the card's kernel)."""
    assert check_attention(plan((9, 0), int(80 * GB)), device="cpu") == []
