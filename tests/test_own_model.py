"""Bring your own LLaMA (docs/own-model.md): the user's code loaded only when named, every
check against a deliberately broken model, and the whole pipeline on examples/my_llama."""

import json
import time
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_user_error, run_cli, stories_data
from own_models import BROKEN, EXAMPLE, write_broken
from llamaforge.model.adapter import find_blocks, logits_cross_entropy
from llamaforge.model.usercode import BUILTIN, load_code
from llamaforge.modelcheck import CHECKS
from llamaforge.runs import checkpoints, read_metrics
from llamaforge.workflows.check import check_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# A micro example model trained on the stories corpus: seconds per run on 2 cores.
MICRO = ["--preset", "tiny", "--model.hidden_size", "64", "--model.intermediate_size", "128",
         "--model.num_hidden_layers", "2", "--model.num_attention_heads", "4", "--model.num_key_value_heads", "2",
         "--model.max_position_embeddings", "64", "--train.seq_len", "32", "--batch-tokens", "512",
         "--train.micro_batch", "8", "--train.eval_tokens", "512", "--train.precision", "fp32",
         "--train.tensorboard", "false", "--train.eval_tasks", "null", "--train.sample_prompt", "The"]


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory):
    return tmp_path_factory.mktemp("broken")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return stories_data(tmp_path_factory.mktemp("data"), 600)


def failed(rows) -> set[str]:
    return {r.check for r in rows if r.status == "fail"}


# -- the checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BROKEN))
def test_each_broken_model_fails_the_check_that_targets_it(name, broken_root):
    target = BROKEN[name][0]
    (row,) = check_model(load_code(write_broken(name, broken_root)), only=[target])
    assert row.check == target and row.status == "fail" and row.hint, row


@pytest.mark.slow  # the whole table for each of the 8 broken models: ~1 minute
@pytest.mark.parametrize("name", list(BROKEN))
def test_each_broken_model_fails_exactly_its_check_and_the_named_others(name, broken_root):
    target, _, _, others = BROKEN[name]  # others: {check: why it fails too}
    rows = check_model(load_code(write_broken(f"{name}", broken_root / "full")))
    assert failed(rows) == {target, *others}, [(r.check, r.status, r.hint) for r in rows]


def test_the_example_passes_every_check_through_the_cli(tmp_path):
    out = tmp_path / "rows.json"
    done = run_cli("check", "--model-code", EXAMPLE, "--json", out, check_rc=0)
    rows = json.loads(out.read_text())
    assert [r["check"] for r in rows] == list(CHECKS) and len(rows) == 13
    assert all(r["status"] == "pass" for r in rows), rows
    assert "13 of 13 checks passed" in done.stdout
    params = next(r for r in rows if r["check"] == "parameters")["value"]
    assert params["non_embedding"] >= 100_000_000  # the course's floor at llama-150m


def test_our_own_model_passes_every_check_reference_included():
    rows = check_model(BUILTIN)
    assert not failed(rows) and all(r.status == "pass" for r in rows), [(r.check, r.status, r.hint) for r in rows]
    assert next(r for r in rows if r.check == "reference").value <= 1e-4


def test_a_failing_check_exits_1_with_its_hint(broken_root):
    done = run_cli("check", "--model-code", write_broken("mask_ignored", broken_root / "cli"), "--only", "padding,causal")
    assert done.returncode == 1
    assert "padding" in done.stdout and "FAIL" in done.stdout and "attention_mask" in done.stdout


def test_reference_names_another_valid_layout_and_maps_other_names(tmp_path):
    interleaved = check_model(load_code(write_broken("interleaved_rope", tmp_path)), only=["reference"])[0]
    assert interleaved.status == "pass" and "adjacent pairs (2i, 2i+1)" in interleaved.value
    renamed = write_broken("feed_forward_names", tmp_path)
    assert check_model(load_code(renamed), only=["reference"])[0].status == "skip"
    names = tmp_path / "names.json"
    names.write_text(json.dumps([[r"\.feed_forward\.", ".mlp."]]))
    done = run_cli("check", "--model-code", renamed, "--only", "reference", "--reference-names", names, check_rc=0)
    assert "PASS" in done.stdout
    names.write_text("{not json")
    assert_user_error(run_cli("check", "--model-code", renamed, "--reference-names", names), "--reference-names")


def test_logits_loss_equals_cross_entropy_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        logits = torch.randn(2, 9, 50, generator=g).to(dtype).requires_grad_()
        targets = torch.randint(0, 50, (2, 9), generator=g)
        targets[0, :3] = -100
        ours = logits_cross_entropy(logits, targets, chunk=4)  # chunks that do not divide the 18 rows
        ours.backward()
        mine = logits.grad.clone()
        logits.grad = None
        ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        ref.backward()
        assert float(ours) == pytest.approx(float(ref), rel=1e-5)
        assert mine.dtype == dtype and torch.allclose(mine.float(), logits.grad.float(), atol=tol)


def test_blocks_are_found_by_no_split_modules_else_the_largest_module_list():
    code = load_code(EXAMPLE)
    model = code.build(code.make_config(dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                             num_attention_heads=2, num_key_value_heads=1)))
    blocks = find_blocks(model)
    assert len(blocks) == 3 and all(type(b).__name__ == "DecoderLayer" for b in blocks)
    type(model)._no_split_modules = None
    try:
        assert [id(b) for b in find_blocks(model)] == [id(b) for b in model.model.layers]
    finally:
        type(model)._no_split_modules = ["DecoderLayer"]


# -- the code: named, found, refused in one line --------------------------------------------------
def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def test_bad_code_is_refused_in_one_line_naming_the_file_and_line(tmp_path):
    assert_user_error(run_cli("check", "--model-code", tmp_path / "missing"), "does not exist")
    (tmp_path / "notes.txt").write_text("x")
    assert_user_error(run_cli("check", "--model-code", tmp_path / "notes.txt"), "not a .py file")
    assert_user_error(run_cli("check", "--model-code", _write(tmp_path / "empty", {"train.py": "x = 1\n"})),
                      "no configuration_*.py or modeling_*.py")
    bad = _write(tmp_path / "syntax", {"modeling_x.py": "import torch\ndef f(:\n"})
    assert_user_error(run_cli("check", "--model-code", bad), f"{bad / 'modeling_x.py'}:2", "syntax error")
    raising = _write(tmp_path / "raises", {"modeling_x.py": "import torch\n\nraise RuntimeError('boom')\n"})
    assert_user_error(run_cli("check", "--model-code", raising), f"{raising / 'modeling_x.py'}:3", "RuntimeError: boom")
    only_config = _write(tmp_path / "cfg", {"configuration_x.py": "from transformers import PretrainedConfig\n"
                                            "class XConfig(PretrainedConfig):\n    model_type = 'x'\n"})
    assert_user_error(run_cli("check", "--model-code", only_config), "no PreTrainedModel")
    two = _write(tmp_path / "two", {"modeling_two.py": (EXAMPLE / "modeling_my_llama.py").read_text().replace(
        "from .configuration_my_llama", "from .configuration_my_llama") + "\n\nclass OtherForCausalLM(MyLlamaForCausalLM):\n"
        "    pass\n", "configuration_my_llama.py": (EXAMPLE / "configuration_my_llama.py").read_text()})
    assert_user_error(run_cli("check", "--model-code", two, "--only", "runs"), "several models", "--model-class")
    assert_user_error(run_cli("check", "--model-code", two, "--model-class", "Nope"), "OtherForCausalLM")
    run_cli("check", "--model-code", two, "--model-class", "OtherForCausalLM", "--only", "runs", check_rc=0)
    assert_user_error(run_cli("check", "--model-class", "X"), "--model-code")


def test_a_folders_code_runs_only_when_named(tmp_path, data):
    """A model folder that carries code: refused without --model-code, its code never imported."""
    run = tmp_path / "run"
    run_cli("init", "--model-code", EXAMPLE, "--out", run / "m", *MICRO[:12], check_rc=0)
    marker = tmp_path / "imported"
    modeling = run / "m" / "modeling_my_llama.py"
    modeling.write_text(f"open({str(marker)!r}, 'w').close()\n" + modeling.read_text())
    assert_user_error(run_cli("eval", "--model", run / "m", "--data", data), "--model-code", "own code")
    assert_user_error(run_cli("generate", "--model", run / "m", "--prompt", "The"), "--model-code")
    assert not marker.exists()
    assert_user_error(run_cli("export", "--model-code", EXAMPLE, "--model", run / "m", "--out", tmp_path / "x"),
                      "--format llamaforge")


# -- the pipeline on the example -------------------------------------------------------------------
def _train(data, out, *extra):
    return [sys.executable, "-m", "llamaforge", "train", "--model-code", str(EXAMPLE), "--data", str(data),
            "--out", str(out), *MICRO, *map(str, extra)]


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["type"] == "train"}


@pytest.mark.slow  # ~30-40 s: three 30-step runs of the example; CI runs the slow tier
def test_the_example_trains_with_a_falling_loss_and_resumes_exactly_after_sigkill(data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ("--max-steps", 30, "--save-every", 10, "--eval-every", 15)
    subprocess.run(_train(data, straight, *args), check=True, capture_output=True)
    want = _losses(straight)
    assert sorted(want) == list(range(1, 31)) and want[30] < want[1] - 2.0  # it learns
    assert (straight / "final" / "modeling_my_llama.py").exists()
    state = json.loads((checkpoints(straight)[-1] / "state.json").read_text())
    assert state["records"]["code"]["sha256"] == load_code(EXAMPLE).sha256  # the code a checkpoint was trained with
    proc = subprocess.Popen(_train(data, killed, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while 15 not in _losses(killed):  # past the step-10 checkpoint
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(_train(data, killed, *args), check=True, capture_output=True)
    assert _losses(killed) == want  # identical per-step losses
    assert any(r.get("event") == "resumed" and r["checkpoint"] == "step_10" for r in read_metrics(killed))

    changed = tmp_path / "changed"  # resuming with other code: refused, unless allowed
    _write(changed, {"configuration_my_llama.py": (EXAMPLE / "configuration_my_llama.py").read_text(),
                     "modeling_my_llama.py": (EXAMPLE / "modeling_my_llama.py").read_text() + "\n# edited\n"})
    again = [*MICRO, "--max-steps", 32]
    assert_user_error(run_cli("train", "--model-code", changed, "--data", data, "--out", killed, *again),
                      "model code changed", "--allow-code-change")
    assert_user_error(run_cli("train", "--data", data, "--out", killed, *again), "--model-code")
    run_cli("train", "--model-code", changed, "--allow-code-change", "--data", data, "--out", killed, *again, check_rc=0)
    assert max(_losses(killed)) == 32


# Run in a fresh process with llamaforge made unimportable: the folder must need transformers alone.
_WITHOUT_LLAMAFORGE = "import sys; sys.modules['llamaforge'] = None\n"


def test_extend_with_pi_then_the_final_folder_loads_with_transformers_alone(data, tmp_path):
    run, ext = tmp_path / "run", tmp_path / "ext"
    run_cli("train", "--model-code", EXAMPLE, "--data", data, "--out", run, *MICRO, "--max-steps", 6, "--eval-every", 0,
            check_rc=0)
    run_cli("extend", "--model-code", EXAMPLE, "--model", run, "--data", data, "--out", ext, "--seq-len", 128,
            "--preset", "tiny-extend", "--max-steps", 2, "--batch-tokens", 512, "--train.micro_batch", 2,
            "--eval-every", 2, "--train.eval_tokens", 512, "--train.precision", "fp32", "--train.eval_tasks", "null",
            check_rc=0)
    positions = json.loads((ext / "positions.json").read_text())
    assert positions["factor"] == 2.0 and positions["trained_len"] == 64
    script = _WITHOUT_LLAMAFORGE + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(ext / 'final')!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(ext / 'final')!r})
        assert model.config.max_position_embeddings == 128
        assert model.model.layers[0].self_attn.factor == 2.0, model.config
        ids = tok("The cat sat", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        print("ok", out.shape[1] - ids.shape[1])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "mod"), HF_HUB_OFFLINE="1"))
    assert done.returncode == 0 and "ok 5" in done.stdout, done.stderr[-2000:]
    report = run_cli("report", "--run", run, "--run", ext, "--out", tmp_path / "report", check_rc=0)
    assert (tmp_path / "report" / "report.md").exists(), report.stderr
    # the other commands on the user's model: generate, export (as itself), sft
    code = ("--model-code", EXAMPLE)
    done = run_cli("generate", *code, "--model", ext / "final", "--prompt", "The cat", "--max-new-tokens", 4, "--temperature", 0,
                   check_rc=0)
    assert done.stdout.startswith("The cat")
    run_cli("export", *code, "--model", ext, "--format", "llamaforge", "--out", tmp_path / "exported", check_rc=0)
    assert (tmp_path / "exported" / "modeling_my_llama.py").exists()
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"Say {w}", "response": f"{w} {w}."}) + "\n"
                             for w in ["cat", "dog", "bird", "tree"] * 10))
    run_cli("sft", *code, "--model", ext, "--data", chats, "--out", tmp_path / "sft", "--max-steps", 2,
            "--batch-tokens", 256, "--train.micro_batch", 4, "--train.seq_len", 64, "--eval-every", 0,
            "--train.precision", "fp32",
            "--train.tensorboard", "false", check_rc=0)
    assert (tmp_path / "sft" / "final" / "modeling_my_llama.py").exists()


def test_extend_refuses_a_model_whose_rope_scaling_does_nothing(data, tmp_path, broken_root):
    absolute = write_broken("absolute_positions", broken_root / "extend")
    run_cli("train", "--model-code", absolute, "--data", data, "--out", tmp_path / "run", *MICRO, "--max-steps", 1,
            "--eval-every", 0, "--train.optimizer", "adamw", check_rc=0)
    done = run_cli("extend", "--model-code", absolute, "--model", tmp_path / "run", "--data", data, "--out",
                   tmp_path / "ext", "--seq-len", 128, "--preset", "tiny-extend")
    assert_user_error(done, "position_interpolation", "llamaforge check")
    assert not (tmp_path / "ext").exists()


@pytest.mark.slow  # ~1 minute: the lm_eval command and llamaforge eval --tasks
def test_the_course_lm_eval_command_runs_on_the_examples_final_folder(data, tmp_path):
    pytest.importorskip("lm_eval")
    from test_eval import QUESTIONS  # noqa: F401  (the local 5-question task of test_eval)
    from llamaforge.eval.mmlu import format_prompt, task_yaml

    run = tmp_path / "run"  # scored in the loop too: lm-eval on the user's model, one bench row
    run_cli("train", "--model-code", EXAMPLE, "--data", data, "--out", run, *MICRO, "--max-steps", 4, "--eval-every", 4,
            "--train.eval_tasks", "copa_offline", "--train.eval_tasks_limit", 4, check_rc=0)
    bench = [r for r in read_metrics(run) if r["type"] == "bench"]
    assert [r["step"] for r in bench] == [4] and len(bench[0]["items"]["copa_offline"]) == 4
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"id": i, "subject": "general", "answer": a, "input_formatted": format_prompt(
        "general", [], {"question": q, "choices": c, "answer": a})} for i, (q, c, a) in enumerate(QUESTIONS)]
    (tasks / "five.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "five.yaml").write_text(task_yaml("five", tasks / "five.jsonl"))
    script = _WITHOUT_LLAMAFORGE + "import runpy; runpy.run_module('lm_eval', run_name='__main__')"
    cmd = [sys.executable, "-c", script, "--model", "hf", "--model_args",
           f"pretrained={run / 'final'},trust_remote_code=True,dtype=float32", "--tasks", "five", "--include_path",
           str(tasks), "--limit", "3", "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "mod")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "mod").rglob("modeling_my_llama.py")), "lm_eval did not load the folder's own code"
    ours = run_cli("eval", "--model-code", run / "final", "--model", run, "--tasks", "five", "--include-path", tasks,
                   "--limit", "3", "--out", tmp_path / "r.json", check_rc=0)
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["five"]["n"] == 3, ours.stdout


@pytest.mark.slow  # a torchrun launch or a compile each: ~1 minute
@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun not installed")
@pytest.mark.parametrize("mode", ["ddp-muon", "fsdp2-adamw", "compiled"])
def test_the_example_under_ddp_fsdp2_and_compile_equals_one_eager_process(data, tmp_path, mode):
    """The blocks found by _no_split_modules: FSDP2 units, per-block torch.compile, Muon's matrices."""
    extra = ["--max-steps", 3, "--save-every", 0, "--eval-every", 0, "--train.micro_batch", 4]
    extra += {"ddp-muon": ["--train.optimizer", "muon"], "fsdp2-adamw": ["--train.optimizer", "adamw", "--train.fsdp", "true"],
              "compiled": []}[mode]
    subprocess.run(_train(data, tmp_path / "one", *extra, "--train.compile", "false"), check=True, capture_output=True)
    if mode == "compiled":
        cmd = _train(data, tmp_path / "two", *extra, "--train.compile", "true")
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
               *_train(data, tmp_path / "two", *extra, "--train.compile", "false")[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3] and all(abs(a[s] - b[s]) <= 1e-4 for s in a), (a, b)
    assert (tmp_path / "two" / "final" / "modeling_my_llama.py").exists()
    started = next(r for r in read_metrics(tmp_path / "two") if r.get("event") == "started")
    assert started["world"] == (1 if mode == "compiled" else 2)
    assert started["compile"].startswith("compiled") == (mode == "compiled")


@pytest.mark.slow  # two runs of the example
def test_the_example_resumes_exactly_after_sigterm(data, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ("--max-steps", 16, "--save-every", 0, "--eval-every", 0)
    subprocess.run(_train(data, straight, *args), check=True, capture_output=True)
    proc = subprocess.Popen(_train(data, stopped, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while 5 not in _losses(stopped):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 75  # stopped with a checkpoint
    assert checkpoints(stopped)
    subprocess.run(_train(data, stopped, *args), check=True, capture_output=True)
    assert _losses(stopped) == _losses(straight)
