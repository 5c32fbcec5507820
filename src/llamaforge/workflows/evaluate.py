"""`llamaforge eval`: perplexity / bits per byte and lm-eval tasks into one results.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..cache import cache_dir
from ..config import check_range
from ..data.prepare import read_meta
from ..errors import UserError, require_extra
from ..eval.harness import run_tasks, task_manager
from ..eval.tasks import check_names, expand, include_paths
from ..eval.perplexity import perplexity_on_split, perplexity_on_text
from ..fsutil import atomic_write_bytes, check_replaceable_file
from ..tokenizer import load_tokenizer
from ..train.precision import tf32_matmuls
from ..model.usercode import BUILTIN, ModelCode
from .common import check_vocab, load_model_arg


def read_results(path: str | Path) -> dict:
    """A results file of `llamaforge eval --out`, parsed, or one line saying why it is not one."""
    try:
        d = json.loads(Path(path).read_text())
        if not isinstance(d, dict) or not {"model", "perplexity", "tasks"} <= set(d):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a results file (JSON with model, perplexity, tasks); pass a file written by "
                        "`llamaforge eval --out`") from None
    return d


def is_results_file(path: Path) -> bool:
    try:
        d = json.loads(Path(path).read_text())
        return isinstance(d, dict) and {"model", "perplexity", "tasks"} <= set(d)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def evaluate(model_path: str, *, data_dir: str | None = None, text: str | None = None, tasks: list[str] = (),
             limit: int | None = None, subjects: list[str] | None = None, include_path: str | None = None,
             irt_params: str | None = None, batch_size: int | None = None, out: str | Path | None = None,
             samples_dir: str | None = None, max_tokens: int | None = None, code: ModelCode = BUILTIN) -> dict:
    """Evaluate in fp32 (on CPU; CUDA when present, with TF32 matmuls) and write `out` (JSON) when
    given. `batch_size` (windows or lm-eval requests per forward): default 4 on a CPU, 32 on CUDA."""
    if not (data_dir or text or tasks):
        raise UserError("nothing to evaluate: pass --data DIR, --text FILE and/or --tasks NAMES")
    if irt_params and not Path(irt_params).is_file():
        raise UserError(f"--irt-params {irt_params} does not exist; pass tinyBenchmarks.pkl or leave it out")
    include = None
    if tasks:  # before the model is loaded and perplexity is spent: every name resolved
        require_extra("lm_eval", "eval")
        include = task_paths(tasks, subjects, include_path)
        task_manager(expand(list(tasks)), include)
    if out is not None:
        check_replaceable_file(Path(out), is_results_file, "results file from `llamaforge eval`")
    for label, value in (("--max-tokens", max_tokens), ("--batch-size", batch_size), ("--limit", limit)):
        if value is not None:  # None: all tokens / the device's default batch / every item
            check_range(label, value, 1, 1 << 40)
    model, tok_dir = load_model_arg(model_path, code)
    if data_dir:
        check_vocab(model, read_meta(data_dir).vocab_size, str(data_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.float().to(device)
    batch_size = batch_size or (32 if device.type == "cuda" else 4)
    with tf32_matmuls(device, True):
        return _evaluate(model, tok_dir, model_path, data_dir, text, tasks, limit, subjects, include, irt_params,
                         batch_size, out, samples_dir, max_tokens)


def _evaluate(model, tok_dir, model_path, data_dir, text, tasks, limit, subjects, include, irt_params,
              batch_size, out, samples_dir, max_tokens) -> dict:
    tokenizer = load_tokenizer(str(tok_dir))
    result: dict = {"model": str(model_path), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "dtype": "float32" if model.device.type == "cpu" else "float32 (TF32 matmuls)",
                    "context": model.config.max_position_embeddings, "perplexity": {}, "tasks": {}}
    if data_dir:
        result["perplexity"]["val"] = perplexity_on_split(model, data_dir, "val", max_tokens, batch_size)
    if text:
        result["perplexity"]["text"] = perplexity_on_text(model, tokenizer, text, batch_size)
    if tasks:
        log = lm_eval_log()
        result["tasks"] = run_tasks(model, tokenizer, expand(list(tasks)), include, limit, batch_size, irt_params,
                                    log_samples=samples_dir is not None, output_dir=samples_dir, log_file=log)
        result["lm_eval_log"] = str(log)
        result["settings"] = {"limit": limit, "subjects": subjects, "batch_size": batch_size}
    if out:
        atomic_write_bytes(Path(out), (json.dumps(result, indent=2) + "\n").encode())
    return result


def lm_eval_log() -> Path:
    """Where lm-eval's own progress bars and warnings go instead of the terminal: llamaforge's cache
    (logs/lm-eval.log; a training run's go to RUN_DIR/lm-eval.log). Nothing is written beside --out."""
    path = cache_dir() / "logs" / "lm-eval.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def task_paths(tasks: list[str], subjects: list[str] | None, include_path: str | None) -> list[str]:
    """The include paths the tasks need: offline MMLU's, the offline benchmarks', the user's."""
    check_names(list(tasks))
    if include_path and any(t.startswith("mmlu_offline") for t in tasks):
        raise UserError("--include-path cannot be combined with the mmlu_offline tasks; run them separately")
    return include_paths(tasks, subjects) + ([include_path] if include_path else [])


def format_table(result: dict) -> str:
    lines = [f"model: {result['model']} (context {result['context']}, {result['dtype']})"]
    if result.get("lm_eval_log"):
        lines.append(f"  (lm-eval's own progress and warnings: {result['lm_eval_log']})")
    for name, p in result["perplexity"].items():
        bpb = f", bits/byte {p['bits_per_byte']:.4f}" if "bits_per_byte" in p else ""
        lines.append(f"  {name:<20} loss {p['loss']:.4f}, perplexity {p['perplexity']:.2f}{bpb} ({p['tokens']:,} tokens)")
    for task, t in result["tasks"].items():
        lo, hi = t["ci95"]
        irt = f", IRT estimate {t['irt_estimate']:.4f}" if "irt_estimate" in t else ""
        irt += f", centered {t['centered']:+.3f}" if "centered" in t else ""
        lines.append(f"  {task:<20} {t['metric']} {t['value']:.4f} (95% CI {lo:.3f}-{hi:.3f}, n={t['n']}; "
                     f"{t['kind']}){irt}")
    return "\n".join(lines)
