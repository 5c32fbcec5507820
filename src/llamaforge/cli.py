"""`llamaforge SUBCOMMAND ...`: parse arguments, call one library function, print the result.

Bad input raises UserError anywhere below; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import UserError


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def cmd_init(args) -> None:
    from .config import load_config
    from .models import build_model, count_parameters, save_model
    from .tokenizer import load_tokenizer

    cfg = load_config(args.preset, args.config, args.overrides)
    tok = load_tokenizer(args.tokenizer or cfg.tokenizer)
    model = build_model(cfg.model, tok, seed=args.seed)
    save_model(model, tok, args.out)
    n = count_parameters(model)
    print(f"parameters: total {_fmt(n['total'])}, non-embedding {_fmt(n['non_embedding'])}")
    print(args.out)


def cmd_export(args) -> None:
    from .convert import to_llama
    from .models import load_model, save_model
    from .tokenizer import load_tokenizer

    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    out = to_llama(model) if args.format == "llama" else model
    save_model(out, tok, args.out)
    print(args.out)


def cmd_generate(args) -> None:
    from .generate import generate
    from .models import load_model
    from .tokenizer import load_tokenizer

    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT (repeatable) or lines on stdin")
    model, tok = load_model(args.model), load_tokenizer(args.model)
    stream = len(prompts) == 1
    if stream:
        print(prompts[0], end="", flush=True)
    outs = generate(
        model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stream=stream,
    )
    if not stream:
        for p, o in zip(prompts, outs):
            print(f"--- {p}{o}")


def cmd_prepare(args) -> None:
    from .data.prepare import prepare

    meta = prepare(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                   workers=args.workers, text_field=args.text_field, force=args.force)
    sp = meta["splits"]
    print(f"train: {sp['train']['tokens']:,} tokens in {sp['train']['documents']:,} documents; "
          f"val: {sp['val']['tokens']:,} tokens in {sp['val']['documents']:,} documents; "
          f"skipped empty: {meta['skipped_empty']}, invalid UTF-8 repaired: {meta['invalid_utf8_docs']}; "
          f"{meta['tokens_per_second']:,} tokens/s")
    print(args.out)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a file name in configs/ without .yaml, e.g. tiny, llama-150m")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--tokenizer", help="mistral (offline), a folder, or a Hub name")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaforge", description=__doc__.splitlines()[0])
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

    p = sub.add_parser("export", help="copy a model folder, or convert it to stock transformers Llama")
    p.add_argument("--model", required=True, help="a llamaforge or llama folder")
    p.add_argument("--format", choices=["llamaforge", "llama"], default="llama")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample continuations (streams a single prompt)")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", action="append", help="repeat for a batch; default: lines on stdin")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
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
        if not args.verbose:
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        args.func(args)
    except UserError as e:
        print(f"llamaforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llamaforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
