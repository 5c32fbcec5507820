"""The GPT-2 architecture through config switches: parity with transformers' GPT2LMHeadModel both ways,
the 124M preset's size, export/import folders, and a short run of the same training loop."""

import json

import pytest
import torch

from helpers import assert_user_error, micro, run_cli, small_config
from llamaforge.config import load_config
from llamaforge.model.convert import from_gpt2, to_gpt2
from llamaforge.model.io import build_model, count_parameters

GPT2 = dict(hidden_act="gelu_new", norm_type="layernorm", position_embedding_type="learned", attention_bias=True,
            mlp_bias=True, tie_word_embeddings=True, num_key_value_heads=4)


@pytest.mark.compat
def test_logits_match_gpt2lmheadmodel_both_ways(ids):
    model = build_model(small_config(**GPT2), seed=1).eval()
    with torch.no_grad():  # non-trivial biases and norms, so the mapping of every tensor is checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    gpt2 = to_gpt2(model)
    with torch.no_grad():
        ours, theirs = model(ids).logits, gpt2(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        back = from_gpt2(gpt2)
        torch.testing.assert_close(back(ids).logits, ours, atol=1e-5, rtol=1e-5)
    # KV-cache generation works the same way for the learned-position model
    out = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = gpt2.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)


def test_gpt2_124m_preset_has_gpt2_small_size():
    cfg = load_config("gpt2-124m")
    with torch.device("meta"):
        model = build_model(cfg.model)
    n = count_parameters(model)
    assert abs(n["total"] - 124_439_808) < 1_000  # GPT-2 small, tied embeddings


def test_export_import_and_train_loop(tmp_path):
    from llamaforge.data.prepare import prepare

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"Line {i} of a tiny corpus about GPT-2."}) + "\n"
                                              for i in range(200)))
    prepare(str(tmp_path / "c.jsonl"), tmp_path / "d", val_fraction=0.1, workers=0, progress=False)
    run = tmp_path / "run"
    run_cli("train", "--data", tmp_path / "d", "--out", run, "--preset", "gpt2-tiny", *micro(heads=4, kv_heads=4), "--max-steps", "6",
            "--eval-every", "3", "--batch-tokens", "1024", "--train.micro_batch", "4", "--train.eval_tokens", "512",
            "--lr", "1e-2", check_rc=0)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert len(losses) == 6 and losses[-1] < losses[0]
    run_cli("export", "--model", run, "--format", "gpt2", "--out", tmp_path / "gpt2", check_rc=0)
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["model_type"] == "gpt2"
    from transformers import GPT2LMHeadModel

    from llamaforge.model.io import load_model

    ids = torch.randint(0, 32000, (1, 20))
    with torch.no_grad():
        a = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")(ids).logits
        b = load_model(run / "final")(ids).logits
        c = load_model(tmp_path / "gpt2")(ids).logits  # import back
    assert (a - b).abs().max() <= 1e-4 and (c - b).abs().max() <= 1e-4
    assert_user_error(run_cli("export", "--model", run, "--format", "llama", "--out", tmp_path / "x"), "--format gpt2")
    assert_user_error(run_cli("extend", "--model", run / "final", "--data", tmp_path / "d", "--out", tmp_path / "e",
                              "--seq-len", "512"), "no rotary embeddings")
