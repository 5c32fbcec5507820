"""Perplexity against a direct computation; lm-eval (API and the course's CLI) against hand-computed
log-likelihoods on a local 5-question task; the offline MMLU task format."""

import json
import math
import subprocess
import sys

import pytest
import torch

from helpers import assert_user_error, run_cli

QUESTIONS = [
    ("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"], 1),
    ("Which number is even?", ["3", "7", "8", "11"], 2),
    ("What colour is the sky on a clear day?", ["Blue", "Green", "Red", "Black"], 0),
    ("Which animal barks?", ["Cat", "Fish", "Bird", "Dog"], 3),
    ("What is 2 + 2?", ["4", "5", "6", "22"], 0),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "model"
    run_cli("init", "--preset", "tiny", "--out", out, "--model.num_hidden_layers", "2", "--seed", "3", check_rc=0)
    return out


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    from llamaforge.eval.mmlu import format_prompt, task_yaml

    folder = tmp_path_factory.mktemp("tasks")
    rows = []
    for i, (q, choices, answer) in enumerate(QUESTIONS):
        row = {"question": q, "choices": choices, "answer": answer}
        rows.append({"id": i, "subject": "general", "answer": answer, "input_formatted": format_prompt("general", [], row)})
    data = folder / "five.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "five.yaml").write_text(task_yaml("five", data))
    return folder, rows


def hand_logliks(model, tok, rows):
    """log p(" X" | prompt) for X in A..D, computed directly from the model's logits."""
    out = []
    for r in rows:
        ctx = tok(r["input_formatted"]).input_ids
        scores = []
        for letter in "ABCD":
            full = tok(r["input_formatted"] + " " + letter).input_ids
            cont = full[len(ctx):]
            assert full[: len(ctx)] == ctx
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        out.append(scores)
    return out


def test_perplexity_is_exp_of_mean_token_loss(model_dir, tmp_path, mistral):
    from llamaforge.eval.perplexity import perplexity_on_text
    from llamaforge.model.io import load_model

    text = "The quick brown fox jumps over the lazy dog. " * 40
    path = tmp_path / "t.txt"
    path.write_text(text)
    model = load_model(model_dir)
    got = perplexity_on_text(model, mistral, path)
    ids = torch.tensor(mistral(text).input_ids)
    T = model.config.max_position_embeddings
    losses = []
    for s in range(0, len(ids) - 1, T):
        chunk = ids[s : s + T + 1]
        with torch.no_grad():
            logits = model(chunk[None, :-1]).logits[0]
        losses.append(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="none"))
    mean = torch.cat(losses).mean().item()
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
    wide = perplexity_on_text(model, mistral, path, batch=32)  # CUDA's default batch: the same windows, once each
    assert wide["tokens"] == got["tokens"] and wide["perplexity"] == pytest.approx(got["perplexity"], rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(mean * (len(ids) - 1) / math.log(2) / len(text.encode()), rel=1e-5)


@pytest.mark.compat
def test_lm_eval_api_matches_hand_loglikelihoods(model_dir, local_task, mistral):
    pytest.importorskip("lm_eval")
    from llamaforge.eval.harness import run_tasks
    from llamaforge.model.io import load_model

    folder, rows = local_task
    model = load_model(model_dir)
    result = run_tasks(model, mistral, ["five"], include_path=folder, batch_size=2)
    hand = hand_logliks(model, mistral, rows)
    acc = sum(max(range(4), key=lambda i: s[i]) == r["answer"] for s, r in zip(hand, rows)) / len(rows)
    row = result["five"]
    assert row["n"] == 5 and row["kind"] == "plain accuracy (not IRT)"
    assert row["metric"] == "acc_norm" and row["value"] == pytest.approx(acc)  # single letters: acc_norm = acc
    assert row["ci95"][0] <= acc <= row["ci95"][1]


@pytest.mark.compat
def test_course_lm_eval_command_on_exported_folder(model_dir, local_task, mistral, tmp_path):
    pytest.importorskip("lm_eval")
    from llamaforge.model.io import load_model

    folder, rows = local_task
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={model_dir},trust_remote_code=True,dtype=float32", "--tasks", "five", "--batch_size", "4",
           "--output_path", str(out), "--log_samples", "--include_path", str(folder), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mod")})
    assert done.returncode == 0, done.stderr[-3000:]
    # scored through our class: the folder's remote code was loaded (a stock Llama would load nothing)
    assert list((tmp_path / "mod").rglob("modeling_llamaforge.py")), "lm_eval did not load the folder's own code"
    (samples,) = list(out.rglob("samples_five_*.jsonl"))
    recs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    hand = hand_logliks(load_model(model_dir), mistral, rows)
    for rec, scores in zip(recs, hand):
        got = [float(r[0]) for r in rec["filtered_resps"]]
        assert got == pytest.approx(scores, abs=1e-3)
        assert rec["acc_norm"] == float(max(range(4), key=lambda i: scores[i]) == rec["doc"]["answer"])


def test_eval_cli_writes_results_and_refuses_bad_input(model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Hello world. " * 50)
    out = tmp_path / "r.json"
    done = run_cli("eval", "--model", model_dir, "--text", text, "--out", out, check_rc=0)
    assert "perplexity" in done.stdout
    res = json.loads(out.read_text())
    assert res["perplexity"]["text"]["perplexity"] > 1 and res["dtype"] == "float32"
    assert_user_error(run_cli("eval", "--model", model_dir), "nothing to evaluate")
    assert_user_error(run_cli("eval", "--model", model_dir, "--text", tmp_path / "missing.txt"), "does not exist")
    assert_user_error(run_cli("eval", "--model", model_dir, "--tasks", "five", "--irt-params", tmp_path / "x.pkl"),
                      "--irt-params")


def test_offline_mmlu_prompt_format_and_subset():
    from llamaforge.eval.harness import wilson_interval
    from llamaforge.eval.mmlu import format_prompt, subset

    shot = {"question": "1 + 1 = ?", "choices": ["1", "2", "3", "4"], "answer": 1}
    row = {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": 1}
    p = format_prompt("elementary_mathematics", [shot], row)
    assert p == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                 "1 + 1 = ?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    rows = [{"subject": f"s{i % 7}", "id": i} for i in range(500)]
    a, b = subset(rows), subset(rows)
    assert a == b and len(a) == 100 and len({r["id"] for r in a}) == 100
    assert {r["subject"] for r in a} == {f"s{i}" for i in range(7)}
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
