"""`python -m benchmarks recipe`: the training recipes at a fixed token budget.

The `tiny` preset on the offline sample corpus, `--recipe-steps` steps of 4,096 tokens, one run per
recipe (today's AdamW + cosine is the baseline), validation loss on the same windows every
`--recipe-steps / 15` steps. Printed per recipe: validation loss at equal tokens, the tokens needed to
reach the baseline's final validation loss (ratio to the baseline's), and the training wall time to
reach it (evaluation time excluded). Runs are sequential, not interleaved: wall-time ratios carry
this machine's run-to-run noise (a few percent).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

ADAMW, MUON = ["train.optimizer=adamw"], ["train.optimizer=muon"]
COSINE, WSD = ["train.schedule=cosine", "train.min_lr_ratio=0.1"], ["train.schedule=wsd", "train.min_lr_ratio=0.0"]
RECIPES = {
    "adamw+cosine": ADAMW + COSINE,  # the baseline: the 2023 standard, what `tiny` trained with before
    "adamw+wsd": ADAMW + WSD,
    "muon+cosine": MUON + COSINE,
    "muon+wsd": MUON + WSD,
}
BASELINE = "adamw+cosine"


def sample_data(work: Path) -> Path:
    from llamaforge.data.prepare import is_data_folder, prepare
    from llamaforge.data.sources import sample_corpus

    out = work / "sample-data"
    if not is_data_folder(out):
        prepare(str(sample_corpus()), out, progress=False)
    return out


def curve(run: Path) -> tuple[list[tuple[int, float, float]], int]:
    """[(tokens, train wall seconds, val loss)] at each evaluation, and tokens per step."""
    from llamaforge.runs import read_metrics

    records = read_metrics(run)
    train = {r["step"]: r for r in records if r["type"] == "train"}
    wall, elapsed = {}, 0.0
    for s in sorted(train):
        elapsed += train[s]["step_s"]
        wall[s] = elapsed
    per_step = next(iter(train.values()))["tokens"]
    return [(r["step"] * per_step, wall[r["step"]], r["val_loss"]) for r in records if r["type"] == "eval"], per_step


def reach(points: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(tokens, wall seconds) at which the validation loss first reaches `target`, linearly
    interpolated between evaluations; None if it never does."""
    prev = (0, 0.0, float("inf"))
    for tok, wall, loss in points:
        if loss <= target:
            if prev[2] == float("inf"):
                return float(tok), wall
            f = (prev[2] - target) / (prev[2] - loss)
            return prev[0] + f * (tok - prev[0]), prev[1] + f * (wall - prev[1])
        prev = (tok, wall, loss)
    return None


def run(args) -> dict:
    from llamaforge.config import load_config
    from llamaforge.workflows.pretrain import pretrain

    steps = args.recipe_steps
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-recipe-"))
    data = Path(args.data) if args.data else sample_data(work)
    names = [n for n in RECIPES if not args.recipes or n in args.recipes or n == BASELINE]
    curves = {}
    for name in names:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)  # our own scratch folder
        overrides = [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 15)}", "train.save_every=0",
                     "train.tensorboard=false", f"train.warmup_steps={max(1, steps // 30)}", *RECIPES[name],
                     *args.recipe_overrides]
        pretrain(load_config("tiny", overrides=overrides), data, out, resume=False, progress=False)
        curves[name] = curve(out)[0]
        print(f"  {name:14s} val loss {curves[name][-1][2]:.4f} after {curves[name][-1][0]:,} tokens, "
              f"{curves[name][-1][1]:.0f} s of training")
    target = curves[BASELINE][-1][2]
    base_tokens, base_wall = curves[BASELINE][-1][0], curves[BASELINE][-1][1]
    row = {"benchmark": "recipe", "steps": steps, "tokens": base_tokens, "baseline": BASELINE, "target_val_loss": round(target, 4),
           "data": str(data)}
    print(f"recipe: tiny, {steps} steps x {base_tokens // steps:,} tokens; baseline {BASELINE} final val loss {target:.4f}")
    for name in names:
        got = reach(curves[name], target)
        final = curves[name][-1][2]
        row[name] = {"final_val_loss": round(final, 4), "tokens_to_target": None if got is None else round(got[0]),
                     "token_ratio": None if got is None else round(got[0] / base_tokens, 3),
                     "wall_ratio": None if got is None else round(got[1] / base_wall, 3)}
        how = "never reached" if got is None else \
            f"{got[0]:,.0f} tokens ({got[0] / base_tokens:.2f}x), {got[1]:.0f} s ({got[1] / base_wall:.2f}x wall)"
        print(f"  {name:14s} final val {final:.4f} | to reach {target:.4f}: {how}")
    return row
