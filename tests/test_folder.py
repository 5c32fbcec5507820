"""One folder, every reader: a trained model folder is our class with trust_remote_code=True and a
stock LlamaForCausalLM without it (equal logits), AutoTokenizer asks nothing, PEFT's default LoRA
targets work, pipelines generate; folders and checkpoints in the earlier layout still load and
`export` converts them. Clients run in fresh processes that never import llamaforge."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli, stories_data
from llamaforge.config import load_config
from llamaforge.model.io import build_model, load_model, save_model
from llamaforge.runs import checkpoints
from llamaforge.tokenizer import load_tokenizer
from llamaforge.train.checkpoint import model_from_checkpoint
from llamaforge.workflows.pretrain import pretrain

# The names llamaforge <= 0.2 wrote (model_type "llamaforge"), written out here independently of the
# renaming table in src/, so a mistake there is caught.
OLD_NAMES = [("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
             ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
             ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
             ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
             ("post_attention_layernorm", "ffn_norm")]
MICRO = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
         "model.num_key_value_heads=1", "model.tie_word_embeddings=false", "train.seq_len=32", "train.batch_tokens=256",
         "train.eval_tokens=512", "train.warmup_steps=1", "train.precision=fp32", "train.eval_every=0",
         "train.tensorboard=false", "train.max_steps=3", "train.sample_prompt=The"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    """RUN/final of a (3-step) `llamaforge train` run."""
    root = tmp_path_factory.mktemp("folder")
    stories_data(root, 200)
    pretrain(load_config("tiny", overrides=MICRO), root / "d", root / "run", progress=False)
    return root / "run" / "final"


def client(code: str, tmp_path, **kw) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python that does not import llamaforge; its remote-code cache in tmp_path."""
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules"), **kw.pop("env", {})}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_folder_is_a_stock_llama_folder_with_our_code(final):
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"].endswith("modeling_llamaforge.LlamaForgeForCausalLM")
    assert (final / "modeling_llamaforge.py").exists() and (final / "configuration_llamaforge.py").exists()
    assert cfg["max_position_embeddings"] == 256 and cfg["hidden_size"] == 32  # every field, not a diff
    names = set(load_file(str(final / "model.safetensors")))
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.gate_proj.weight" in names
    assert "import llamaforge" not in (final / "modeling_llamaforge.py").read_text()


def test_auto_classes_with_and_without_remote_code_give_equal_logits(final, tmp_path):
    """Trained folder at 256 positions, and a linearly rope-scaled (x4) folder at 1024 positions."""
    scaled = tmp_path / "scaled"
    cfg = load_config("tiny", overrides=MICRO[:6] + ["model.max_position_embeddings=1024"]).model
    model = build_model(cfg, seed=3)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    save_model(model, load_tokenizer(str(final)), scaled)
    done = client(f"""
        import torch
        from transformers import AutoModelForCausalLM
        for path, T in (({str(final)!r}, 256), ({str(scaled)!r}, 1024)):
            ours = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            stock = AutoModelForCausalLM.from_pretrained(path).eval()
            ids = torch.randint(3, 32000, (2, T), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                diff = (ours(ids).logits - stock(ids).logits).abs().max().item()
            print(type(ours).__name__, type(stock).__name__, T, diff)
        """, tmp_path)
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [r[:3] for r in rows] == [["LlamaForgeForCausalLM", "LlamaForCausalLM", "256"],
                                     ["LlamaForgeForCausalLM", "LlamaForCausalLM", "1024"]], done.stdout
    assert all(float(r[3]) <= 1e-4 for r in rows), done.stdout
    assert (tmp_path / "modules").exists()  # the remote code was really loaded from the folder


def test_auto_tokenizer_asks_and_prints_nothing(final, tmp_path):
    done = client(f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(final)!r})
        assert tok("Hello").input_ids[0] == tok.bos_token_id
        """, tmp_path, env={"TRANSFORMERS_VERBOSITY": "warning"})  # transformers' default level
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)  # no question, no warning


def test_peft_lora_with_default_targets_trains_a_step_both_ways(final, tmp_path):
    done = client(f"""
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        for remote in (False, True):
            model = AutoModelForCausalLM.from_pretrained({str(final)!r}, trust_remote_code=remote)
            peft = get_peft_model(model, LoraConfig(r=8, task_type="CAUSAL_LM"))  # as every LoRA tutorial writes it
            targets = sorted(peft.peft_config["default"].target_modules)
            lora = [p for n, p in peft.named_parameters() if p.requires_grad]
            before = [p.detach().clone() for p in lora]
            opt = torch.optim.AdamW(lora, lr=1e-2)
            ids = torch.randint(3, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
            peft.train()
            loss = peft(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            changed = sum(not torch.equal(a, b) for a, b in zip(before, lora))
            print(type(model).__name__, ",".join(targets), len(lora), changed, float(loss))
        """, tmp_path)
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [r[0] for r in rows] == ["LlamaForCausalLM", "LlamaForgeForCausalLM"], done.stdout
    for r in rows:
        assert r[1] == "q_proj,v_proj" and int(r[2]) == 8 and int(r[3]) > 0, done.stdout  # 2 layers x 2 x (A, B)


def test_text_generation_pipeline_on_the_folder(final, tmp_path):
    done = client(f"""
        from transformers import pipeline
        for remote in (False, True):
            gen = pipeline("text-generation", model={str(final)!r}, trust_remote_code=remote, device="cpu")
            out = gen("The cat", max_new_tokens=5, do_sample=False)[0]["generated_text"]
            print(type(gen.model).__name__, repr(out))
        """, tmp_path)
    rows = done.stdout.splitlines()
    assert rows[0].startswith("LlamaForCausalLM ") and rows[1].startswith("LlamaForgeForCausalLM ")
    assert rows[0].split(" ", 1)[1] == rows[1].split(" ", 1)[1]  # the same greedy text both ways
    assert "The cat" in rows[0]


def to_old_layout(folder, out):
    """A copy of `folder` as llamaforge <= 0.2 wrote it: model_type llamaforge and the old names."""
    import shutil

    shutil.copytree(folder, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="llamaforge", architectures=["LlamaForgeForCausalLM"])
    (out / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(out / "model.safetensors"))
    renamed = {}
    for key, value in weights.items():
        for new, old in OLD_NAMES:
            key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_old_layout_folders_and_checkpoints_still_load_and_export_converts_them(final, tmp_path):
    old = to_old_layout(final, tmp_path / "old")
    assert "model.layers.0.attention.wq.weight" in load_file(str(old / "model.safetensors"))
    ids = torch.randint(3, 32000, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = load_model(final)(ids).logits
        torch.testing.assert_close(load_model(old)(ids).logits, want, rtol=0, atol=0)
    # a checkpoint of the earlier layout (its model.safetensors holds the old names)
    ckpt = tmp_path / "ckpt"
    import shutil

    shutil.copytree(checkpoints(final.parent)[-1], ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    save_file({k.replace(".self_attn.q_proj.", ".attention.wq.").replace(".mlp.gate_proj.", ".feed_forward.w1."): v
               for k, v in weights.items()}, str(ckpt / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model_from_checkpoint(ckpt)(ids).logits, want, rtol=0, atol=0)
    # export converts: the new folder is today's layout, with the same logits
    new = tmp_path / "new"
    run_cli("export", "--model", old, "--out", new, "--format", "llamaforge", check_rc=0)
    assert json.loads((new / "config.json").read_text())["model_type"] == "llama"
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(str(new / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(load_model(new)(ids).logits, want, rtol=0, atol=0)
    done = run_cli("generate", "--model", old, "--prompt", "The", "--max-new-tokens", "3", "--temperature", "0", check_rc=0)
    assert done.stdout.strip()
