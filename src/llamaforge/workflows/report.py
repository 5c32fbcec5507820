"""`llamaforge report`: report.md + report.html with PNG plots, from a run's own records.

Reads RUN_DIR/metrics.jsonl, config.yaml, final/config.json (parameter counts), positions.json
(the long-context evidence, when the run is an extension) and any eval result JSON files. Several
runs (e.g. pretraining and its extension) can be given; their curves share the plots.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, require_extra
from ..fsutil import atomic_folder, atomic_write_bytes
from ..publish.card import read_records
from ..runs import (
    checkpoints,
    config_path,
    final_dir,
    hardware,
    metrics_path,
    positions_path,
    read_metrics,
    read_state,
    recipe,
    run_summary,
)
from .evaluate import read_results


def _pyplot():
    """matplotlib is the optional `report` extra: imported only here, never by training."""
    require_extra("matplotlib", "report")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], kind: str, key: str, x: str = "tokens_seen") -> tuple[list, list]:
    """(x, y) of `key` in records of `kind`; eval records take tokens_seen from the train record of their step."""
    seen = {r["step"]: r.get("tokens_seen", 0) for r in records if r["type"] == "train"}
    xs, ys = [], []
    for r in records:
        if r["type"] == kind and key in r:
            xs.append(r.get(x, seen.get(r["step"], 0)) if x == "tokens_seen" else r[x])
            ys.append(r[key])
    return xs, ys


def _offsets(runs: list[Path], recs: dict[str, list[dict]]) -> dict[str, int]:
    """Tokens to shift each run's x-axis by: a run that continues an earlier one (extend/sft `--model`
    pointing at it or its final/ or checkpoint) starts where that one ended."""
    ends, out = {}, {}
    for r in runs:
        found = checkpoints(r)
        state = read_state(found[-1]) if found else {}
        rec = state.get("records", {})
        source = (rec.get("extend") or rec.get("sft") or {}).get("from")
        shift = 0
        if source:
            src = Path(source).resolve()
            for prev, end in ends.items():
                if src == prev or prev in src.parents:
                    shift = end
        train = [x for x in recs[r.name] if x["type"] == "train"]
        out[r.name] = shift
        ends[r.resolve()] = shift + (train[-1]["tokens_seen"] if train else 0)
    return out


def _plot(path: Path, title: str, ylabel: str, curves: list[tuple[str, list, list, str]], xlabel: str = "tokens seen",
          logy: bool = False) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, xs, ys, style in curves:
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=4, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if any(c[1] for c in curves):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _bench_section(out: Path, recs: dict[str, list[dict]], shift: dict[str, int]) -> tuple[list, list[str]]:
    """The capability curve (train.eval_tasks' `bench` rows): score vs tokens with its 95% band, each
    task's centered accuracy thin behind it; and the last scoring's table."""
    rows = {name: [r for r in rs if r["type"] == "bench"] for name, rs in recs.items()}
    if not any(rows.values()):
        return [], []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    md = ["", "## Capability curve", "",
          "Accuracy centered on chance ((acc - chance) / (1 - chance); 0 = chance, 1 = perfect), the mean over "
          "the tasks scored during training, with its 95% interval (docs/commands.md, eval: the capability score).", ""]
    for name, rs in rows.items():
        if not rs:
            continue
        xs = [r["tokens_seen"] + shift[name] for r in rs]
        if "score" in rs[0]:
            ax.plot(xs, [r["score"] for r in rs], "o-", label=f"{name} capability score", linewidth=1.6)
            ax.fill_between(xs, [r["score_lo"] for r in rs], [r["score_hi"] for r in rs], alpha=0.2)
        tasks = sorted(k[: -len("_centered")] for k in rs[0] if k.endswith("_centered"))
        for task in tasks:
            ax.plot(xs, [r.get(f"{task}_centered") for r in rs], "-", linewidth=0.7, alpha=0.6,
                    label=task.replace("_offline", ""))
        last = rs[-1]
        table = [[t, f"{last[f'{t}_centered']:+.3f}", last[f"{t}_n"]] for t in tasks]
        if "score" in last:
            table.append(["**capability score**", f"{last['score']:+.3f} ({last['score_lo']:+.3f} to "
                                                  f"{last['score_hi']:+.3f})", sum(last[f"{t}_n"] for t in tasks)])
        md += [f"{name}, step {last['step']} ({last['tokens_seen']:,} tokens; task set: "
               f"{last.get('score_set', 'capability-v1 (9 tasks)')}):", "",
               _table(["task", "centered accuracy", "items"], table), ""]
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_title("Capability during training")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("accuracy centered on chance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "capability.png")
    plt.close(fig)
    return [("Capability", out / "capability.png")], md


def _positions_plot(path: Path, pos: dict) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for (label, ys), marker in zip(pos["loss"].items(), "osD"):
        ax.plot(pos["buckets"], ys, marker=marker, label=label)
    ax.axvline(x=pos["trained_len"] / pos["seq_len"] * len(pos["buckets"]) - 0.5, color="grey", linestyle=":",
               label=f"trained length {pos['trained_len']}")
    ax.set_title(f"Validation loss by position at {pos['seq_len']} context (PI factor {pos['factor']:g})")
    ax.set_xlabel("position bucket")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _param_counts(run: Path) -> dict | None:
    """Counted when the final model was saved (its llamaforge.json), not re-derived from shapes."""
    rec = read_records(final_dir(run)) if final_dir(run).exists() else None
    return rec.get("parameters") if rec else None


def make_report(runs: list[str | Path], evals: list[str | Path] = (), out: str | Path = "report") -> Path:
    require_extra("matplotlib", "report")
    require_extra("markdown", "report")
    runs = [Path(r) for r in runs]
    for r in runs:
        if not metrics_path(r).exists():
            raise UserError(f"{r} is not a run directory (no metrics.jsonl); pass the --out of train, extend or sft")
    results = [(Path(e), read_results(e)) for e in evals]
    final = Path(out)
    # written beside --out and swapped in whole: a failure late leaves the old report as it was
    with atomic_folder(final, lambda p: (p / "report.md").is_file(), "report folder (report.md)") as out:
        _write(runs, results, out)
    return final / "report.md"


def _write(runs: list[Path], results: list, out: Path) -> None:
    recs = {r.name: read_metrics(r) for r in runs}
    figs = []

    shift = _offsets(runs, recs)

    def curves(kind, key, style):
        out = []
        for name, rs in recs.items():
            xs, ys = _series(rs, kind, key)
            out.append((f"{name} {key}", [x + shift[name] for x in xs], ys, style))
        return out

    figs.append(("Loss", _plot(out / "loss.png", "Training and validation loss", "loss (nats/token)",
                               curves("train", "loss", "-") + curves("eval", "val_loss", "o-"))))
    figs.append(("Learning rate", _plot(out / "lr.png", "Learning rate", "lr", curves("train", "lr", "-"))))
    figs.append(("Gradient norm", _plot(out / "grad_norm.png", "Gradient norm (before clipping)", "norm",
                                        curves("train", "grad_norm", "-"), logy=True)))
    figs.append(("Throughput", _plot(out / "tokens_per_s.png", "Throughput", "tokens/s",
                                     curves("train", "tokens_per_s", "-"))))
    md = [f"# llamaforge report: {', '.join(r.name for r in runs)}", ""]
    md += ["## Summary", ""]
    summaries = {r.name: run_summary(r) for r in runs}
    rows = []
    for r in runs:
        s = summaries[r.name]
        p = _param_counts(r) or {}
        rows.append([r.name, s["steps"], f"{s['tokens_seen']:,}", f"{s.get('train_loss', float('nan')):.4f}",
                     f"{s.get('val_loss', float('nan')):.4f}", f"{s.get('val_bpb') or float('nan'):.4f}",
                     f"{s.get('wall_s', 0) / 60:.1f}", f"{p.get('non_embedding', 0) / 1e6:.2f}M / {p.get('total', 0) / 1e6:.2f}M"])
    md.append(_table(["run", "steps", "tokens", "train loss (last 10 steps)", "val loss", "val bits/byte",
                      "minutes", "params (non-emb / total)"], rows))
    md += [""] + [f"- {r.name}: {hardware(r)}; {recipe(r)}" for r in runs]
    for r in runs:  # what the summary's losses do not show: updates lost or redone
        events = [x.get("event") for x in recs[r.name] if x["type"] == "event"]
        counts = {k: events.count(k) for k in ("scaler_skip", "skipped_step", "loss_spike", "rollback", "out_of_memory")}
        if any(counts.values()):
            md.append(f"- {r.name}: " + ", ".join(f"{v} {k.replace('_', ' ')} event{'s' * (v != 1)}"
                                                  for k, v in counts.items() if v)
                      + " (scaler skip: an fp16 update lost to overflow; see metrics.jsonl)")
    for r in runs:
        pos_path = positions_path(r)
        if pos_path.exists():
            pos = json.loads(pos_path.read_text())
            figs.append(("Long context", _positions_plot(out / f"positions_{r.name}.png", pos)))
            md += ["", f"## Long context ({r.name})", "",
                   f"Validation loss by position at {pos['seq_len']} tokens; trained at {pos['trained_len']}, "
                   f"Position Interpolation factor {pos['factor']:g}.", ""]
            md.append(_table(["model"] + pos["buckets"],
                             [[k] + [f"{v:.3f}" for v in vs] for k, vs in pos["loss"].items()]))
            if pos.get("gap_beyond_trained") is not None:
                md += ["", f"Beyond the trained length the fine-tuned model's loss is {pos['gap_beyond_trained']:.3f} "
                           "nats/token lower than the better of the other two."]
    bench_figs, bench_md = _bench_section(out, recs, shift)
    figs += bench_figs
    md += bench_md
    if results:
        md += ["", "## Evaluation", ""]
        for path, res in results:
            md += [f"`{path.name}` — model `{res['model']}`, context {res['context']}, {res['dtype']}", ""]
            rows = [[k, f"{v['loss']:.4f}", f"{v['perplexity']:.2f}", f"{v.get('bits_per_byte', float('nan')):.4f}",
                     f"{v['tokens']:,}"] for k, v in res.get("perplexity", {}).items()]
            if rows:
                md += [_table(["data", "loss", "perplexity", "bits/byte", "tokens"], rows), ""]
            rows = [[k, v["metric"], f"{v['value']:.4f}", f"{v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}", v["n"], v["kind"]]
                    for k, v in res.get("tasks", {}).items()]
            if rows:
                md += [_table(["task", "metric", "value", "95% CI", "n", "what it is"], rows), ""]
    md += ["", "## Plots", ""] + [f"### {t}\n\n![{t}]({p.name})\n" for t, p in figs]
    md += ["## Sample generations", ""]
    for r in runs:
        for step, prompt, text in summaries[r.name]["samples"]:
            md.append(f"- {r.name}, step {step}: **{prompt}**{text}")
    for r in runs:
        if config_path(r).exists():
            md += ["", f"## Configuration ({r.name})", "", "```yaml", config_path(r).read_text().strip(), "```"]
    text = "\n".join(md) + "\n"
    atomic_write_bytes(out / "report.md", text.encode())
    import markdown

    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>llamaforge report</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.2em .5em}img{max-width:100%}pre{background:#f6f6f6;padding:1em}"
            f"</style></head><body>{body}</body></html>")
    atomic_write_bytes(out / "report.html", html.encode())
