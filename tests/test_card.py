"""Model cards from a run's records and from a bare init folder; push's failure modes."""

import os


from helpers import assert_user_error, micro, run_cli


def front_matter(text):
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_of_a_bare_init_folder(tmp_path):
    out = tmp_path / "init"
    run_cli("init", "--preset", "tiny", "--out", out, "--model.num_hidden_layers", "1", check_rc=0)
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and "llamaforge" in meta["tags"]
    assert "untrained" in card and "trust_remote_code=True" in card and "lm_eval --model hf" in card
    import torch
    import transformers

    assert f"torch {torch.__version__}" in card and f"transformers {transformers.__version__}" in card
    # the stock export carries the card too
    run_cli("export", "--model", out, "--format", "llama", "--out", tmp_path / "llama", check_rc=0)
    assert "untrained" in (tmp_path / "llama" / "README.md").read_text()


def test_card_of_a_short_run_with_eval(tmp_path):
    import json

    from llamaforge.data.prepare import prepare

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"Sentence number {i} about cats and dogs."}) + "\n"
                                              for i in range(300)))
    prepare(str(tmp_path / "c.jsonl"), tmp_path / "d", val_fraction=0.1, workers=0, progress=False)
    run = tmp_path / "run"
    run_cli("train", "--data", tmp_path / "d", "--out", run, "--preset", "tiny", *micro(), "--max-steps", "3", "--eval-every", "3", "--batch-tokens", "1024",
            "--train.micro_batch", "4", "--train.eval_tokens", "512", "--train.precision", "fp32", check_rc=0)
    card = (run / "final" / "README.md").read_text()
    assert "## Pretraining" in card and "Steps: 3" in card and "validation loss" in card
    assert "AdamW" in card and "fp32" in card
    res = tmp_path / "eval.json"
    run_cli("eval", "--model", run / "final", "--data", tmp_path / "d", "--out", res, check_rc=0)
    res_json = json.loads(res.read_text())
    res_json["tasks"] = {"mmlu_offline_100": {"metric": "acc_norm", "value": 0.25, "ci95": [0.17, 0.34], "n": 100,
                                             "kind": "plain accuracy (not IRT)"}}
    res.write_text(json.dumps(res_json))
    run_cli("export", "--model", run / "final", "--format", "llamaforge", "--eval", res, "--out", tmp_path / "exp",
            check_rc=0)
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "plain accuracy (not IRT)" in card and "IRT estimate" not in card and "| val | perplexity |" in card


def test_push_failure_modes(tmp_path):
    folder = tmp_path / "m"
    run_cli("init", "--preset", "tiny", "--out", folder, "--model.num_hidden_layers", "1", check_rc=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no stored login
    assert_user_error(run_cli("push", "--model", folder, "--repo", "me/x", env=env), "no Hugging Face token", "HF_TOKEN")
    # refused before any token or network question: in-process through the entry point
    assert_user_error(run_cli("push", "--model", folder, "--repo", "bad name"), "NAMESPACE/NAME")
    assert_user_error(run_cli("push", "--model", tmp_path, "--repo", "me/x"), "not a model folder")
    env.update(HF_TOKEN="hf_dummy", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2")
    done = run_cli("push", "--model", folder, "--repo", "me/x", env=env, timeout=120)
    assert_user_error(done, "cannot reach the Hugging Face Hub", "nothing was uploaded")
