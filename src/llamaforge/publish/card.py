"""Model cards (README.md with the Hub's YAML metadata) written from a run's own records.

Every Hugging Face folder llamaforge writes carries `llamaforge.json` (what is known about the
model: parameters, tokenizer, data, recipe, results) and a README.md rendered from it, so an export
of an export still has its card. Nothing is claimed that the records do not hold: a bare `init`
folder says it is untrained, and plain accuracy is never called IRT.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from omegaconf import OmegaConf

from ..model.io import RECORDS, count_parameters
from ..runs import config_path, hardware, latest_state, read_metrics, run_summary
from ..train.optim import describe_recipe


def model_records(model, tokenizer_name: str, run_dir: Path | None = None, evals: list[dict] = (),
                  previous: dict | None = None) -> dict:
    """What we know about `model`: counts and config, plus a run's summary and recipe when given."""
    c = model.config
    rec = dict(previous or {})
    rec["architecture"] = {
        "type": c.model_type, "stock_llama": getattr(c, "is_stock_llama", c.model_type == "llama"), "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": getattr(c, "num_key_value_heads", None),
        "intermediate_size": getattr(c, "intermediate_size", None), "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "rope": getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None),
    }
    rec["parameters"] = count_parameters(model)
    rec["tokenizer"] = tokenizer_name
    rec["software"] = software_versions()
    if run_dir is not None:
        run_dir = Path(run_dir)
        s = run_summary(run_dir)
        cfg = OmegaConf.to_container(OmegaConf.load(config_path(run_dir))) if config_path(run_dir).exists() else {}
        stage = {"run": run_dir.name, "steps": s["steps"], "tokens_seen": s["tokens_seen"],
                 "train_loss_last10": s.get("train_loss"), "val_loss": s.get("val_loss"), "val_bpb": s.get("val_bpb"),
                 "recipe": cfg.get("train", {}), "records": latest_state(run_dir).get("records", {}),
                 "hardware": hardware(run_dir),
                 "changes": [{k: r[k] for k in ("step", "event", "from", "to", "checkpoint", "diverged_at", "lr_scale")
                              if k in r} for r in read_metrics(run_dir) if r.get("event") in ("lr_changed", "rollback")]}
        rec.setdefault("training", []).append(stage)
    if evals:
        rec["evaluations"] = list(rec.get("evaluations", [])) + list(evals)
    return rec


def software_versions() -> dict[str, str]:
    """The versions this folder was written with (the card's 'Software' line)."""
    out = {}
    for name in ("llamaforge", "torch", "transformers", "tokenizers", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def render_card(rec: dict, repo_name: str = "MODEL") -> str:
    a, p = rec["architecture"], rec["parameters"]
    stages = rec.get("training", [])
    datasets = sorted({s["records"].get("data", {}).get("source", "") for s in stages} - {""})
    hub_data = [d[3:].split(":")[0] for d in datasets if d.startswith("hf:")]
    meta = ["---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: text-generation",
            "tags:", "  - llamaforge", "  - llama" if a["type"] == "llamaforge" else f"  - {a['type']}",
            "  - causal-lm", "  - text-generation"]
    if hub_data:
        meta += ["datasets:"] + [f"  - {d}" for d in hub_data]
    meta.append("---")
    rope = a.get("rope") or {}
    lines = meta + ["", f"# {repo_name}", "",
                    f"A LLaMA-architecture causal language model built with llamaforge: {a['num_hidden_layers']} layers, "
                    f"hidden size {a['hidden_size']}, {a['num_attention_heads']} attention heads "
                    f"({a['num_key_value_heads']} key/value heads), SwiGLU {a['intermediate_size']}, RMSNorm, rotary "
                    f"embeddings (theta {rope.get('rope_theta', 10000):g}"
                    + (f", linear Position Interpolation factor {rope['factor']:g}" if rope.get("rope_type") == "linear" else "")
                    + f"), context {a['max_position_embeddings']} tokens, "
                    f"{'tied' if a['tie_word_embeddings'] else 'untied'} embeddings.", "",
                    f"- Parameters: {p['total']:,} in all, {p['non_embedding']:,} without the token embedding and output head",
                    f"- Tokenizer: {rec['tokenizer']} ({a['vocab_size']:,} tokens; BOS added, EOS not appended)", ""]
    if not stages:
        lines += ["## Training", "", "This model is freshly initialized and **untrained**: its outputs are random.", ""]
    for s in stages:
        r, data = s["recipe"], s["records"].get("data", {})
        what = "Context extension" if "extend" in s["records"] else "Fine-tuning (SFT)" if "sft" in s["records"] else "Pretraining"
        lines += [f"## {what}: run `{s['run']}`", ""]
        if data:
            lines.append(f"- Data: `{data.get('source')}` ({data.get('train_tokens', 0):,} training tokens prepared)")
        if "extend" in s["records"]:
            e = s["records"]["extend"]
            lines.append(f"- Extended from {e['trained_len']} to {e['seq_len']} positions (PI factor {e['factor']:g})")
        if "sft" in s["records"]:
            q = s["records"]["sft"]
            lines.append(f"- SFT data: `{q['data']}`, {q['train_conversations']} conversations (loss on assistant tokens)")
        lines += [f"- Steps: {s['steps']:,}; tokens seen: {s['tokens_seen']:,}; tokens per step: {r.get('batch_tokens', 0):,}; "
                  f"sequence length {r.get('seq_len')}",
                  f"- Optimizer and schedule: {describe_recipe(r)}",
                  f"- Hardware and precision: {s['hardware']}"]
        for c in s.get("changes", []):  # a resume that changed the peak LRs, a rollback that scaled them
            lines.append(f"- At step {c['step']:,}: " + (f"peak learning rates changed on resume from {c['from']} to {c['to']}"
                         if c["event"] == "lr_changed" else f"diverged at step {c.get('diverged_at')}; rolled back to "
                         f"{c.get('checkpoint')} with the learning rates x {c.get('lr_scale')}"))
        res = [f"train loss (mean of last 10 steps) {s['train_loss_last10']:.4f}" if s.get("train_loss_last10") else None,
               f"validation loss {s['val_loss']:.4f}" if s.get("val_loss") else None,
               f"validation bits per byte {s['val_bpb']:.4f}" if s.get("val_bpb") else None]
        lines += ["- Final: " + ", ".join(x for x in res if x), ""]
    evals = rec.get("evaluations", [])
    if evals:
        lines += ["## Evaluation", "", "| task / data | metric | value | 95% CI | n | what it is |", "|---|---|---|---|---|---|"]
        for ev in evals:
            for k, v in ev.get("perplexity", {}).items():
                lines.append(f"| {k} | perplexity | {v['perplexity']:.2f} | | {v['tokens']:,} tokens | "
                             f"bits/byte {v.get('bits_per_byte', float('nan')):.4f} |")
            for k, v in ev.get("tasks", {}).items():
                lines.append(f"| {k} | {v['metric']} | {v['value']:.4f} | {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f} | "
                             f"{v['n']} | {v['kind']} |")
        lines.append("")
    if rec.get("software"):
        lines += ["## Software", "", "Written with " + ", ".join(f"{k} {v}" for k, v in rec["software"].items())
                  + ". llamaforge's own tests pass with the versions in its `requirements.lock`.", ""]
    stock = rec.get("architecture", {}).get("stock_llama", False)
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "# the model code shipped in this folder (llamaforge's, importing nothing from llamaforge):",
              f'model = AutoModelForCausalLM.from_pretrained("{repo_name}", trust_remote_code=True)',
              *(["# or transformers' own LlamaForCausalLM: this is a stock Llama folder too (same logits)",
                 f'# model = AutoModelForCausalLM.from_pretrained("{repo_name}")'] if stock else []),
              f'tok = AutoTokenizer.from_pretrained("{repo_name}")',
              'ids = tok("The meaning of life is", return_tensors="pt").input_ids',
              "print(tok.decode(model.generate(ids, max_new_tokens=40)[0]))", "```", "",
              "```bash", f"lm_eval --model hf --model_args pretrained={repo_name},trust_remote_code=True "
              "--tasks tinyMMLU --batch_size 4 --output_path out --log_samples", "```", "",
              "## Limitations", "",
              "A small research model trained from scratch: it produces fluent-looking but often false or "
              "incoherent text, knows little, may reproduce biases of its web and news training data, and is "
              "not safe for any use beyond research and teaching. Scores near 25% on 4-choice benchmarks are "
              "chance level.", ""]
    return "\n".join(lines)


def card_files(rec: dict, repo_name: str) -> dict[str, str]:
    """The files that carry the card in a model folder: llamaforge.json (the records) and README.md."""
    return {RECORDS: json.dumps(rec, indent=2) + "\n", "README.md": render_card(rec, repo_name)}


def read_records(folder: Path) -> dict | None:
    path = Path(folder) / RECORDS
    return json.loads(path.read_text()) if path.exists() else None
