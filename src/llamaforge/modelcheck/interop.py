"""Checks against the Hugging Face ecosystem: save/load in a fresh process, generate, the stock Llama."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .behaviour import TOL, logits
from .registry import Row, Subject, check, given_fields, max_diff

# Run in a fresh process: the folder must load with transformers alone, as lm-eval and the Hub load it.
_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.load(folder + "/ids.pt")
with torch.no_grad():
    out = model(input_ids=ids)
torch.save((out if isinstance(out, torch.Tensor) else out.logits).float(), folder + "/logits.pt")
fields = json.loads(open(folder + "/fields.json").read())
json.dump({k: getattr(model.config, k, "<missing>") for k in fields}, open(folder + "/read.json", "w"))
"""


@check("round_trip", "a config field not saved, or a buffer computed in __init__ that from_pretrained leaves "
       "uninitialized (the published model differs from the trained one)")
def round_trip(s: Subject) -> Row:
    model, ids = s.build(), s.batch(2, 16)
    given = given_fields(s)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        torch.save(ids, folder / "ids.pt")
        (folder / "fields.json").write_text(json.dumps(given))
        env = dict(os.environ, HF_MODULES_CACHE=str(Path(tmp) / "modules"), HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-c", _RELOAD, str(folder)], capture_output=True, text=True, env=env,
                              timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
            return Row("round_trip", "fail", None, f"AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) "
                       f"failed in a fresh process: {last}; relative imports between your files must be `from "
                       ".configuration_x import ...`")
        read = json.loads((folder / "read.json").read_text())
        reloaded = torch.load(folder / "logits.pt")
    changed = {k: (v, read.get(k)) for k, v in given.items() if read.get(k) != v}
    if changed:
        k, (was, now) = next(iter(changed.items()))
        return Row("round_trip", "fail", sorted(changed), f"config field {k} was {was!r}, reads back as {now!r}: "
                   f"store it in the config's __init__ (self.{k} = {k})")
    d = max_diff(logits(model, ids), reloaded)
    if d > 1e-6:
        return Row("round_trip", "fail", d, f"the reloaded model's logits differ by {d:.2e}: a buffer computed in "
                   "__init__ (e.g. RoPE's inv_freq) is not initialized by from_pretrained; compute it in forward, or "
                   "(re)compute it in _init_weights")
    return Row("round_trip", "pass", d)


@torch.no_grad()
def _greedy(model, ids, steps: int, eos: int | None):
    """Greedy decoding by full forwards (no cache): the reference for generate."""
    for _ in range(steps):
        nxt = logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if eos is not None and int(nxt) == eos:
            break
    return ids


@check("generate", "generate that fails or whose KV cache gives other tokens than full forwards")
def generate(s: Subject) -> Row:
    model = s.build()
    if not hasattr(model, "generate"):
        return Row("generate", "fail", None, "the model has no generate(); inherit transformers.GenerationMixin "
                   "(class MyForCausalLM(MyPreTrainedModel, GenerationMixin))")
    prompt = s.batch(1, 6)
    eos = model.config.eos_token_id
    expected = _greedy(model, prompt, 10, eos)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    n = min(out.shape[1], expected.shape[1])
    if out.shape != expected.shape or not torch.equal(out[:, :n], expected[:, :n]):
        first = next((i for i in range(n) if out[0, i] != expected[0, i]), n)
        return Row("generate", "fail", first - prompt.shape[1], "generate's tokens differ from greedy full forwards "
                   f"at new token {first - prompt.shape[1]}: the KV cache (update, positions past the cache, the "
                   "mask for a single query) is wrong")
    return Row("generate", "pass", f"{out.shape[1] - prompt.shape[1]} tokens equal")


def stock_config(s: Subject) -> LlamaConfig:
    f = s.small
    return LlamaConfig(vocab_size=f["vocab_size"], hidden_size=f["hidden_size"], intermediate_size=f["intermediate_size"],
                       num_hidden_layers=f["num_hidden_layers"], num_attention_heads=f["num_attention_heads"],
                       num_key_value_heads=f["num_key_value_heads"], max_position_embeddings=f["max_position_embeddings"],
                       rms_norm_eps=f["rms_norm_eps"], rope_theta=f["rope_theta"],
                       tie_word_embeddings=f["tie_word_embeddings"], hidden_act="silu", attention_bias=False,
                       mlp_bias=False)


def map_name(name: str, name_map: list[tuple[str, str]]) -> str:
    for pattern, repl in name_map:
        name = re.sub(pattern, repl, name)
    return name


@check("reference", "a computation that differs from transformers' LlamaForCausalLM (which layer and sub-block "
       "first, and the likely cause)")
def reference(s: Subject) -> Row:
    model = s.build()
    stock = LlamaForCausalLM(stock_config(s)).float().eval()
    want = {k: v.shape for k, v in stock.named_parameters()}
    have = {map_name(k, s.name_map): v for k, v in model.named_parameters()}
    if set(have) != set(want) or any(have[k].shape != want[k] for k in want):
        odd = sorted(set(have) ^ set(want))[:1] or [k for k in want if have[k].shape != want[k]][:1]
        return Row("reference", "skip", None, f"parameter names or shapes are not transformers' Llama's (first: "
                   f"{odd[0]}); pass --reference-names FILE, a JSON list of [regex, replacement] pairs, to compare")
    stock.load_state_dict(have, strict=False)
    ids = s.batch(2, 16)
    d = max_diff(logits(model, ids), logits(stock, ids))
    if d <= TOL:
        return Row("reference", "pass", d)
    where = first_divergence(model, stock, ids, s.name_map)
    cause = likely_cause(model, stock, have, ids, s)
    if cause and cause[0] == "layout":
        return Row("reference", "pass", f"equal after permuting q_proj/k_proj rows ({cause[1]})")
    return Row("reference", "fail", d, f"logits differ from LlamaForCausalLM by {d:.2e}, first at {where}"
               + (f"; likely: {cause[1]}" if cause else "; compare that sub-block with transformers' LlamaAttention / "
                  "LlamaMLP line by line"))


def first_divergence(model, stock, ids, name_map) -> str:
    """The first layer's attention or MLP whose output differs, found with forward hooks."""
    outputs: dict[str, dict[str, torch.Tensor]] = {"mine": {}, "stock": {}}

    def hook(side, key):
        def fn(_module, _args, out):
            outputs[side][key] = (out[0] if isinstance(out, tuple) else out).detach().float()
        return fn

    handles = []
    for side, m, names in (("mine", model, name_map), ("stock", stock, [])):
        for name, module in m.named_modules():
            key = map_name(name + ".weight", names).removesuffix(".weight")
            if re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)", key):
                handles.append(module.register_forward_hook(hook(side, key)))
    try:
        logits(model, ids), logits(stock, ids)
    finally:
        for h in handles:
            h.remove()
    order = sorted(outputs["stock"], key=lambda k: (int(k.split(".")[2]), k.endswith("mlp")))
    for key in order:
        if key in outputs["mine"] and max_diff(outputs["mine"][key], outputs["stock"][key]) > TOL:
            layer, part = key.split(".")[2], "attention" if key.endswith("self_attn") else "MLP"
            return f"layer {layer} {part}"
    return "the final norm or the head"


def _permute_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k from the adjacent-pairs RoPE layout (2i, 2i+1) to transformers' (i, i + d/2)."""
    out_dim, dim = w.shape
    return w.view(heads, out_dim // heads // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def likely_cause(model, stock, have: dict, ids, s: Subject) -> tuple[str, str] | None:
    """Try the usual suspects on the stock model: RoPE's other pair layout, gate/up swapped."""
    heads, kv = s.small["num_attention_heads"], s.small["num_key_value_heads"]
    trials = {
        "layout": ("valid RoPE in another layout: it rotates adjacent pairs (2i, 2i+1) where transformers' Llama "
                   "rotates (i, i + d/2); a stock-Llama export must permute q_proj/k_proj",
                   lambda k, v: _permute_interleaved(v, heads if "q_proj" in k else kv)
                   if re.search(r"\.(q_proj|k_proj)\.weight$", k) else v),
        "swap": ("gate_proj and up_proj are swapped: silu must be applied to gate_proj's output",
                 lambda k, v: have[k.replace("gate_proj", "up_proj")] if "gate_proj" in k
                 else have[k.replace("up_proj", "gate_proj")] if "up_proj" in k else v),
    }
    want = logits(model, ids)
    for kind, (text, transform) in trials.items():
        stock.load_state_dict({k: transform(k, v) for k, v in have.items()}, strict=False)
        if max_diff(want, logits(stock, ids)) <= TOL:
            return kind, text
    return None
