"""`python -m benchmarks muon_step`: what a Muon step costs against an AdamW step.

The `train_step` benchmark's model (hidden 512, 8 layers, SwiGLU 1376, vocab 32000) and batch
(8 x 256 tokens), forward + backward + optimizer, in the precision `auto` picks on this CPU, with:
AdamW (the baseline), llamaforge's Muon (Newton-Schulz in the dtype this hardware is fast in), and
torch.optim.Muon as it ships (Newton-Schulz always in bf16: what llamaforge ran before). The target
is a Muon step <= 1.3x an AdamW step on every CPU class. This machine is one class; the others are
named and skipped. The fp32 path (what an AVX2-only CPU runs: fp32 training, fp32 Newton-Schulz) is
also timed here, labelled as a proxy, since its ratio depends on fp32 speed, not on the bf16 units.
Newton-Schulz costs the same per step whatever the batch, so the ratio is also timed with 4
micro-batches a step (8,192 tokens): what gradient accumulation or a larger batch does to it.
"""

from __future__ import annotations

import torch


def cpu_class(flags: set[str]) -> str:
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else "AVX2-only"


def run(args, interleaved, report, bench_model: dict) -> dict:
    from llamaforge.config import ModelConfig
    from llamaforge.model.io import build_model
    from llamaforge.train.optim import MuonWithAdamW, build_optimizer
    from llamaforge.train.precision import choose, cpu_flags, decide
    from llamaforge.train.step import train_step

    cpu = torch.device("cpu")
    auto = choose("auto", cpu)
    fp32 = decide("fp32", "cpu", set(), None)
    x = torch.randint(0, 32000, (8, 257), generator=torch.Generator().manual_seed(0))
    batch = [(x[:, :-1], x[:, 1:])]

    def step(kind: str, precision, ns: str = "auto", torch_muon: bool = False, micro: int = 1):
        model = build_model(ModelConfig(**bench_model)).train()
        opt = build_optimizer(model, lr=1e-3, kind=kind, muon_ns_dtype=ns)
        if torch_muon:  # the same parameters and settings in torch's own class (bf16 Newton-Schulz)
            m = opt.muon
            opt = MuonWithAdamW(torch.optim.Muon(m.param_groups[0]["params"], lr=0.02, weight_decay=0.0,
                                                 momentum=0.95, adjust_lr_fn="original"), opt.adamw)
        return lambda: train_step(model, opt, batch * micro, precision=precision)

    fns = {"adamw": step("adamw", auto), "muon": step("muon", auto), "torch_muon": step("muon", auto, torch_muon=True),
           "adamw_fp32": step("adamw", fp32), "muon_fp32": step("muon", fp32, ns="fp32"),
           "adamw_x4": step("adamw", auto, micro=4), "muon_x4": step("muon", auto, micro=4)}
    t = interleaved(fns, max(1, args.warmup), max(3, args.reps))
    here = cpu_class(cpu_flags())
    cost = {k: v / t["adamw"] for k, v in t.items()}
    proxy = t["muon_fp32"] / t["adamw_fp32"]
    print(f"  this CPU: {here}; precision {auto.label()}")
    for k in ("adamw", "muon", "torch_muon"):
        print(f"  {k:12s} {t[k]:6.2f} s/step  {cost[k]:.2f}x an AdamW step")
    print(f"  4 micro-batches a step (8,192 tokens): AdamW {t['adamw_x4']:.2f} s, Muon {t['muon_x4']:.2f} s = "
          f"{t['muon_x4'] / t['adamw_x4']:.2f}x")
    print(f"  fp32 path (AVX2-only CPUs; proxy timed here): AdamW {t['adamw_fp32']:.2f} s, Muon {t['muon_fp32']:.2f} s "
          f"= {proxy:.2f}x")
    for other in ("AMX", "AVX512-BF16", "AVX2-only"):
        if other != here:
            print(f"  {other}: skipped (not this CPU); run `python -m benchmarks muon_step` there")
    tokens = 8 * 256
    return report("muon_step", tokens / t["muon"], tokens / t["adamw"], "AdamW step, same model and batch", "tokens/s",
                  {"cpu_class": here, "precision": auto.name, "muon_step_cost_vs_adamw": round(cost["muon"], 3),
                   "torch_muon_step_cost_vs_adamw": round(cost["torch_muon"], 3),
                   "fp32_path_muon_cost_vs_adamw_proxy": round(proxy, 3),
                   "muon_cost_vs_adamw_8192_tokens": round(t["muon_x4"] / t["adamw_x4"], 3),
                   **{f"{k}_s_per_step": round(v, 3) for k, v in t.items()}})


def llama_150m_matrices() -> list[tuple[int, int]]:
    """The shapes Muon trains in llama-150m, from its preset: per block q, k, v, o, gate, up, down
    (16 blocks of 768 / 2048: 112 matrices, 3 stacks under the 64M-element bound)."""
    from llamaforge.config import load_config

    m = load_config("llama-150m").model
    h, f, kv = m.hidden_size, m.intermediate_size, m.num_key_value_heads * (m.hidden_size // m.num_attention_heads)
    return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)] * m.num_hidden_layers


def newton_schulz_batching(device: torch.device, reps: int, interleaved) -> dict:
    """One Muon step over llama-150m's 112 block matrices on `device`: Newton-Schulz one matrix at a
    time against same-shape matrices stacked (`Muon(batched=True)`). The first step's updates must
    agree: `update_rel_diff` = |update batched - update one at a time| / |update one at a time|
    (Frobenius, over all matrices; bf16 rounding gave 2.7e-3 on a CPU, a wrong matrix ~0.1-1)."""
    from llamaforge.train.optim import Muon, ns_dtype_for

    gen = torch.Generator(device=device)
    dtype = ns_dtype_for(device)
    opts, start = {}, []
    for batched in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen.manual_seed(i)) * 0.02)
                  for i, s in enumerate(llama_150m_matrices())]
        start = [p.detach().clone() for p in params]  # the same seeds: both copies start from these values
        opts[batched] = Muon(params, ns_dtype=dtype, batched=batched, lr=0.02, momentum=0.95,
                             adjust_lr_fn="original")
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, device=device, generator=gen.manual_seed(1000 + i))

    def step(batched: bool):
        def run():
            opts[batched].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    deltas = {}
    for b in (False, True):
        step(b)()
        deltas[b] = [p.detach() - s for p, s in zip(opts[b].param_groups[0]["params"], start)]
    diff = sum(float((x - y).float().norm()) ** 2 for x, y in zip(deltas[True], deltas[False])) ** 0.5
    rel = diff / sum(float(x.float().norm()) ** 2 for x in deltas[False]) ** 0.5
    t = interleaved({"one_at_a_time": step(False), "batched": step(True)}, 1, reps)
    return {"device": str(device), "ns_dtype": str(dtype).removeprefix("torch."), "matrices": len(llama_150m_matrices()),
            "one_at_a_time_ms": round(t["one_at_a_time"] * 1e3, 2), "batched_ms": round(t["batched"] * 1e3, 2),
            "batched_speedup": round(t["one_at_a_time"] / t["batched"], 3), "update_rel_diff": rel}
