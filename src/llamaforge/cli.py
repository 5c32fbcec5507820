"""`llamaforge SUBCOMMAND ...`: parse arguments, call one library function, print the result.

Bad input raises UserError anywhere below; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from transformers.utils import logging as hf_logging

from .config import load_config
from .data.prepare import prepare
from .errors import UserError
from .model.usercode import load_code
from .runs import positions_path
from .train.preempt import EXIT_STOPPED, Stopped
from .workflows.check import check_model, format_rows, read_name_map
from .workflows.demo import report_path as demo_report_path
from .workflows.demo import steps as demo_steps
from .workflows.evaluate import evaluate, format_table
from .workflows.export import export_model
from .workflows.extend import extend
from .workflows.generate import generate, load_for_generation
from .workflows.init import init_model
from .workflows.pretrain import pretrain
from .workflows.push import push
from .workflows.report import make_report
from .workflows.sft import sft


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _split(value: str | None) -> list[str]:
    return [x for x in (value or "").split(",") if x]


def _code(args):
    """--model-code / --model-class: the user's model code (imported only when named), else ours."""
    return load_code(getattr(args, "model_code", None), getattr(args, "model_class", None))


def cmd_init(args) -> None:
    cfg = load_config(args.preset, args.config, args.overrides)
    n = init_model(cfg, args.out, tokenizer=args.tokenizer, seed=args.seed, code=_code(args))
    print(f"parameters: total {_fmt(n['total'])}, non-embedding {_fmt(n['non_embedding'])}")
    print(args.out)


def cmd_export(args) -> None:
    print(export_model(args.model, args.out, fmt=args.format, evals=args.eval or [], code=_code(args)))


def cmd_generate(args) -> None:
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    model, tok, prompts = load_for_generation(args.model, prompts, chat=args.chat, code=_code(args))
    stream = len(prompts) == 1
    if stream:
        print(prompts[0], end="", flush=True)
    outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    stream=stream)
    if not stream:
        for p, o in zip(prompts, outs):
            print(f"--- {p}{o}")


def cmd_prepare(args) -> None:
    meta = prepare(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                   workers=args.workers, text_field=args.text_field, force=args.force)
    sp = meta["splits"]
    print(f"train: {sp['train']['tokens']:,} tokens in {sp['train']['documents']:,} documents; "
          f"val: {sp['val']['tokens']:,} tokens in {sp['val']['documents']:,} documents; "
          f"skipped empty: {meta['skipped_empty']}, invalid UTF-8 repaired: {meta['invalid_utf8_docs']}; "
          f"{meta['tokens_per_second']:,} tokens/s")
    print(args.out)


TRAIN_FLAGS = {"max_steps": int, "save_every": int, "eval_every": int, "seed": int, "lr": float, "batch_tokens": int}


def _train_overrides(args) -> list[str]:
    """Plain flags (--max-steps ...) become train.* overrides, after --key value ones."""
    extra = [f"train.{k}={getattr(args, k)}" for k in TRAIN_FLAGS if getattr(args, k) is not None]
    if getattr(args, "allow_code_change", False):
        extra.append("train.allow_code_change=true")
    return list(args.overrides) + extra


def cmd_train(args) -> None:
    cfg = load_config(args.preset, args.config, _train_overrides(args))
    print(pretrain(cfg, args.data, args.out, resume=args.resume, code=_code(args)))


def cmd_extend(args) -> None:
    cfg = load_config(args.preset, args.config, _train_overrides(args))
    final = extend(cfg, args.model, args.data, args.out, seq_len=args.seq_len, factor=args.factor, resume=args.resume,
                   code=_code(args))
    print(positions_path(Path(args.out)))
    print(final)


def cmd_eval(args) -> None:
    result = evaluate(args.model, data_dir=args.data, text=args.text, tasks=_split(args.tasks), limit=args.limit,
                      subjects=_split(args.subjects) or None, include_path=args.include_path,
                      irt_params=args.irt_params, batch_size=args.batch_size, out=args.out,
                      samples_dir=args.log_samples, max_tokens=args.max_tokens, code=_code(args))
    print(format_table(result))
    if args.out:
        print(args.out)


def cmd_report(args) -> None:
    print(make_report(args.run, args.eval or [], args.out))


def cmd_sft(args) -> None:
    preset = args.preset or (None if args.config else "tiny-sft")
    cfg = load_config(preset, args.config, _train_overrides(args))
    final, stats = sft(cfg, args.model, args.data, args.out, strict=args.strict, val_fraction=args.val_fraction,
                       resume=args.resume, code=_code(args))
    skipped = ", ".join(f"{v} {k}" for k, v in stats.skipped.items()) or "none"
    print(f"conversations: {stats.read} read, {stats.kept} used; skipped: {skipped}")
    print(final)


def cmd_demo(args) -> None:
    """Replay the demo's steps through this CLI's own entry point, each printed first."""
    for argv in demo_steps(Path(args.out), args.quick):
        print(f"\n$ llamaforge {shlex.join(argv)}", flush=True)
        code = main(argv)
        if code != 0:
            raise UserError(f"step `llamaforge {argv[0]}` failed (exit {code}); fix it and rerun the printed command")
    print(demo_report_path(Path(args.out)))


def cmd_push(args) -> None:
    print(push(args.model, args.repo, private=args.private, revision=args.revision, fmt=args.format, code=_code(args)))


def cmd_check(args) -> int:
    """The table of checks; exit 1 when one fails (2 for bad input, as everywhere)."""
    def progress(name: str) -> None:
        if sys.stderr.isatty():
            print(f"  checking {name} ...", file=sys.stderr, flush=True)

    rows = check_model(_code(args), args.preset, only=_split(args.only) or None, json_out=args.json,
                       name_map=read_name_map(args.reference_names), progress=progress)
    print(format_rows(rows))
    if args.json:
        print(args.json)
    return 1 if any(r.status == "fail" for r in rows) else 0


def _train_args(p: argparse.ArgumentParser, preset_help: str) -> None:
    """--preset/--config, the plain training flags and --resume: shared by train, extend and sft."""
    p.add_argument("--preset", help=preset_help)
    p.add_argument("--config", help="a YAML config file")
    for name, kind in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="default: resume when RUN_DIR holds a checkpoint")
    p.add_argument("--allow-code-change", action="store_true",
                   help="resume a run of your own model code although the code changed since the checkpoint")
    _code_args(p)


def _code_args(p: argparse.ArgumentParser) -> None:
    """--model-code / --model-class: wherever a model is built or loaded."""
    p.add_argument("--model-code", metavar="PATH",
                   help="your own model: a folder with configuration_*.py + modeling_*.py, or one .py file "
                        "(docs/own-model.md)")
    p.add_argument("--model-class", metavar="NAME", help="the model class, when the code defines several")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a file name in configs/ without .yaml, e.g. tiny, llama-150m")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--tokenizer", help="mistral (offline), a folder, or a Hub name")
    p.add_argument("--seed", type=int, default=0)
    _code_args(p)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a missing argument, a value of the wrong type) are one line, exit 2."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llamaforge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a freshly initialized model as a Hugging Face folder")
    _model_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("prepare", help="tokenize a corpus into DATA_DIR (meta.json, train.bin, val.bin)")
    p.add_argument("--source", required=True, help="hf:NAME[:SPLIT], a file/dir/glob (txt, jsonl, json, parquet, csv; "
                   ".gz/.zst/.xz), or sample")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="mistral")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (by text hash)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (0 = in-process)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--force", action="store_true", help="replace DATA_DIR prepared with other settings")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pretrain a model on prepared data")
    p.add_argument("--data", required=True, help="a folder written by prepare")
    p.add_argument("--out", required=True, help="the run directory")
    _train_args(p, "configs/NAME.yaml, e.g. tiny, llama-150m, gpt2-124m")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("extend", help="extend the context with Position Interpolation and fine-tune")
    p.add_argument("--model", required=True, help="a model folder, run directory or checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, required=True, help="the new context length")
    p.add_argument("--factor", type=float, help="interpolation factor (default: new length / trained length)")
    _train_args(p, "training settings, e.g. tiny-extend, llama-150m-extend-1024")
    p.set_defaults(func=cmd_extend)

    p = sub.add_parser("eval", help="perplexity, bits per byte and lm-evaluation-harness tasks")
    p.add_argument("--model", required=True, help="a model folder, run directory or checkpoint")
    p.add_argument("--data", help="prepared data: perplexity and bits per byte on its validation split")
    p.add_argument("--text", help="a text file: perplexity and bits per byte on it")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many validation tokens")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. mmlu_offline_100, mmlu_offline, tinyMMLU")
    p.add_argument("--limit", type=int, help="at most this many questions per task")
    p.add_argument("--subjects", help="comma-separated MMLU subjects for mmlu_offline")
    p.add_argument("--include-path", help="a folder of your own lm-eval task YAML files")
    p.add_argument("--irt-params", help="tinyBenchmarks.pkl, for tinyMMLU's IRT estimate")
    p.add_argument("--batch-size", type=int, help="windows / requests per forward (default: 4 on a CPU, 32 on CUDA)")
    p.add_argument("--log-samples", metavar="DIR", help="write lm-eval's per-sample records into DIR")
    p.add_argument("--out", help="results JSON file")
    _code_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="report.md + report.html with plots, from runs and eval results")
    p.add_argument("--run", action="append", required=True, help="a run directory (repeatable)")
    p.add_argument("--eval", action="append", help="a results JSON from `llamaforge eval --out` (repeatable)")
    p.add_argument("--out", required=True, help="the report folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sft", help="supervised fine-tuning on conversations (loss on assistant tokens only)")
    p.add_argument("--model", required=True, help="a model folder, run directory or checkpoint")
    p.add_argument("--data", required=True, help="JSONL of {prompt, response} or {messages}, or hf:NAME")
    p.add_argument("--out", required=True)
    p.add_argument("--strict", action="store_true", help="refuse bad lines instead of skipping and counting them")
    p.add_argument("--val-fraction", type=float, default=0.05)
    _train_args(p, "training settings (default: tiny-sft unless --config is given)")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("demo", help="the whole job on the sample corpus, on a CPU, printing each step")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="seconds instead of minutes: a micro model, no MMLU")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("push", help="upload a model folder to the Hugging Face Hub")
    p.add_argument("--model", required=True, help="a model folder (e.g. RUN_DIR/final)")
    p.add_argument("--repo", required=True, help="NAMESPACE/NAME on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="a branch to push to (created if missing)")
    p.add_argument("--format", choices=["llamaforge", "llama"], default="llamaforge",
                   help="llama: push the stock LlamaForCausalLM export instead")
    _code_args(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("export", help="copy a model folder, or convert it to stock transformers Llama")
    p.add_argument("--model", required=True, help="a llamaforge or llama folder, run directory or checkpoint")
    p.add_argument("--format", choices=["llamaforge", "llama", "gpt2"], default="llama",
                   help="llama: stock LlamaForCausalLM; gpt2: stock GPT2LMHeadModel (gpt2 presets)")
    p.add_argument("--eval", action="append", help="results JSON from `llamaforge eval --out`, for the model card")
    p.add_argument("--out", required=True)
    _code_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample continuations (streams a single prompt)")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", action="append", help="repeat for a batch; default: lines on stdin")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--seed", type=int, default=0)
    _code_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("check", help="check a model you wrote against what a LLaMA must do (docs/own-model.md)")
    _code_args(p)
    p.add_argument("--preset", default="llama-150m", help="the size the parameter count is taken at (default: llama-150m)")
    p.add_argument("--only", help="comma-separated check names (default: all)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--reference-names", metavar="FILE",
                   help="a JSON list of [regex, replacement] pairs mapping your parameter names to transformers' Llama names")
    p.set_defaults(func=cmd_check)
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `--section.key value` / `--section.key=value` pairs out as OmegaConf dotlist items."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=")[0]:
            if "=" in a:
                overrides.append(a[2:])
            elif i + 1 < len(argv):
                overrides.append(f"{a[2:]}={argv[i + 1]}")
                i += 1
            else:
                raise UserError(f"{a} needs a value, e.g. {a} 3")
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = _split_overrides(argv)
        args = build_parser().parse_args(rest)
        args.overrides = overrides
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        if not args.verbose:  # third-party deprecation notices (e.g. a user config's rope_scaling) are not ours
            warnings.filterwarnings("ignore", category=FutureWarning)
        if not args.verbose and "TRANSFORMERS_VERBOSITY" not in os.environ:
            hf_logging.set_verbosity_error()  # transformers' load reports and notices are not ours to show
            hf_logging.disable_progress_bar()
        code = args.func(args)
    except UserError as e:
        print(f"llamaforge: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # a signal or train.time_limit: a checkpoint was saved first
        print(f"llamaforge: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:  # outside the training loop (which only sets a flag)
        print("llamaforge: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission, read-only: the machine, not the input or a bug
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"llamaforge: error: {e.strerror or e}{where}; free disk space or fix the permissions and run the "
              "same command again", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line by default, the traceback with -v
        if "-v" in argv or "--verbose" in argv:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"llamaforge: internal error: {type(e).__name__}: {first}; rerun with -v for the traceback and "
              "report it", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
