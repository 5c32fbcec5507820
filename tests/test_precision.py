"""Precision from the hardware: the choice itself, and bf16 autocast on the CPU (the same code a GPU
runs): it tracks fp32, the fused head+loss matches the materialized loss under autocast, and
`auto` is what the run records. bf16 is slow on CPUs without AVX512-BF16/AMX, so these use micro models."""

import pytest
import torch

from llamaforge.errors import UserError
from llamaforge.train.optim import build_optimizer
from llamaforge.train.precision import Precision, decide
from llamaforge.train.step import train_step


@pytest.mark.parametrize("device,flags,cc,want", [
    ("cpu", {"avx2", "amx_bf16", "amx_tile"}, None, "bf16"),
    ("cpu", {"avx512f", "avx512_bf16"}, None, "bf16"),
    ("cpu", {"avx2", "fma"}, None, "fp32"),  # AMD EPYC / AVX2 only: bf16 ~100x slower
    ("cuda", set(), (9, 0), "bf16"),  # H100
    ("cuda", set(), (8, 0), "bf16"),  # A100
    ("cuda", set(), (7, 5), "fp16"),  # T4: is_bf16_supported() says yes through emulation; we do not
    ("cuda", set(), (7, 0), "fp16"),  # V100
])
def test_auto_picks_from_the_hardware(device, flags, cc, want):
    p = decide("auto", device, flags, cc)
    assert p.name == want and p.reason.startswith("auto:")
    assert p.needs_scaler == (want == "fp16")


def test_explicit_choices_and_refusals():
    assert decide("fp32", "cpu", {"amx_bf16"}, None).name == "fp32"
    assert "slow" in decide("bf16", "cpu", {"avx2"}, None).reason
    assert "emulated" in decide("bf16", "cuda", set(), (7, 5)).reason
    with pytest.raises(UserError, match="fp16 is for CUDA"):
        decide("fp16", "cpu", set(), None)
    with pytest.raises(UserError, match="not one of"):
        decide("fp8", "cpu", set(), None)


def test_bf16_training_tracks_fp32(small_model):
    ids = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(0))
    micro = [(ids[:, :-1], ids[:, 1:])]
    curves = {}
    for name in ("fp32", "bf16"):
        m = small_model().train()
        opt = build_optimizer(m, lr=3e-3)
        p = Precision(name, "cpu", "test")
        curves[name] = [train_step(m, opt, micro, precision=p).loss for _ in range(8)]
        assert all(q.dtype == torch.float32 for q in m.parameters())  # fp32 master weights
    assert curves["bf16"][-1] < curves["bf16"][0] - 0.5  # it learns
    assert max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"])) < 0.05


def test_fused_head_loss_under_autocast_matches_the_materialized_loss(small_model, ids):
    m = small_model(vocab_size=512).train()
    targets = ids.roll(-1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = m(ids, shift_labels=targets).loss
        m.eval()
        logits = m(ids).logits
    plain = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, atol=2e-2, rtol=1e-2)


def test_rope_keeps_the_activation_dtype_under_autocast(small_model, ids):
    """q, k leave RoPE in bf16 (cos/sin are fp32): attention then runs in the autocast dtype."""
    from llamaforge.model.hf.modeling_llamaforge import apply_rope, rope_cos_sin

    x = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.arange(5)[None], 8, 10000.0, 1.0, torch.float32)
    assert apply_rope(x, cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989), ("NVIDIA H100 PCIe", torch.bfloat16, 756),
    ("NVIDIA H100 NVL", torch.bfloat16, 835), ("NVIDIA H200", torch.bfloat16, 989),
    ("NVIDIA A100-SXM4-40GB", torch.bfloat16, 312), ("NVIDIA L4", torch.bfloat16, 121),
    ("NVIDIA L40", torch.bfloat16, 181), ("NVIDIA L40S", torch.bfloat16, 362), ("NVIDIA A10", torch.bfloat16, 125),
    ("NVIDIA A10G", torch.bfloat16, None), ("Tesla T4", torch.float16, 65), ("Tesla T4", torch.bfloat16, None),
    ("Tesla V100-SXM2-16GB", torch.float16, 125), ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165),
    ("NVIDIA GeForce RTX 4090 D", torch.bfloat16, None), ("NVIDIA B200", torch.bfloat16, None),
])
def test_mfu_peaks_match_the_exact_gpu_name(name, dtype, tflops):
    """A name fragment matched by substring gave an L40 the L4's peak, an H100 NVL the PCIe figure and an
    A10G the A10's; names match exactly now, and an unknown card falls back to a timed matmul."""
    from llamaforge.train.metrics import spec_peak_flops

    got = spec_peak_flops(name, dtype)
    assert (None if got is None else got / 1e12) == tflops


def test_compile_auto_compiles_where_it_pays_and_says_why(monkeypatch):
    """train.compile auto: eager for short runs and where inductor cannot build kernels, compiled
    otherwise; the fused loss's chunks with it on CPUs, never by auto on CUDA (not yet measured on a
    GPU); an explicit true that cannot work is one line naming the fix. YAML's true/false are accepted."""
    from llamaforge.config import load_config
    from llamaforge.errors import UserError
    from llamaforge.train import compiling

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(compiling, "_PROBED", {"cpu": "", "cuda": ""})
    short = compiling.choose("auto", "auto", cpu, compiling.MIN_STEPS - 1, 768, "bf16")
    assert (short.blocks, short.loss, short.label()) == (False, False, "eager") and "too few" in short.reason
    for hidden, precision, want in ((128, "bf16", (False, True)), (128, "fp32", (False, False)),
                                    (512, "fp32", (True, False)), (768, "bf16", (True, True))):
        got = compiling.choose("auto", "auto", cpu, 600, hidden, precision)
        assert (got.blocks, got.loss) == want, (hidden, precision, got)
    assert compiling.choose("auto", "auto", cpu, 600, 768, "bf16").label() == "compiled: blocks + fused loss"
    assert "no faster" in compiling.choose("auto", "auto", cpu, 600, 128, "fp32").reason
    gpu = compiling.choose("auto", "auto", cuda, 2000, 768, "bf16")
    assert (gpu.blocks, gpu.loss) == (True, False)
    assert compiling.choose("auto", "true", cuda, 2000).loss is True  # asked for: gpu-check's third run
    assert compiling.choose("false", "auto", cpu, 600, 128, "bf16").label() == "eager"
    assert compiling.choose("true", "false", cpu, 10).label() == "compiled: blocks"
    monkeypatch.setattr(compiling, "_PROBED", {"cpu": "CalledProcessError: g++ not found"})
    broken = compiling.choose("auto", "auto", cpu, 600, 768, "bf16")
    assert (broken.blocks, broken.loss) == (False, False) and "g++ not found" in broken.reason
    with pytest.raises(UserError, match="train.compile is true but torch.compile cannot build kernels here.*g\\+\\+"):
        compiling.choose("true", "auto", cpu, 600)
    assert load_config("llama-150m").train.compile == "true"  # the preset's YAML `true`
    assert load_config(overrides=["train.compile=false"]).train.compile == "false"
    with pytest.raises(UserError, match="train.compile 'sometimes' is not one of auto, true, false"):
        load_config(overrides=["train.compile=sometimes"])


def test_the_inductor_probe_reports_a_broken_compiler(monkeypatch):
    from llamaforge.train import compiling

    monkeypatch.setattr(compiling, "_PROBED", {})
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no C++ compiler\nmore")))
    assert compiling.inductor_problem(torch.device("cpu")) == "RuntimeError: no C++ compiler"


def test_a_scaler_skipped_fp16_update_is_reported_and_fsdp_gathers_in_the_autocast_dtype(small_model):
    """An overflowing fp16 step: GradScaler skips the update, train_step says so (the loop logs a
    `scaler_skip` event, the report counts them); FSDP2 gathers weights in fp16 under fp16 autocast."""
    from llamaforge.train.distributed import fsdp_param_dtype
    from llamaforge.train.precision import Precision
    from llamaforge.train.step import train_step

    model = small_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randint(0, 512, (2, 16))
    before = [p.detach().clone() for p in model.parameters()]
    first = next(model.parameters())
    handle = first.register_hook(lambda g: torch.full_like(g, float("inf")))  # an overflow in one gradient
    stats = train_step(model, opt, [(x, x)], scaler=scaler)
    handle.remove()
    assert stats.scaler_skipped and not stats.skipped and scaler.get_scale() == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update
    assert not train_step(model, opt, [(x, x)], scaler=scaler).scaler_skipped
    assert fsdp_param_dtype(Precision("fp16", "cuda", "")) == torch.float16
    assert fsdp_param_dtype(Precision("bf16", "cuda", "")) == torch.bfloat16
    assert fsdp_param_dtype(Precision("fp32", "cuda", "")) is None
