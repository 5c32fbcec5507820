"""Position Interpolation: parity with transformers at 1024 positions, the CLI, the evidence, refusals."""

import json

import pytest
import torch

from helpers import assert_user_error, micro, run_cli
from llamaforge.model.convert import to_llama
from llamaforge.workflows.extend import interpolate


def test_interpolated_model_matches_llama_with_linear_rope_scaling_at_1024(small_model):
    base = small_model(max_position_embeddings=256, tie_word_embeddings=True)
    model = interpolate(base, 1024)
    assert model.config.max_position_embeddings == 1024 and model.config.rope_factor == 4.0
    assert base.config.rope_factor == 1.0  # the original is untouched
    llama = to_llama(model)
    assert llama.config.rope_parameters["rope_type"] == "linear" and llama.config.rope_parameters["factor"] == 4.0
    ids = torch.randint(0, 512, (1, 1024), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max().item() <= 1e-4
        # positions p and 4p see the same rotation angle: the interpolated model at 4x spacing equals the base
        pos = torch.arange(0, 256)[None]
        short = base(ids[:, :256], position_ids=pos).logits
        long = model(ids[:, :256], position_ids=pos * 4).logits
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-4)
    again = interpolate(model, 2048)  # extending again multiplies the factor
    assert again.config.rope_factor == 8.0


def test_refusals(small_model, tmp_path):
    from llamaforge.errors import UserError

    base = small_model(max_position_embeddings=256)
    with pytest.raises(UserError, match="not larger"):
        interpolate(base, 256)
    with pytest.raises(UserError, match=r"--factor is -1.0; it must be a finite number in \[1"):
        interpolate(base, 512, factor=-1.0)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    done = run_cli("extend", "--model", tmp_path / "gpt2", "--data", tmp_path, "--out", tmp_path / "o", "--seq-len", "64")
    assert_user_error(done, "no rotary embeddings")


def test_extend_cli_fine_tunes_and_writes_the_evidence(tmp_path):
    from llamaforge.data.prepare import prepare

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    (tmp_path / "c.jsonl").write_text("".join(
        json.dumps({"text": " ".join(words[(i + j) % 12] for j in range(300))}) + "\n" for i in range(120)))
    prepare(str(tmp_path / "c.jsonl"), tmp_path / "d", val_fraction=0.1, workers=0, progress=False)
    run_cli("train", "--data", tmp_path / "d", "--out", tmp_path / "pre", "--preset", "tiny", *micro(positions=32),
            "--train.seq_len", "32", "--max-steps", "4",
            "--batch-tokens", "512", "--train.micro_batch", "8", "--eval-every", "0", check_rc=0)
    run_cli("extend", "--model", tmp_path / "pre", "--data", tmp_path / "d", "--out", tmp_path / "ext", "--seq-len",
            "128", "--preset", "tiny-extend", "--max-steps", "2", "--batch-tokens", "512", "--train.micro_batch", "2",
            "--eval-every", "2", "--train.eval_tokens", "512", check_rc=0)
    cfg = json.loads((tmp_path / "ext" / "final" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 128
    assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 4.0
    pos = json.loads((tmp_path / "ext" / "positions.json").read_text())
    assert pos["buckets"] == ["0-32", "32-64", "64-96", "96-128"] and pos["trained_len"] == 32
    assert len(pos["loss"]) == 3 and all(len(v) == 4 for v in pos["loss"].values())
    assert pos["gap_beyond_trained"] is not None
    assert pos["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu") and pos["precision"]
    # measured from the published final/ (not the training process's copy of the model)
    from llamaforge.data.prepare import open_split
    from llamaforge.model.io import load_model
    from llamaforge.train.precision import choose
    from llamaforge.workflows.extend import loss_by_position

    tokens = open_split(tmp_path / "d", "val")
    if pos["measured_on"] != "val":  # this corpus's val split is shorter than a window: the train tail
        tokens = open_split(tmp_path / "d", "train")[-64 * 128 - 1 :]
    again = loss_by_position(load_model(tmp_path / "ext" / "final"), tokens, 128,
                             precision=choose("auto", torch.device("cpu")))
    assert again == pytest.approx(pos["loss"]["interpolation + fine-tune"], abs=1e-5)
    assert_user_error(run_cli("extend", "--model", tmp_path / "pre", "--data", tmp_path / "d", "--out",
                              tmp_path / "x", "--seq-len", "16"), "not larger")
