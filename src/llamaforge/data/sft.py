"""Supervised fine-tuning data: conversations, a chat template, loss masks.

Input: JSONL lines `{"prompt": ..., "response": ...}` or `{"messages": [{"role": "system"|"user"|
"assistant", "content": ...}, ...]}` (local files, or hf:NAME with the same fields).

The chat template lives in the tokenizer config, so `tokenizer.apply_chat_template` in plain
transformers renders exactly what training saw. Assistant content and the end-of-turn token (EOS)
are wrapped in `{% generation %}`, and transformers' `return_assistant_tokens_mask` marks them:
those are the only targets; prompt, system and padding positions are -100.

Batches are padded on the right, not packed. With right padding and causal attention no real token
ever attends to a pad, and every conversation starts at position 0 exactly as at inference, so no
attention mask or position bookkeeping is needed; SFT sets are small enough that the padding costs
little. (Packing would need block-diagonal masks, which lose the flash kernels.)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .loader import EpochOrder
from .prepare import held_out
from .sources import open_hub

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Assistant:\n{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
ROLES = ("system", "user", "assistant")


@dataclass
class SFTStats:
    read: int = 0
    kept: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def text_of(content) -> str:
    """A message's content as text: a string, or a list of parts (the OpenAI / HF chat format: strings
    or {"type": "text", "text": ...}); other parts (images, audio) are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content part of type {kind!r} is not text")
        return "".join(texts)
    raise ValueError(f"content is {type(content).__name__}, not text or a list of text parts")


def assistant_mask(tokenizer, template: str, msgs: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, 1 on assistant tokens) for a template without {% generation %} markers: each assistant
    turn is what rendering it adds to the conversation before it, prompt included."""
    def render(turns, prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(turns, chat_template=template, tokenize=True,
                                                  add_generation_prompt=prompt, return_dict=True)["input_ids"])

    ids = render(msgs, False)
    mask = [0] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = render(msgs[:i], True), render(msgs[: i + 1], False)
        if ids[: len(end)] != end or end[: len(start)] != start:
            raise ValueError("the chat template renders turns that are not prefixes of the conversation")
        mask[len(start) : len(end)] = [1] * (len(end) - len(start))
    return ids, mask


def to_messages(obj) -> list[dict]:
    """A record as a list of messages; ValueError names what is wrong."""
    if isinstance(obj, dict) and "messages" in obj:
        msgs = obj["messages"]
    elif isinstance(obj, dict) and "prompt" in obj and "response" in obj:
        msgs = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    else:
        raise ValueError("neither {prompt, response} nor {messages}")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise ValueError("messages must be a list of {role, content}")
    msgs = [dict(m, content=text_of(m["content"])) for m in msgs]
    for m in msgs:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant turn")
    return msgs


def _records(source: str):
    if source.startswith("hf:"):
        name, ds = open_hub(source[3:])
        for n, row in enumerate(ds, 1):
            yield f"{name} row {n}", row
        return
    path = Path(source)
    if not path.is_file():
        raise UserError(f"SFT data {source} does not exist; pass a JSONL file or hf:NAME")
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", ValueError(f"not JSON ({e.msg})")


def tokenize_conversations(source: str, tokenizer, max_len: int, strict: bool = False) -> tuple[list, SFTStats]:
    """[(ids, labels)] for every usable conversation; bad ones skipped and counted, or refused."""
    template = tokenizer.chat_template or CHAT_TEMPLATE  # the caller's tokenizer is not modified
    stats, out = SFTStats(), []
    for where, obj in _records(source):
        stats.read += 1
        try:
            if isinstance(obj, Exception):
                raise obj
            msgs = to_messages(obj)
            if "generation" in template:  # the template marks the assistant's tokens itself
                enc = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
                ids, mask = enc["input_ids"], enc["assistant_masks"]
            else:
                ids, mask = assistant_mask(tokenizer, template, msgs)
            if not any(mask):
                raise ValueError("no assistant tokens to train on")
            if len(ids) > max_len + 1:
                raise ValueError(f"{len(ids)} tokens, longer than the context {max_len} + 1")
        except ValueError as e:
            if strict:
                raise UserError(f"{where}: {e}; fix the line or run without --strict to skip it") from None
            msg = str(e)
            stats.skip("not JSON" if msg.startswith("not JSON") else
                       "longer than the context" if "longer than the context" in msg else msg)
            continue
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        out.append((ids, labels))
        stats.kept += 1
    if not out:
        raise UserError(f"no usable conversation in {source} (skipped: {stats.skipped}); check the format")
    return out, stats


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as one user turn of the tokenizer's chat template, ready for the assistant's answer
    (the BOS is left out: the tokenizer adds it)."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=tokenizer.chat_template
                                         or CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    return chat.removeprefix(tokenizer.bos_token or "")


class SFTBatches:
    """Right-padded (inputs, targets) per step, conversations in a per-epoch permutation, resumable."""

    bytes_per_token = None

    def __init__(self, convs: list, val: list, seqs_per_step: int, pad_id: int, rank: int = 0, world: int = 1,
                 seed: int = 0, eval_batch: int = 8):
        if seqs_per_step % world:
            raise UserError(f"{seqs_per_step} conversations per step do not split over {world} ranks")
        self.convs, self.val, self.pad, self.eval_batch = convs, val, pad_id, eval_batch
        self.seqs_per_step, self.rank, self.local = seqs_per_step, rank, seqs_per_step // world
        self.order, self.consumed, self.seed = EpochOrder(len(convs), seed), 0, seed

    def _pad(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in items) - 1
        x = torch.full((len(items), width), self.pad, dtype=torch.long)
        y = torch.full((len(items), width), -100, dtype=torch.long)
        for i, (ids, labels) in enumerate(items):
            x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
            y[i, : len(ids) - 1] = torch.tensor(labels[1:])  # next-token targets
        return x, y

    def next_batch(self):
        ids = self.order.ids(self.consumed + self.rank * self.local, self.local)
        self.consumed += self.seqs_per_step
        return self._pad([self.convs[i] for i in ids])

    def eval_batches(self):
        for s in range(0, len(self.val), self.eval_batch):
            yield self._pad(self.val[s : s + self.eval_batch])

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "n": len(self.convs), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.convs) or state["seed"] != self.seed:
            raise UserError("checkpoint was made with other SFT data or seed; resume with the same settings")
        self.consumed = int(state["consumed"])


def split_val(convs: list, fraction: float) -> tuple[list, list]:
    """Hold out conversations by a hash of their tokens (deterministic); at least one when possible."""
    train, val = [], []
    for c in convs:
        (val if held_out(np.asarray(c[0], dtype=np.int64).tobytes(), fraction) else train).append(c)
    if not val and len(train) > 1:
        val.append(train.pop())
    return train, val
