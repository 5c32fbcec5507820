"""`llamaforge generate`: sampling through transformers' `generate` (KV cache, top-k/top-p,
repetition penalty, EOS stop), optionally in the model's chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from ..data.sft import chat_prompt
from ..config import RANGES, check_range
from ..errors import UserError
from ..model.io import load_model
from ..model.usercode import BUILTIN, ModelCode
from ..tokenizer import load_tokenizer


SEEDS = RANGES["seed"][:2]


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   repetition_penalty: float, seed: int = 0) -> None:
    """Refuse settings that transformers would silently ignore or turn into nonsense (a temperature
    below 0.01 divides the logits into inf: NaN probabilities)."""
    check_range("--max-new-tokens", max_new_tokens, 1, 1 << 20)
    if temperature != 0:
        check_range("--temperature (0 = greedy, or)", temperature, 0.01, 100)
    if top_k is not None:
        check_range("--top-k", top_k, 0, 1 << 24)
    if top_p is not None:
        check_range("--top-p", top_p, 0, 1, closed=False)
    check_range("--repetition-penalty", repetition_penalty, 0.01, 100)
    check_range("--seed", seed, *SEEDS)


def check_length(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Generation is bounded by the model's positions: a typo'd --max-new-tokens would otherwise run
    until killed, its KV cache growing. Learned positions cannot go further at all; RoPE models were
    trained for max_position_embeddings (`llamaforge extend` gives them more)."""
    limit = config.max_position_embeddings
    if prompt_tokens + max_new_tokens <= limit:
        return
    room = max(0, limit - prompt_tokens)
    if getattr(config, "position_embedding_type", "rope") == "learned":
        raise UserError(f"prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} exceeds this model's "
                        f"{limit} learned positions; shorten the prompt or lower --max-new-tokens to {room}")
    raise UserError(f"prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} exceeds the {limit} positions "
                    f"this model was trained for; lower --max-new-tokens to {room} or lengthen the context with "
                    "`llamaforge extend`")


def load_for_generation(model_dir: str | Path, prompts: list[str], chat: bool = False, code: ModelCode = BUILTIN):
    """(model, tokenizer, prompts) for a model folder; with `chat` each prompt becomes a user turn."""
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT (repeatable) or lines on stdin")
    model, tok = load_model(model_dir, code=code), load_tokenizer(str(model_dir))
    if not hasattr(model, "generate"):
        raise UserError(f"{type(model).__name__} has no generate(); inherit transformers.GenerationMixin in your model "
                        "class (`llamaforge check` says so too)")
    if torch.cuda.is_available():
        model = model.to("cuda")
    if chat:
        if not tok.chat_template:
            raise UserError(f"{model_dir} has no chat template; fine-tune it with `llamaforge sft` or drop --chat")
        prompts = [chat_prompt(tok, p) for p in prompts]
    return model, tok, prompts


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
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")  # the tokenizer is not changed
    check_length(model.config, batch["input_ids"].shape[1], max_new_tokens)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=(top_k or None) if sample else None,
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
