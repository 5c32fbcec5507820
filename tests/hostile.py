"""Hostile input by class (issue: "Nothing lost, ever"), rows of test_bad_input's table: every numeric
setting non-finite or out of range, edited data / model / checkpoint files, results files that are
not JSON. Each row: (argv, words the one error line must contain); nothing on disk may change."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields

from llamaforge.config import RANGES, TrainConfig

TRAIN = ["--preset", "tiny", "--model.hidden_size", "32", "--model.intermediate_size", "64",
         "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2", "--model.num_key_value_heads", "1",
         "--model.max_position_embeddings", "64", "--train.seq_len", "32", "--train.micro_batch", "2",
         "--batch-tokens", "128", "--train.eval_tokens", "128", "--eval-every", "0", "--train.precision", "fp32",
         "--train.optimizer", "adamw", "--train.schedule", "cosine"]
_FLOATS = [f.name for f in fields(TrainConfig) if f.name in RANGES and f.type in ("float", float)]
_INTS = [f.name for f in fields(TrainConfig) if f.name in RANGES and f.name not in _FLOATS]
HOSTILE = (
    [f"train.{k}={v}" for k in _FLOATS for v in ("inf", "nan", "-inf")]  # every float setting, non-finite
    + [f"train.{k}=1e23" for k in _INTS]  # every integer setting, beyond its range
    + [f"model.{k}={v}" for k in ("rope_theta", "rms_norm_eps", "initializer_range") for v in ("inf", "nan")]
    + ["init--seed=1e23", "generate--seed=-1", "generate--temperature=1e-40", "generate--repetition-penalty=inf",
       "eval--limit=0", "eval--limit=-3", "eval--max-tokens=0", "eval-unknown-task-before-the-model",
       "extend--factor=1e-300", "extend--factor=inf", "extend-config-not-json", "data-id-beyond-vocab",
       "meta-vocab-a-string", "meta-no-source", "meta-no-tokenizer", "model-yarn-rope", "model-nan-weights",
       "checkpoint-empty-scheduler", "export-eval-not-json", "report-eval-not-json", "resume-with-another-seq-len",
       "sft-val-fraction-1", "prepare-val-fraction-1", "train.on_divergence=maybe", "train.spike_factor=1.1",
       "prepare-out-not-utf8", "train-out-not-utf8"]
)


def hostile_case(world, tmp_path, name: str):
    w, d, run = world, world / "data", world / "run"
    out = tmp_path / "r"
    if name.startswith(("train.", "model.")):
        key, value = name.split("=", 1)
        value = {"1e23": "100000000000000000000000"}.get(value, value)
        cmd = "init" if key.startswith("model.") else "train"
        argv = ["init", "--preset", "tiny", "--out", tmp_path / "m"] if cmd == "init" else \
            ["train", "--data", d, "--out", out, *TRAIN]
        flag = {"train.batch_tokens": "--batch-tokens", "train.max_steps": "--max-steps", "train.seed": "--seed",
                "train.lr": "--lr", "train.eval_every": "--eval-every", "train.save_every": "--save-every"}.get(key, f"--{key}")
        return [*argv, f"{flag}={value}"], [key]  # "=": a value such as -inf is not read as a flag
    flags = {"init--seed=1e23": (["init", "--preset", "tiny", "--out", tmp_path / "m", "--seed", str(10**23)], "--seed"),
             "generate--seed=-1": (["generate", "--model", run / "final", "--prompt", "x", "--seed", "-1"], "--seed"),
             "generate--temperature=1e-40": (["generate", "--model", run / "final", "--prompt", "x", "--temperature",
                                              "1e-40"], "--temperature"),
             "generate--repetition-penalty=inf": (["generate", "--model", run / "final", "--prompt", "x",
                                                   "--repetition-penalty", "inf"], "--repetition-penalty"),
             "eval--limit=0": (["eval", "--model", run / "final", "--data", d, "--limit", "0"], "--limit"),
             "eval--limit=-3": (["eval", "--model", run / "final", "--data", d, "--limit", "-3"], "--limit"),
             "eval--max-tokens=0": (["eval", "--model", run / "final", "--data", d, "--max-tokens", "0"], "--max-tokens"),
             "extend--factor=1e-300": (["extend", "--model", run, "--data", d, "--out", out, "--seq-len", "128",
                                        "--factor", "1e-300"], "--factor"),
             "extend--factor=inf": (["extend", "--model", run, "--data", d, "--out", out, "--seq-len", "128",
                                     "--factor", "inf"], "--factor"),
             "sft-val-fraction-1": (["sft", "--model", run, "--data", w / "c.jsonl", "--out", out, "--val-fraction",
                                     "1"], "--val-fraction"),
             "prepare-val-fraction-1": (["prepare", "--source", w / "c.jsonl", "--out", tmp_path / "p",
                                         "--val-fraction", "1"], "--val-fraction")}
    if name in flags:
        argv, word = flags[name]
        return argv, [word]
    if name.endswith("-out-not-utf8"):  # a name with bytes that are not UTF-8 (os.fsdecode's surrogates)
        bad = tmp_path / os.fsdecode(b"out-\xff")
        argv = ["prepare", "--source", w / "c.jsonl", "--out", bad, "--workers", "0"] if name.startswith("prepare") \
            else ["train", "--data", d, "--out", bad, *TRAIN, "--max-steps", "1"]
        return argv, ["not a valid UTF-8 path"]
    if name == "eval-unknown-task-before-the-model":  # refused before the (damaged) model is even read
        shutil.copytree(run / "final", tmp_path / "m")
        (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
        return ["eval", "--model", tmp_path / "m", "--tasks", "hellaswagg"], ["unknown lm-eval task", "hellaswagg"]
    if name == "extend-config-not-json":
        shutil.copytree(run / "final", tmp_path / "m")
        (tmp_path / "m" / "config.json").write_text("{nope")
        return ["extend", "--model", tmp_path / "m", "--data", d, "--out", out, "--seq-len", "128"], ["config.json"]
    if name.startswith(("data-", "meta-")):
        bad = tmp_path / "data"
        shutil.copytree(d, bad)
        meta = json.loads((bad / "meta.json").read_text())
        if name == "data-id-beyond-vocab":  # the right size, one id past the vocabulary
            ids = bytearray((bad / "train.bin").read_bytes())
            ids[10:12] = (meta["vocab_size"] + 5).to_bytes(2, "little")
            (bad / "train.bin").write_bytes(bytes(ids))
            words = ["train.bin", "token id", "beyond the vocabulary"]
        else:
            field = {"meta-vocab-a-string": "vocab_size", "meta-no-source": "source", "meta-no-tokenizer": "tokenizer"}[name]
            meta = dict(meta, vocab_size=str(meta["vocab_size"])) if field == "vocab_size" else \
                {k: v for k, v in meta.items() if k != field}
            (bad / "meta.json").write_text(json.dumps(meta))
            words = ["meta.json", field]
        return ["train", "--data", bad, "--out", out, *TRAIN, "--max-steps", "1"], words
    if name in ("model-yarn-rope", "model-nan-weights"):
        shutil.copytree(run / "final", tmp_path / "m")
        if name == "model-yarn-rope":
            cfg = json.loads((tmp_path / "m" / "config.json").read_text())
            cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                      "original_max_position_embeddings": 64}
            (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
            return ["generate", "--model", tmp_path / "m", "--prompt", "x"], ["yarn", "rope"]
        from safetensors.torch import load_file, save_file

        weights = load_file(str(tmp_path / "m" / "model.safetensors"))
        first = sorted(weights)[0]
        weights[first][0] = float("nan")
        save_file(weights, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
        return ["eval", "--model", tmp_path / "m", "--data", d], ["non-finite", first]
    if name in ("checkpoint-empty-scheduler", "resume-with-another-seq-len"):
        copy = tmp_path / "run"
        shutil.copytree(run, copy)
        shutil.rmtree(copy / "final")
        if name == "resume-with-another-seq-len":
            return ["train", "--data", d, "--out", copy, *TRAIN, "--train.seq_len", "16", "--max-steps", "6"],\
                ["train.seq_len 32 -> 16", "config.yaml"]
        for step in (copy / "checkpoints").glob("step_*"):
            state = json.loads((step / "state.json").read_text())
            (step / "state.json").write_text(json.dumps(dict(state, scheduler={})))
        return ["train", "--data", d, "--out", copy, *TRAIN, "--max-steps", "6"], ["no usable checkpoint", "scheduler"]
    if name in ("export-eval-not-json", "report-eval-not-json"):
        (tmp_path / "e.json").write_text("{not json")
        argv = ["export", "--model", run / "final", "--out", tmp_path / "x", "--eval", tmp_path / "e.json"] \
            if name.startswith("export") else ["report", "--run", run, "--out", tmp_path / "rep", "--eval", tmp_path / "e.json"]
        return argv, ["e.json", "llamaforge eval --out"]
    return None
