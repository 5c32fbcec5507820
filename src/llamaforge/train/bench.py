"""Benchmarks scored during training (`train.eval_tasks`): lm-eval on the model being trained, in
the run's precision, eager, its per-task and capability scores as one flat `bench` row of
metrics.jsonl (and TensorBoard/wandb scalars)."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..eval.harness import run_tasks
from ..eval.tasks import include_paths


def score_tasks(model, tokenizer, tasks: list[str], limit: int | None, autocast, batch_size: int) -> dict:
    """{score, score_lo, score_hi, TASK_acc, TASK_centered, TASK_n, ..., items} for a `bench` row;
    `items`: per offline task, its items' results in doc order as a string of 0/1."""
    was_training = model.training
    model.eval()
    states = random.getstate(), np.random.get_state()
    try:  # lm-eval seeds python, numpy and torch: the run's random streams are put back as they were
        device = next(model.parameters()).device
        cuda = [device] if device.type == "cuda" else []
        with torch.compiler.set_stance("force_eager"), torch.random.fork_rng(devices=cuda):
            result = run_tasks(model, tokenizer, tasks, include_paths(tasks), limit, batch_size, autocast=autocast)
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
    row: dict = {}
    if "capability" in result:
        cap = result["capability"]
        row.update(score=cap["value"], score_lo=cap["ci95"][0], score_hi=cap["ci95"][1])
    for task in tasks:
        r = result[task]
        row[f"{task}_{r['metric']}"] = r["value"]
        row[f"{task}_n"] = r["n"]
        if "centered" in r:
            row[f"{task}_centered"] = r["centered"]
    row["items"] = {t: "".join(map(str, result[t]["correct"])) for t in tasks if "correct" in result[t]}
    return row


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, device: torch.device, max_new_tokens: int = 32,
                synced: bool = False) -> str:
    """Greedy continuation of `prompt`. `synced`: FSDP2 ranks keep stepping together until every rank
    is done (each forward all-gathers the weights, so a rank stopping early at EOS would hang the rest)."""
    if not hasattr(model, "generate"):  # a user's model without GenerationMixin: no sample (check says so)
        return ""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    room = model.config.max_position_embeddings - ids.shape[1]  # never past the model's positions (README: train)
    if room < 1:
        return ""
    was_training = model.training
    model.eval()
    try:  # the training mode comes back whatever happens (a stop abandons generation: preempt.Abandoned)
        out = model.generate(ids, max_new_tokens=min(max_new_tokens, room), do_sample=False, synced_gpus=synced,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
