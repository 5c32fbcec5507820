"""init / export / generate from the command line, and loading in a process without llamaforge."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_user_error, run_cli

FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, {cls}
path = sys.argv[1]
kw = {kw}
model, info = {loader}.from_pretrained(path, output_loading_info=True, **kw)
tok = AutoTokenizer.from_pretrained(path, **kw)
ids = torch.tensor([tok("Hello world, this is a test.").input_ids])
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps(dict(missing=sorted(info["missing_keys"]), unexpected=list(info["unexpected_keys"]), ids=ids[0].tolist(),
                      logits=logits[0, -1, :8].tolist(), name=type(model).__name__)))
"""


def fresh_load(path, loader="AutoModelForCausalLM", kw="dict(trust_remote_code=True)", cls="LlamaForCausalLM"):
    """Load in a new process that never imports llamaforge, offline, with no terminal to prompt."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    code = FRESH.format(loader=loader, kw=kw, cls=cls)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "init"
    done = run_cli("init", "--preset", "tiny", "--out", out, "--model.num_hidden_layers", "2", check_rc=0)
    assert "non-embedding" in done.stdout
    return out


def test_init_writes_a_complete_hf_folder(init_dir):
    names = set(os.listdir(init_dir))
    assert {"config.json", "configuration_llamaforge.py", "modeling_llamaforge.py", "model.safetensors",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((init_dir / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_llamaforge.LlamaForgeForCausalLM"
    assert cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2


@pytest.mark.compat
def test_fresh_process_loads_with_trust_remote_code(init_dir):
    from llamaforge.model.io import load_model

    got = fresh_load(init_dir)
    assert got["missing"] == [] and got["unexpected"] == []
    assert got["name"] == "LlamaForgeForCausalLM"
    assert got["ids"] == [1, 22557, 1526, 28725, 456, 349, 264, 1369, 28723]
    with torch.no_grad():
        ours = load_model(init_dir)(torch.tensor([got["ids"]])).logits[0, -1, :8]
    torch.testing.assert_close(torch.tensor(got["logits"]), ours)


@pytest.mark.compat
def test_export_llama_loads_in_plain_transformers_and_back(init_dir, tmp_path):
    out = tmp_path / "llama"
    run_cli("export", "--model", init_dir, "--format", "llama", "--out", out, check_rc=0)
    assert not any(n.endswith(".py") for n in os.listdir(out))
    got = fresh_load(out, loader="LlamaForCausalLM", kw="dict()")
    assert got["missing"] == [] and got["name"] == "LlamaForCausalLM"
    from llamaforge.model.io import load_model

    with torch.no_grad():
        ours = load_model(init_dir)(torch.tensor([got["ids"]])).logits[0, -1, :8]
        back = load_model(out)(torch.tensor([got["ids"]])).logits[0, -1, :8]  # llama folder -> llamaforge
    assert (torch.tensor(got["logits"]) - ours).abs().max() <= 1e-4
    torch.testing.assert_close(back, ours)


@pytest.mark.compat
def test_generate_streams_and_batches(init_dir):
    one = run_cli("generate", "--model", init_dir, "--prompt", "Once upon", "--max-new-tokens", "5", check_rc=0)
    assert one.stdout.startswith("Once upon")
    two = run_cli("generate", "--model", init_dir, "--prompt", "a", "--prompt", "b c", "--max-new-tokens", "5",
                  "--temperature", "0", check_rc=0)
    assert two.stdout.count("--- ") == 2


def test_bad_input_gets_one_line_and_exit_2(init_dir, tmp_path):
    assert_user_error(run_cli("init", "--preset", "nope", "--out", tmp_path / "x"), "unknown preset", "tiny")
    assert_user_error(run_cli("init", "--preset", "tiny", "--out", tmp_path / "x", "--model.num_attention_heads", "3"),
                      "divisible")
    assert_user_error(run_cli("init", "--preset", "tiny", "--out", tmp_path / "x", "--model.num_key_value_heads", "3"),
                      "divide")
    assert_user_error(run_cli("init", "--preset", "tiny", "--out", tmp_path / "x", "--model.hidden_size", "big"),
                      "bad configuration")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((init_dir / "config.json").read_text())
    assert_user_error(run_cli("generate", "--model", empty, "--prompt", "x"), "no weights")
    assert_user_error(run_cli("export", "--model", tmp_path / "missing", "--out", tmp_path / "o"), "does not exist")
    assert_user_error(run_cli("export", "--model", tmp_path, "--out", tmp_path / "o"), "not a model folder")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(init_dir):
        (bad / name).write_bytes((init_dir / name).read_bytes())
    state = load_file(bad / "model.safetensors")
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    assert_user_error(run_cli("export", "--model", bad, "--out", tmp_path / "o"), "re-export")
    assert not (tmp_path / "o").exists()


@pytest.mark.compat
def test_our_tokenizer_loading_asks_no_remote_code_question(init_dir):
    """transformers 5.24 prints its remote-code question to stdout when AutoTokenizer reads a folder whose
    config.json has auto_map and no terminal is attached; llamaforge's own loading must never trigger it."""
    code = ("import sys; from llamaforge.tokenizer import load_tokenizer; "
            "tok = load_tokenizer(sys.argv[1]); sys.stderr.write(str(tok('Hello').input_ids))")
    done = subprocess.run([sys.executable, "-c", code, str(init_dir)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""
    assert done.stderr.strip().endswith("[1, 22557]")
