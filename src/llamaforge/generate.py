"""Sampling through transformers' `generate` (KV cache, top-k/top-p, repetition penalty, EOS stop)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer


def generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stream: bool = False,
) -> list[str]:
    """Continuations of `prompts` (left-padded batch). temperature 0 = greedy. With `stream`, a
    single prompt's tokens are written to stdout as they are produced (TextStreamer)."""
    if stream and len(prompts) != 1:
        raise ValueError("streaming needs exactly one prompt")
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=top_k if sample else None,
        top_p=top_p if sample else None,
        repetition_penalty=repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
    )
    # decode prompt + continuation together and cut the prompt off: decoding the new tokens alone
    # would drop the space that sentencepiece-style tokens carry at the front ("▁word")
    full = tokenizer.batch_decode(out, skip_special_tokens=True)
    prompt = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return [f[len(p) :] if f.startswith(p) else f for f, p in zip(full, prompt)]
