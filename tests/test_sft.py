"""SFT: masks (zero gradient outside assistant turns), the template through transformers, bad lines,
and a tiny model that learns to answer and stop."""

import json

import pytest
import torch

from helpers import assert_user_error, micro, run_cli
from llamaforge.data.sft import CHAT_TEMPLATE, SFTBatches, tokenize_conversations
from llamaforge.model.hf.modeling_llamaforge import causal_lm_loss

CONV = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
                     {"role": "assistant", "content": "Six."}]}


@pytest.fixture
def tok(mistral):
    mistral.chat_template = CHAT_TEMPLATE
    return mistral


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_only_assistant_tokens_are_targets_and_get_gradient(tmp_path, tok, small_model):
    convs, stats = tokenize_conversations(str(write(tmp_path / "c.jsonl", [CONV, {"prompt": "Hi", "response": "Hello!"}])),
                                          tok, max_len=200)
    assert stats.kept == 2
    ids, labels = convs[0]
    targets = [t for t in labels if t != -100]
    assert tok.decode(targets) == "4.</s>Six.</s>"  # content and each turn's end token, nothing else
    x, y = SFTBatches(convs, [], 2, tok.pad_token_id).next_batch()
    assert (y != -100).sum() == sum(sum(t != -100 for t in lab) for _, lab in convs)
    m = small_model(vocab_size=32000)
    logits = m(input_ids=x).logits
    logits.retain_grad()
    causal_lm_loss(logits, y).backward()
    g = logits.grad.abs().sum(-1)  # (B, T)
    assert torch.all(g[y == -100] == 0)  # prompt, system and padding positions
    assert torch.all(g[y != -100] > 0)


def test_template_round_trips_through_plain_transformers(tmp_path, tok, small_model):
    from transformers import AutoTokenizer

    from llamaforge.model.io import save_model

    save_model(small_model(vocab_size=32000), tok, tmp_path / "m")
    again = AutoTokenizer.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert again.chat_template == CHAT_TEMPLATE
    convs, _ = tokenize_conversations(str(write(tmp_path / "c.jsonl", [CONV])), tok, max_len=200)
    assert again.apply_chat_template(CONV["messages"], tokenize=True, return_dict=True)["input_ids"] == convs[0][0]


def test_bad_lines_are_skipped_and_counted_or_refused(tmp_path, tok):
    rows = [CONV, "{not json", {"messages": [{"role": "user", "content": "no answer"}]},
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"prompt": "long " * 400, "response": "x"}]
    path = write(tmp_path / "c.jsonl", rows)
    convs, stats = tokenize_conversations(str(path), tok, max_len=200)
    assert stats.read == 5 and stats.kept == 1
    assert stats.skipped == {"not JSON": 1, "no assistant turn": 1, "unknown role 'robot'": 1,
                             "longer than the context": 1}
    with pytest.raises(Exception, match=r"c.jsonl:2: not JSON"):
        tokenize_conversations(str(path), tok, max_len=200, strict=True)


QA = [(f"What is the code word for {w}?", f"The code word for {w} is {c}.") for w, c in
      [("red", "apple"), ("blue", "ocean"), ("green", "forest"), ("black", "night"), ("white", "snow"),
       ("yellow", "sun"), ("pink", "rose"), ("grey", "stone")]]


def test_tiny_model_learns_to_answer_and_stop(tmp_path):
    data = write(tmp_path / "qa.jsonl", [{"prompt": q, "response": a} for q, a in QA] * 4)
    init = tmp_path / "init"
    run_cli("init", "--preset", "tiny", "--out", init, *micro(hidden=64, layers=2), check_rc=0)
    # Muon + WSD: 8/8 after 120 steps (37 s here); AdamW + cosine needed 300 (0/8 after 120)
    done = run_cli("sft", "--model", init, "--data", data, "--out", tmp_path / "run", "--max-steps", "120",
                   "--lr", "3e-3", "--batch-tokens", "2048", "--train.seq_len", "64", "--train.micro_batch", "32",
                   "--train.optimizer", "muon", "--train.schedule", "wsd", "--train.min_lr_ratio", "0",
                   "--eval-every", "60", "--val-fraction", "0", check_rc=0)
    assert "32 used" in done.stdout
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "eval" for r in evals)
    from llamaforge.workflows.generate import generate
    from llamaforge.model.io import load_model
    from llamaforge.tokenizer import load_tokenizer

    final = tmp_path / "run" / "final"
    model, tok = load_model(final), load_tokenizer(str(final))
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               .removeprefix(tok.bos_token) for q, _ in QA]
    outs = generate(model, tok, prompts, max_new_tokens=24, temperature=0)
    correct = sum(o.strip() == a for o, (_, a) in zip(outs, QA))
    assert correct >= 6, outs  # most of 8, and each stopped at EOS (nothing after the answer)
    # the same through transformers' own Auto class and generate(), KV cache on, one prompt at a time
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    answers = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        out = auto.generate(ids, use_cache=True, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert sum(o == a for o, (_, a) in zip(answers, QA)) >= 6, answers
    cli = run_cli("generate", "--model", final, "--chat", "--prompt", QA[0][0], "--temperature", "0", check_rc=0)
    assert QA[0][1] in cli.stdout


def test_sft_refuses_missing_data_and_all_bad(tmp_path):
    init = tmp_path / "init"
    run_cli("init", "--preset", "tiny", "--out", init, "--model.num_hidden_layers", "1", check_rc=0)
    assert_user_error(run_cli("sft", "--model", init, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "r"),
                      "does not exist")
    bad = write(tmp_path / "bad.jsonl", [{"text": "no conversation"}])
    assert_user_error(run_cli("sft", "--model", init, "--data", bad, "--out", tmp_path / "r"), "no usable conversation")
    assert_user_error(run_cli("sft", "--model", init, "--data", bad, "--out", tmp_path / "r", "--strict"), "bad.jsonl:1")


def test_sft_resumes_exactly(tmp_path):
    """A fine-tune that lost its last checkpoint resumes from the previous one with the same losses."""
    import shutil

    from llamaforge.runs import read_metrics

    data = write(tmp_path / "qa.jsonl", [{"prompt": q, "response": a} for q, a in QA] * 2)
    init = tmp_path / "init"
    run_cli("init", "--preset", "tiny", "--out", init, *micro(), check_rc=0)
    args = ["sft", "--model", init, "--data", data, "--out", tmp_path / "run", "--max-steps", "6", "--save-every", "3",
            "--batch-tokens", "256", "--train.seq_len", "64", "--train.micro_batch", "2", "--eval-every", "3"]
    run_cli(*args, check_rc=0)
    losses = lambda: {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if r["type"] == "train"}  # noqa: E731
    want = losses()
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_6")
    shutil.rmtree(tmp_path / "run" / "final")
    run_cli(*args, check_rc=0)
    assert losses() == want
