"""llamaforge benchmarks: each one measures ours and a named baseline in the same run, interleaved,
and prints both and the ratio (these machines are noisy: only same-run ratios are comparable).

    python -m benchmarks                 # all
    python -m benchmarks train_step      # one
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from llamaforge.train.metrics import device_name, matmul_peak_flops, train_flops_per_token

REGISTRY = {}


def benchmark(fn):
    REGISTRY[fn.__name__] = fn
    return fn


def interleaved(fns: dict, warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls alternated so background noise hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def report(name: str, ours: float, base: float, base_name: str, unit: str, extra: dict | None = None) -> dict:
    """Print and return one result; ours and base are rates (higher is better)."""
    row = {"benchmark": name, "ours": round(ours, 2), "baseline": base_name, "baseline_value": round(base, 2),
           "unit": unit, "ratio": round(ours / base, 3), "threads": torch.get_num_threads(),
           "machine": device_name(torch.device("cpu")), "torch": torch.__version__}
    row.update(extra or {})
    print(f"{name}: ours {ours:,.1f} {unit} | {base_name} {base:,.1f} {unit} | ratio {ours / base:.3f}x")
    return row


BENCH_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False)


@benchmark
def train_step(args) -> dict:
    """Forward + backward + AdamW step, batch 8 x 256 on the CPU, in the precision `auto` picks here:
    llamaforge eager, with the blocks compiled, and as `train.compile: auto` sets a long run up here
    (the reported figure), against transformers' LlamaForCausalLM eager in the same precision and with
    torch.compile (the fastest peer, the baseline), and fp32 eager transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaforge.config import ModelConfig
    from llamaforge.model.io import build_model
    from llamaforge.train.compiling import choose as choose_compile
    from llamaforge.train.distributed import compile_blocks
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.precision import choose
    from llamaforge.train.step import train_step as our_train_step

    B, T = 8, 256
    cpu = torch.device("cpu")
    prec = choose("auto", cpu)
    torch.manual_seed(0)
    x = torch.randint(0, 32000, (B, T + 1))
    inputs, targets = x[:, :-1], x[:, 1:]

    def ours(compiled: bool, compiled_loss: bool = False):
        model = build_model(ModelConfig(**BENCH_MODEL)).train()
        if compiled:
            compile_blocks(model)
        model.compiled_loss = compiled_loss
        opt = build_optimizer(model, lr=1e-4)
        return lambda: our_train_step(model, opt, [(inputs, targets)], precision=prec)

    def transformers_step(compiled: bool, autocast: bool):
        model = LlamaForCausalLM(LlamaConfig(**BENCH_MODEL, attn_implementation="sdpa")).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        run = torch.compile(model) if compiled else model

        def step():
            with prec.autocast() if autocast else contextlib.nullcontext():
                loss = run(input_ids=inputs, labels=x[:, :-1]).loss  # transformers shifts labels itself
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    auto = choose_compile("auto", "auto", cpu, 1000, BENCH_MODEL["hidden_size"], prec.name)  # a long run's default
    fns = {"ours_eager": ours(False), "ours_compiled": ours(True), "ours_default": ours(auto.blocks, auto.loss),
           "transformers_fp32": transformers_step(False, False),
           "transformers": transformers_step(False, True), "transformers_compiled": transformers_step(True, True)}
    t = interleaved(fns, max(args.warmup, 3), args.reps)  # compile warm-up happens in the first calls
    peak = matmul_peak_flops(cpu, prec.dtype) / 1e9  # GFLOP/s of a 2048^3 matmul in the precision used
    tokens = B * T
    flops = train_flops_per_token(build_model(ModelConfig(**BENCH_MODEL)).config, T) * tokens
    rate = {k: tokens / v for k, v in t.items()}
    frac = {f"{k}_frac_of_peak": round(flops / v / 1e9 / peak, 3) for k, v in t.items()}
    for k, v in rate.items():
        print(f"  {k:24s} {v:9,.0f} tokens/s  {frac[k + '_frac_of_peak']:.1%} of the {prec.name} matmul peak ({peak:,.0f} GFLOP/s)")
    print(f"  precision: {prec.label()} ({prec.reason})")
    print(f"  ours_default = train.compile auto for a 1,000-step run here: {auto.label()} ({auto.reason})")
    print(f"  ours eager vs transformers fp32 eager: {rate['ours_eager'] / rate['transformers_fp32']:.3f}x; "
          f"ours compiled vs transformers compiled: {rate['ours_compiled'] / rate['transformers_compiled']:.3f}x")
    return report(
        "train_step", rate["ours_default"], rate["transformers_compiled"],
        f"transformers LlamaForCausalLM, {prec.name} + torch.compile + torch AdamW", "tokens/s",
        {"precision": prec.name, "matmul_peak_gflops": round(peak, 1), **{f"{k}_tokens_s": round(v, 1) for k, v in rate.items()},
         **frac, "default_compile": auto.label(),
         "ours_compiled_vs_peer": round(rate["ours_compiled"] / rate["transformers_compiled"], 3),
         "ours_eager_vs_peer": round(rate["ours_eager"] / rate["transformers_compiled"], 3),
         "ours_eager_vs_transformers_fp32": round(rate["ours_eager"] / rate["transformers_fp32"], 3)},
    )


@benchmark
def decode(args) -> dict:
    """Greedy decode tokens/s, batch 4 x 64-token prompts, 128 new tokens, KV cache, fp32 CPU: our model
    vs transformers' LlamaForCausalLM loaded from the stock Llama export of the same weights."""
    import tempfile

    from transformers import LlamaForCausalLM

    from llamaforge.config import ModelConfig
    from llamaforge.model.convert import to_llama
    from llamaforge.model.io import build_model, save_model

    ours = build_model(ModelConfig(**BENCH_MODEL)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(to_llama(ours), None, tmp)
        ref = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    prompt = torch.randint(3, 32000, (4, 64), generator=torch.Generator().manual_seed(0))
    new = 128
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    outs = {}

    def run(name, model):
        def f():
            with torch.no_grad():
                outs[name] = model.generate(prompt, **kw)
        return f

    t = interleaved({"ours": run("ours", ours), "ref": run("ref", ref)}, warmup=1, reps=max(2, args.reps // 2))
    same = bool(torch.equal(outs["ours"], outs["ref"]))
    tokens = prompt.shape[0] * new
    return report("decode", tokens / t["ours"], tokens / t["ref"], "transformers LlamaForCausalLM.generate (stock export)",
                  "new tokens/s", {"identical_greedy_output": same})


def _child_run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB, largest single process among the command and its workers)."""
    import resource
    import subprocess

    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


@benchmark
def prepare(args) -> dict:
    """`llamaforge prepare` vs datasets.Dataset.map(batched=True) with the same tokenizer, on the sample
    corpus (2 processes each); then peak RSS of prepare on a corpus 10x the sample corpus."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import datasets

    from llamaforge.data.sources import sample_corpus
    from llamaforge.tokenizer import load_tokenizer

    src = sample_corpus()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    tok = load_tokenizer("mistral")
    n_tokens = 0
    try:
        def ours():
            nonlocal n_tokens
            from llamaforge.data.prepare import prepare as run

            shutil.rmtree(work / "ours", ignore_errors=True)
            meta = run(str(src), work / "ours", workers=2, progress=False)
            n_tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]

        def baseline():
            datasets.disable_caching()
            ds = datasets.Dataset.from_json(str(src), cache_dir=str(work / "hf-cache"))
            ds.map(lambda b: {"ids": tok(b["text"])["input_ids"]}, batched=True, num_proc=2,
                   remove_columns=ds.column_names)
            shutil.rmtree(work / "hf-cache", ignore_errors=True)

        datasets.utils.logging.disable_progress_bar()
        t = interleaved({"ours": ours, "baseline": baseline}, warmup=0, reps=max(1, args.reps // 2))
        big = work / "big.jsonl"
        with open(big, "wb") as f:
            for _ in range(10):
                f.write(src.read_bytes())
        wall, rss = _child_run([sys.executable, "-m", "llamaforge", "prepare", "--source", str(big), "--out",
                                str(work / "big"), "--workers", "2"])
        big_tokens = json.loads((work / "big" / "meta.json").read_text())["splits"]
        big_tokens = big_tokens["train"]["tokens"] + big_tokens["val"]["tokens"]
        return report("prepare", n_tokens / t["ours"], n_tokens / t["baseline"],
                      "datasets.Dataset.from_json + map(batched=True, num_proc=2)", "tokens/s",
                      {"corpus_10x_tokens": big_tokens, "corpus_10x_wall_s": round(wall, 1),
                       "corpus_10x_tokens_per_s_end_to_end": round(big_tokens / wall),
                       "corpus_10x_peak_rss_gb": round(rss, 2), "cpus": os.cpu_count()})
    finally:
        shutil.rmtree(work, ignore_errors=True)


@benchmark
def muon_step(args) -> dict:
    """A Muon step's cost against an AdamW step, per CPU class (benchmarks/optimizer.py)."""
    from benchmarks import optimizer

    return optimizer.run(args, interleaved, report, BENCH_MODEL)


@benchmark
def muon_ns(args) -> dict:
    """Muon's Newton-Schulz over llama-150m's 112 block matrices, same-shape matrices stacked against one
    at a time, on CUDA if present else this CPU (benchmarks/optimizer.py; the default follows the device)."""
    from benchmarks import optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = optimizer.newton_schulz_batching(device, max(3, args.reps), interleaved)
    print(f"  {r['matrices']} matrices in {r['ns_dtype']} on {r['device']}: one at a time {r['one_at_a_time_ms']} ms, "
          f"batched {r['batched_ms']} ms; updates differ by {r['update_rel_diff']:.1e} (relative)")
    return report("muon_ns", 1e3 / r["batched_ms"], 1e3 / r["one_at_a_time_ms"], "Newton-Schulz one matrix at a time",
                  "steps/s", r)


@benchmark
def muon_ddp(args) -> dict:
    """Muon's Newton-Schulz shared over 2 gloo ranks against every rank doing all (benchmarks/throughput.py)."""
    from benchmarks import throughput

    return throughput.muon_ddp(args, report, BENCH_MODEL)


@benchmark
def prefetch(args) -> dict:
    """The read-ahead loader against synchronous reads, local and slowed (benchmarks/throughput.py)."""
    from benchmarks import throughput

    return throughput.prefetch(args, interleaved, report)


@benchmark
def compile_cost(args) -> dict:
    """train.compile / train.compile_loss on the tiny preset, cold cache, first step and after (benchmarks/throughput.py)."""
    from benchmarks import throughput

    return throughput.compile_cost(args, report)


@benchmark
def bench_cost(args) -> dict:
    """train.eval_tasks' share of a run's time per preset (benchmarks/throughput.py)."""
    from benchmarks import throughput

    return throughput.bench_cost(args, report)


@benchmark
def recipe(args) -> dict:
    """Optimizer x schedule at a fixed token budget on the `tiny` preset (benchmarks/recipe.py)."""
    from benchmarks import recipe as bench_recipe

    return bench_recipe.run(args)


@benchmark
def check_time(args) -> dict:
    """`llamaforge check` on examples/my_llama, every check, wall time (benchmarks/own_model.py)."""
    from benchmarks import own_model

    return own_model.check_time(args, report)


@benchmark
def own_model_step(args) -> dict:
    """A training step of the example model against our own model of the same shape (benchmarks/own_model.py)."""
    from benchmarks import own_model

    return own_model.train_step(args, interleaved, report, BENCH_MODEL)


@benchmark
def stop_time(args) -> dict:
    """SIGTERM to a saved checkpoint, in a step, while compiling, in validation and in scoring (benchmarks/stop_time.py)."""
    from benchmarks import stop_time as bench_stop

    return bench_stop.run(args, report)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"default: all of {', '.join(REGISTRY)}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", help="also append results as JSON lines to this file")
    p.add_argument("--recipe-steps", type=int, default=150, help="recipe: steps of 4,096 tokens per run")
    p.add_argument("--recipes", nargs="*", default=[], help="recipe: which recipes (default all; the baseline always)")
    p.add_argument("--recipe-overrides", nargs="*", default=[], help="recipe: key=value for every run")
    p.add_argument("--data", help="recipe: a prepared data folder (default: prepare the sample corpus)")
    p.add_argument("--work", help="recipe: where the runs go (default: a temporary folder)")
    p.add_argument("--bench-presets", nargs="*", default=["llama-150m"], help="bench_cost: presets to estimate")
    p.add_argument("--bench-limit", type=int, default=10, help="bench_cost: items per task actually scored")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    for name in args.names or REGISTRY:
        row = REGISTRY[name](args)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
