"""lm-evaluation-harness through its Python API, and honest reporting of what it measured.

tinyBenchmarks' IRT estimate needs the `tinyBenchmarks` package and its parameter file; when both
are given it is computed for tinyMMLU. Otherwise (and always for other tasks) the result is plain
accuracy with a 95% Wilson interval, labelled "plain accuracy" — never passed off as IRT.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from .tasks import BENCHES, CAPABILITY_SET, CAPABILITY_VERSION, capability_score

log = logging.getLogger(__name__)
PLAIN = "plain accuracy (not IRT)"


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _irt(samples: list[dict], params_file: str) -> float | None:
    """tinyBenchmarks' gp-IRT estimate of MMLU from tinyMMLU's 100 per-question scores."""
    try:
        import numpy as np
        import tinyBenchmarks as tb
    except ImportError:
        log.warning("tinyBenchmarks is not installed; reporting plain accuracy")
        return None
    scores = np.array([s["acc_norm"] for s in sorted(samples, key=lambda s: s["doc_id"])], dtype=float)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:  # the package reads tinyBenchmarks.pkl from the cwd
        shutil.copy(params_file, Path(tmp) / "tinyBenchmarks.pkl")
        os.chdir(tmp)
        try:
            return float(tb.evaluate(scores, "mmlu")["mmlu"]["gpirt"])
        finally:
            os.chdir(cwd)


@contextlib.contextmanager
def third_party_to(log_file: str | Path | None):
    """lm-eval's progress bars, its "Truncating N tokens" warnings and other libraries' notices into
    `log_file` (a run's lm-eval.log), not onto the terminal and through our progress bar."""
    if log_file is None:
        yield
        return
    import logging

    with open(log_file, "a", encoding="utf-8") as f:
        handler = logging.StreamHandler(f)
        saved = {}
        for name in ("lm_eval", "lm-eval"):
            logger = logging.getLogger(name)
            saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [handler], False
        try:
            with contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
                yield
        finally:
            for name, (handlers, propagate) in saved.items():
                logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate


def task_manager(tasks: list[str], include_path: str | Path | list | None = None):
    """lm-eval's TaskManager over its tasks and `include_path`; an unknown name refused in one line
    (call it before loading a model: the names are then checked before any work)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm_eval is not installed, and this needs it; pip install 'llamaforge[eval]'") from None
    paths = include_path if isinstance(include_path, list) else [include_path] if include_path else []
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task {unknown[0]!r}; see `lm_eval --tasks list` or use mmlu_offline_100")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | Path | list | None = None,
              limit: int | None = None, batch_size: int = 4, irt_params: str | None = None, log_samples: bool = False,
              output_dir: str | Path | None = None, autocast=contextlib.nullcontext,
              log_file: str | Path | None = None) -> dict:
    """Score `model` on lm-eval tasks; returns {task: {metric, value, ci95, n, kind}}; the offline
    benchmarks (eval/tasks.py) also carry `correct` (0/1 per item, by doc_id) and `centered`, and
    `capability` their capability score. `autocast`: the precision to score in (training's)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("lm_eval is not installed, and this needs it; pip install 'llamaforge[eval]'") from None
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              max_length=model.config.max_position_embeddings,
              add_bos_token=bool(tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]))  # as in training
    manager = task_manager(tasks, include_path)
    benches = [t for t in tasks if t in BENCHES]
    cache, model.config.use_cache = model.config.use_cache, False  # lm-eval's scoring forwards: no KV cache
    try:  # built and thrown away on every call (generate still asks for one through its generation_config)
        with torch.no_grad(), autocast(), third_party_to(log_file):
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                              log_samples=log_samples or irt_params is not None or bool(benches))
    finally:
        model.config.use_cache = cache
    out = {}
    for task in tasks:
        r = results["results"][task]
        n = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
        metric = "acc_norm" if "acc_norm,none" in r else "acc"
        value = float(r[f"{metric},none"])
        row = {"metric": metric, "value": value, "n": n, "ci95": list(wilson_interval(value, n)), "kind": PLAIN}
        if task == "tinyMMLU" and irt_params:
            irt = _irt(results["samples"][task], irt_params)
            if irt is not None:
                row.update(irt_estimate=irt, kind="tinyBenchmarks gp-IRT estimate (value = plain acc_norm)")
        out[task] = row
    if benches:
        items = {}
        for task in benches:
            samples = sorted(results["samples"][task], key=lambda x: x["doc_id"])
            metric = BENCHES[task].metric
            out[task]["correct"] = [int(x[metric]) for x in samples]
            items[task] = [(float(x[metric]), float(x["doc"]["chance"])) for x in samples]
        score = capability_score(items)
        for task in benches:
            out[task]["centered"] = score["tasks"][task]["centered"]
        out["capability"] = {"metric": "capability score (centered accuracy, mean over tasks)", "value": score["score"],
                             "ci95": score["ci95"], "n": sum(len(v) for v in items.values()),
                             "kind": "centered on chance; normal 95% interval", "tasks": benches,
                             "set": CAPABILITY_VERSION if set(benches) == set(CAPABILITY_SET) else "custom"}
    if output_dir and log_samples:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=str(output_dir))
        tracker.save_results_aggregated(results=results, samples=results.get("samples"))
        for task in tasks:
            tracker.save_results_samples(task=task, samples=results["samples"][task])
    return out
