"""`python -m benchmarks muon_ddp` and `python -m benchmarks prefetch`: the two throughput changes of
issue #26 that a CPU can show, each against the code before it in the same run.

muon_ddp: 2 processes on gloo (1 thread each: this machine's 2 cores), the `train_step` benchmark
model's 56 block matrices with the same gradients on both ranks, one Muon step timed on each rank:
Newton-Schulz shared out over the ranks + one all-gather (`Muon(split=True)`, the DDP default now)
against every rank orthogonalizing every matrix (`split=False`, before). Per-rank median seconds.

prefetch: the `tiny` preset's training step on the prepared sample corpus, fed by the read-ahead
loader (`data.loader.Prefetched`, the default now) against the same loader read synchronously
(before), on the local disk and with every read slowed by a sleep of about half a step (a stand-in
for a network filesystem: labelled simulated).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _muon_rank(rank: int, world: int, port: int, shapes, reps: int, out: str) -> None:
    import torch.distributed as dist

    from llamaforge.train.optim import Muon, ns_dtype_for

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)
    dtype = ns_dtype_for(torch.device("cpu"))
    opts = {}
    for split in (False, True):
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opts[split] = Muon(params, ns_dtype=dtype, split=split, lr=0.02, momentum=0.95, adjust_lr_fn="original")
    times = {False: [], True: []}
    for i in range(reps + 1):
        for split, opt in opts.items():
            dist.barrier()
            t = time.perf_counter()
            opt.step()
            if i:  # the first round warms up
                times[split].append(time.perf_counter() - t)
    torch.save({k: statistics.median(v) for k, v in times.items()}, f"{out}.{rank}")
    dist.destroy_process_group()


def muon_ddp(args, report, bench_model: dict) -> dict:
    import socket

    h, f, layers = bench_model["hidden_size"], bench_model["intermediate_size"], bench_model["num_hidden_layers"]
    shapes = [(h, h)] * 4 * layers + [(f, h), (f, h), (h, f)] * layers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as work:
        out = str(Path(work) / "t")
        torch.multiprocessing.spawn(_muon_rank, args=(2, port, shapes, max(3, args.reps), out), nprocs=2)
        ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for r, t in enumerate(ranks):
        print(f"  rank {r}: every matrix {t[False]:.3f} s, its share + all-gather {t[True]:.3f} s")
    slowest = {k: max(t[k] for t in ranks) for k in (False, True)}  # a step waits for the slowest rank
    return report("muon_ddp", 1 / slowest[True], 1 / slowest[False], "every rank orthogonalizes every matrix",
                  "Muon steps/s (slowest of 2 gloo ranks)",
                  {"matrices": len(shapes), "per_rank_s_split": [round(t[True], 4) for t in ranks],
                   "per_rank_s_all": [round(t[False], 4) for t in ranks]})


class _Synchronous:
    """The loader as the loop read it before: in the step, on the main thread."""

    def __init__(self, inner):
        self.inner = inner

    def next_batch(self):
        return self.inner.next_batch()

    def close(self):
        pass


class _Slow:
    """Every read takes `delay` seconds longer (a stand-in for a network filesystem)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay
        self.bytes_per_token = inner.bytes_per_token

    def next_batch(self):
        time.sleep(self.delay)
        return self.inner.next_batch()

    def state_dict(self):
        return self.inner.state_dict()


def prefetch(args, interleaved, report) -> dict:
    from llamaforge.config import load_config, micro_batch_for
    from llamaforge.data.loader import Prefetched, PretrainBatches
    from llamaforge.model.io import build_model
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.precision import choose
    from llamaforge.train.step import split_micro, train_step

    from benchmarks.recipe import sample_data

    cfg = load_config("tiny")
    precision = choose(cfg.train.precision, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as work:
        data = sample_data(Path(work))
        model = build_model(cfg.model).train()
        opt = build_optimizer(model, lr=1e-3)

        def steps(loader, n: int = 4):
            def run():
                for _ in range(n):
                    batch = loader.next_batch()
                    train_step(model, opt, split_micro(batch, micro_batch_for(cfg.train)), precision=precision)
            return run

        plain = PretrainBatches(data, cfg.train)
        step_s = interleaved({"one": steps(_Synchronous(plain), 1)}, 1, 3)["one"]
        delay = step_s / 2
        loaders = {"sync": _Synchronous(PretrainBatches(data, cfg.train)),
                   "prefetch": Prefetched(PretrainBatches(data, cfg.train)),
                   "sync_slow": _Synchronous(_Slow(PretrainBatches(data, cfg.train), delay)),
                   "prefetch_slow": Prefetched(_Slow(PretrainBatches(data, cfg.train), delay))}
        t = interleaved({k: steps(v) for k, v in loaders.items()}, max(1, args.warmup), max(3, args.reps))
        for v in loaders.values():
            v.close()
    tokens = 4 * cfg.train.batch_tokens
    print(f"  local disk: synchronous {tokens / t['sync']:,.0f} tokens/s, read-ahead {tokens / t['prefetch']:,.0f} "
          f"({t['sync'] / t['prefetch']:.3f}x)")
    print(f"  reads slowed by {delay * 1e3:.0f} ms (simulated; a step is {step_s * 1e3:.0f} ms): synchronous "
          f"{tokens / t['sync_slow']:,.0f}, read-ahead {tokens / t['prefetch_slow']:,.0f} tokens/s "
          f"({t['sync_slow'] / t['prefetch_slow']:.3f}x)")
    return report("prefetch", tokens / t["prefetch_slow"], tokens / t["sync_slow"],
                  "synchronous reads (before), reads slowed by half a step (simulated)", "tokens/s",
                  {"local_disk_ratio": round(t["sync"] / t["prefetch"], 3), "simulated_read_delay_s": round(delay, 4),
                   "step_s": round(step_s, 4), "precision": precision.name})


def _compile_child(preset: str, precision: str, mode: str, steps: int, q) -> None:
    """One fresh process per mode (a fresh dynamo), timing the first (compiling) step and the rest."""
    from llamaforge.config import load_config, micro_batch_for
    from llamaforge.model.io import build_model
    from llamaforge.train.distributed import compile_blocks
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.precision import choose
    from llamaforge.train.step import train_step

    cfg = load_config(preset)
    t = cfg.train
    prec = choose(precision, torch.device("cpu"))
    micro = micro_batch_for(t)
    x = torch.randint(0, cfg.model.vocab_size, (t.batch_tokens // t.seq_len, t.seq_len + 1),
                      generator=torch.Generator().manual_seed(0))
    batch = [(x[i : i + micro, :-1], x[i : i + micro, 1:]) for i in range(0, len(x), micro)]
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    if mode in ("blocks", "both"):
        compile_blocks(model)
    model.compiled_loss = mode in ("loss", "both")
    opt = build_optimizer(model, t.lr, device=torch.device("cpu"), kind=t.optimizer, muon_lr=t.muon_lr)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        train_step(model, opt, batch, precision=prec)
        times.append(time.perf_counter() - start)
    q.put((times[0], statistics.median(times[1:]), prec.name))


def compile_cost(args, report) -> dict:
    """`train.compile` / `train.compile_loss` on the `tiny` preset's step, each mode in a fresh
    process with an empty inductor cache (the first step is what a fresh machine pays)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for precision in ("auto", "fp32"):
        for mode in ("eager", "blocks", "loss", "both"):
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
                q = ctx.Queue()
                p = ctx.Process(target=_compile_child, args=("tiny", precision, mode, max(3, args.reps), q))
                p.start()
                first, step, name = q.get()
                p.join()
            out[(name, mode)] = (first, step)
            print(f"  {name} {mode:6s}: first step {first:5.1f} s, then {step:.3f} s a step", flush=True)
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    names = sorted({n for n, _ in out})
    for n in names:
        eager, both = out[(n, "eager")], out[(n, "both")]
        gain = eager[1] - both[1]
        steps = (both[0] - eager[0]) / gain if gain > 0 else float("inf")
        print(f"  {n}: compiled (blocks + loss) repays its warm-up after {steps:,.0f} steps")
    main = names[0]
    return report("compile_cost", 1 / out[(main, "both")][1], 1 / out[(main, "eager")][1], "eager (train.compile false)",
                  "tiny steps/s", {f"{n}_{m}": [round(v, 3) for v in fs] for (n, m), fs in out.items()})


def _scored_tokens(tokenizer, tasks: list[str], limit: int, context: int) -> int:
    """Tokens lm-eval runs through the model for `limit` items of each task (one forward per choice,
    context + choice, cut to the model's context)."""
    from llamaforge.eval.tasks import BENCHES, build_rows

    total = 0
    for name in tasks:
        for r in build_rows(BENCHES[name])[:limit]:
            pairs = ([(c, r["continuation"]) for c in r["contexts"]] if "contexts" in r else
                     [(r["query"], ch) for ch in r["choices"]])
            total += sum(min(context, len(tokenizer(f"{a} {b}").input_ids)) for a, b in pairs)
    return total


def bench_cost(args, report) -> dict:
    """What `train.eval_tasks` costs against training. Measured on this CPU at the `tiny` preset:
    one scoring of the capability tasks (`--bench-limit` items each, scaled linearly to the preset's
    eval_tasks_limit) against the preset's training between two scorings (timed steps). For the
    other presets (too slow to time on a CPU) an estimate: the scoring's forward FLOPs over the
    training FLOPs between scorings, times the overhead measured at `tiny` (how much slower per FLOP
    lm-eval's scoring ran than training did)."""
    from llamaforge.config import load_config
    from llamaforge.eval.tasks import CAPABILITY, expand
    from llamaforge.model.io import build_model
    from llamaforge.tokenizer import load_tokenizer
    from llamaforge.train.bench import score_tasks
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.precision import choose
    from llamaforge.train.step import train_step

    tok = load_tokenizer("mistral")
    cfg = load_config("tiny")
    t = cfg.train
    prec = choose(t.precision, torch.device("cpu"))
    model = build_model(cfg.model).train()
    opt = build_optimizer(model, t.lr, device=torch.device("cpu"), kind=t.optimizer, muon_lr=t.muon_lr)
    x = torch.randint(0, cfg.model.vocab_size, (t.batch_tokens // t.seq_len, t.seq_len + 1),
                      generator=torch.Generator().manual_seed(0))
    batch = [(x[:, :-1], x[:, 1:])]
    train_step(model, opt, batch, precision=prec)  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        train_step(model, opt, batch, precision=prec)
    step_s = (time.perf_counter() - start) / 3
    tasks = expand([CAPABILITY])
    start = time.perf_counter()
    score_tasks(model, tok, tasks, args.bench_limit, prec.autocast, 4)
    scoring = (time.perf_counter() - start) * 100 / args.bench_limit
    scored = _scored_tokens(tok, tasks, 100, cfg.model.max_position_embeddings)
    # per FLOP: scoring runs 2 x params x tokens, training 6 x params x tokens
    overhead = scoring / (scored / 3 / (t.batch_tokens / step_s))
    frac_tiny = scoring / (scoring + t.eval_every * step_s)
    print(f"  tiny (measured): one scoring of {len(tasks)} tasks x 100 items {scoring:,.0f} s ({scored:,} tokens "
          f"scored), {t.eval_every} steps between scorings {t.eval_every * step_s:,.0f} s: {frac_tiny:.1%} of the time; "
          f"scoring ran {overhead:.1f}x slower per FLOP than training")
    rows = {"tiny_measured": {"scoring_s": round(scoring, 1), "step_s": round(step_s, 3), "fraction": round(frac_tiny, 4),
                              "scored_tokens": scored, "overhead_per_flop": round(overhead, 2)}}
    for preset in args.bench_presets:
        c = load_config(preset).train
        every = c.eval_tasks_every or c.eval_every
        limit = c.eval_tasks_limit or 100
        tokens = _scored_tokens(tok, expand([c.eval_tasks or CAPABILITY]), limit, load_config(preset).model.max_position_embeddings)
        frac = tokens / 3 * overhead / (every * c.batch_tokens)
        rows[preset] = {"scored_tokens": tokens, "every": every, "limit": limit, "fraction_estimate": round(frac, 5)}
        print(f"  {preset} (estimate): {tokens:,} tokens scored every {every} steps of {c.batch_tokens:,} tokens: "
              f"~{frac:.2%} of the training time at the overhead measured at tiny")
    return report("bench_cost", 1 - frac_tiny, 1.0, "training without in-loop scoring (tiny, 100 items every 100 steps)",
                  "share of time training", rows)
