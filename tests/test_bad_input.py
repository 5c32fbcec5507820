"""Careless and hostile input, one row per class: exit code 2, one line on stderr, no traceback, and
every file that was there before is still there, byte for byte. Plus the lock, the damaged-checkpoint
fallback, config-after-check, bounded prepare memory and workers that die with their parent."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_user_error, micro, run_cli, write_stories
from hostile import HOSTILE, hostile_case
from llamaforge.data.prepare import prepare
from llamaforge.runs import checkpoints, read_metrics

TRAIN = ["--preset", "tiny", *micro(positions=64), "--train.seq_len", "32", "--train.micro_batch", "2",
         "--batch-tokens", "128", "--train.eval_tokens", "128", "--train.sample_prompt", "The", "--eval-every", "0",
         "--train.precision", "fp32", "--train.optimizer", "adamw", "--train.schedule", "cosine"]


def prepare_peak(source: Path, out: Path) -> tuple[int, int]:
    """(train tokens, peak RSS in MB) of `prepare(source, out)` in a fresh process. The peak is the
    child's own VmHWM (its memory map is new at exec); getrusage's ru_maxrss carries the parent's
    figure across fork + exec (pytest's, after it built the input)."""
    code = ("import sys; from llamaforge.data.prepare import prepare; "
            "m = prepare(sys.argv[1], sys.argv[2], workers=0, progress=False, val_fraction=0); "
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')); "
            "print(m['splits']['train']['tokens'], int(hwm.split()[1]) // 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(source), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    tokens, peak_mb = map(int, done.stdout.split())
    return tokens, peak_mb


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 (what must survive a refused command)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".lock" not in p.name  # our lock files
            and not p.name.endswith(".max.json")}  # and caches of a data file's largest id


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared corpus, a trained micro run with two checkpoints, a model folder and user files."""
    root = tmp_path_factory.mktemp("world")
    write_stories(root / "c.jsonl", 300)
    prepare(str(root / "c.jsonl"), root / "data", val_fraction=0.05, workers=0, progress=False)
    run_cli("train", "--data", root / "data", "--out", root / "run", *TRAIN, "--max-steps", "4", "--save-every", "2",
            "--train.keep_last", "3", check_rc=0)
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work\n")
    (root / "notes.txt").write_text("do not overwrite\n")
    (root / "bad.yaml").write_text("model: [1, 2\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    return root


def case(world, tmp_path, name):
    """Build one row's input; returns (argv, words the error line must contain)."""
    w, d, run = world, world / "data", world / "run"
    if name == "prepare-into-user-folder":
        return ["prepare", "--source", w / "c.jsonl", "--out", w / "mine", "--workers", "0"], ["mine", "did not write"]
    if name == "prepare-force-user-folder":
        return ["prepare", "--source", w / "c.jsonl", "--out", w / "mine", "--force", "--workers", "0"], ["did not write"]
    if name == "init-into-user-folder":
        return ["init", "--preset", "tiny", "--out", w / "mine"], ["did not write"]
    if name == "init-onto-user-file":
        return ["init", "--preset", "tiny", "--out", w / "notes.txt"], ["a file", "did not write"]
    if name == "export-onto-its-run":
        return ["export", "--model", run / "final", "--out", run], ["did not write"]
    if name == "train-into-user-folder":
        return ["train", "--data", d, "--out", w / "mine", *TRAIN, "--max-steps", "1"], ["did not write"]
    if name == "report-into-user-folder":
        return ["report", "--run", run, "--out", w / "mine"], ["did not write"]
    if name == "eval-out-is-a-folder":
        return ["eval", "--model", run / "final", "--data", d, "--out", w / "mine"], ["is a folder"]
    if name == "eval-out-is-a-user-file":
        return ["eval", "--model", run / "final", "--data", d, "--out", w / "notes.txt"], ["did not write"]
    if name == "eval-batch-size-0":
        return ["eval", "--model", run / "final", "--data", d, "--batch-size", "0"], ["--batch-size", "[1,"]
    if name == "eval-unknown-offline-task":
        return ["eval", "--model", run / "final", "--tasks", "hellaswagg_offline"], ["hellaswagg_offline", "capability"]
    if name == "train.eval_tasks=nonsense_offline":
        return ["train", "--data", d, "--out", tmp_path / "r", *TRAIN, "--train.eval_tasks", "nonsense_offline"],\
            ["nonsense_offline", "capability"]
    if name == "train.compile=sometimes":
        return ["train", "--data", d, "--out", tmp_path / "r", *TRAIN, "--train.compile", "sometimes"],\
            ["train.compile", "auto, true, false"]
    if name == "yaml-malformed":
        return ["train", "--data", d, "--out", tmp_path / "r", "--config", w / "bad.yaml"], ["not valid YAML"]
    if name == "yaml-not-a-mapping":
        return ["train", "--data", d, "--out", tmp_path / "r", "--config", w / "list.yaml"], ["not a mapping"]
    if name == "config-is-a-directory":
        return ["train", "--data", d, "--out", tmp_path / "r", "--config", w], ["not a file"]
    for key, value in (("micro_batch", "0"), ("micro_batch", "-1"), ("seq_len", "-4"), ("batch_tokens", "0"),
                       ("max_steps", "0")):
        if name == f"train.{key}={value}":  # the plain --batch-tokens flag wins over --train.batch_tokens
            flag = ["--batch-tokens", value] if key == "batch_tokens" else [f"--train.{key}", value]
            return ["train", "--data", d, "--out", tmp_path / "r", *TRAIN, *flag], [f"train.{key}"]
    for key, value in (("num_attention_heads", "0"), ("num_hidden_layers", "-1"), ("hidden_size", "0")):
        if name == f"model.{key}={value}":
            return ["init", "--preset", "tiny", "--out", tmp_path / "m", f"--model.{key}", value], [f"model.{key}"]
    if name in ("bin-truncated", "bin-empty", "meta-not-json", "meta-wrong-field"):
        bad = tmp_path / "data"
        shutil.copytree(d, bad)
        if name == "bin-truncated":
            (bad / "train.bin").write_bytes((bad / "train.bin").read_bytes()[:1001])
        elif name == "bin-empty":
            (bad / "train.bin").write_bytes(b"")
        elif name == "meta-not-json":
            (bad / "meta.json").write_text('{"format": "llamaforge-tokens-v1", "dty')
        else:
            meta = json.loads((bad / "meta.json").read_text())
            meta["dtype"] = "float64"
            (bad / "meta.json").write_text(json.dumps(meta))
        words = {"bin-truncated": ["train.bin", "truncated"], "bin-empty": ["train.bin"],
                 "meta-not-json": ["not valid JSON"], "meta-wrong-field": ["dtype"]}[name]
        return ["train", "--data", bad, "--out", tmp_path / "r", *TRAIN, "--max-steps", "1"], words
    if name == "vocab-too-small-for-data":
        from llamaforge.tokenizer import train_bpe

        bpe = train_bpe((f"line {i} of text" for i in range(200)), 300)
        bpe.save_pretrained(tmp_path / "bpe")
        run_cli("init", "--preset", "tiny", *micro(), "--model.vocab_size", "512", "--tokenizer", tmp_path / "bpe",
                "--out", tmp_path / "small", check_rc=0)
        return ["eval", "--model", tmp_path / "small", "--data", d], ["vocabulary", "embeddings"]
    if name == "config-json-invalid":
        shutil.copytree(run / "final", tmp_path / "m")
        (tmp_path / "m" / "config.json").write_text("{not json")
        return ["generate", "--model", tmp_path / "m", "--prompt", "x"], ["config.json"]
    for flag, value in (("--max-new-tokens", "0"), ("--max-new-tokens", "-3"), ("--temperature", "-1"),
                        ("--top-p", "2"), ("--top-p", "0")):
        if name == f"generate{flag}={value}":
            return ["generate", "--model", run / "final", "--prompt", "x", flag, value], [flag]
    if name == "gpt2-prompt-longer-than-positions":
        run_cli("init", "--preset", "gpt2-tiny", *micro(heads=4, kv_heads=4, positions=16), "--out", tmp_path / "g",
                check_rc=0)
        return ["generate", "--model", tmp_path / "g", "--prompt", "word " * 30, "--max-new-tokens", "4"],\
            ["learned positions"]
    if name == "train-data-is-a-hub-name":  # the hint names the real command
        return ["train", "--data", "hf:Skylion007/openwebtext", "--out", tmp_path / "r", *TRAIN],\
            ["llamaforge prepare --source hf:Skylion007/openwebtext --out data/openwebtext"]
    if name == "train.time_limit=soon":
        return ["train", "--data", d, "--out", tmp_path / "r", *TRAIN, "--train.time_limit", "soon"], ["time_limit"]
    if name == "resume-with-another-optimizer":  # a good checkpoint: the message must not blame it
        return ["train", "--data", d, "--out", run, *TRAIN, "--train.optimizer", "muon", "--max-steps", "6"],\
            ["train.optimizer 'adamw' -> 'muon'", "config.yaml"]
    if name in ("generate-past-the-positions", "generate-chat-past-the-positions"):  # would run until killed
        model = run / "final"
        if "chat" in name:  # the chat-template path: a copy of the folder given the template sft writes
            from llamaforge.data.sft import CHAT_TEMPLATE

            model = tmp_path / "chat"
            shutil.copytree(run / "final", model)
            cfg = json.loads((model / "tokenizer_config.json").read_text())
            (model / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=CHAT_TEMPLATE)))
        chat = ["--chat"] if "chat" in name else []
        return ["generate", "--model", model, "--prompt", "x", "--max-new-tokens", "100000", *chat],\
            ["100000", "positions", "llamaforge extend"]
    if name == "export-garbage-weights":  # not a safetensors file at all, behind the right name
        shutil.copytree(run / "final", tmp_path / "m")
        (tmp_path / "m" / "model.safetensors").write_bytes(os.urandom(4096))
        return ["export", "--model", tmp_path / "m", "--format", "llama", "--out", tmp_path / "o"],\
            ["model.safetensors", "damaged"]
    if name in ("generate-truncated-weights", "eval-truncated-weights"):
        shutil.copytree(run / "final", tmp_path / "m")
        weights = tmp_path / "m" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        argv = ["generate", "--model", tmp_path / "m", "--prompt", "x"] if name.startswith("generate") else \
            ["eval", "--model", tmp_path / "m", "--data", d]
        return argv, ["model.safetensors", "damaged", "copy the folder again"]
    hostile = hostile_case(world, tmp_path, name)
    if hostile is not None:
        return hostile
    if name == "resume-with-another-shape":
        return ["train", "--data", d, "--out", run, *TRAIN, "--model.hidden_size", "48", "--max-steps", "6"],\
            ["does not fit"]
    raise KeyError(name)


CASES = ["prepare-into-user-folder", "prepare-force-user-folder", "init-into-user-folder", "init-onto-user-file",
         "export-onto-its-run", "train-into-user-folder", "report-into-user-folder", "eval-out-is-a-folder",
         "eval-out-is-a-user-file", "eval-batch-size-0", "eval-unknown-offline-task",
         "train.eval_tasks=nonsense_offline", "train.compile=sometimes", "yaml-malformed",
         "yaml-not-a-mapping", "config-is-a-directory",
         "train.micro_batch=0", "train.micro_batch=-1", "train.seq_len=-4", "train.batch_tokens=0", "train.max_steps=0",
         "model.num_attention_heads=0", "model.num_hidden_layers=-1", "model.hidden_size=0", "bin-truncated",
         "bin-empty", "meta-not-json", "meta-wrong-field", "vocab-too-small-for-data", "config-json-invalid",
         "generate--max-new-tokens=0", "generate--max-new-tokens=-3", "generate--temperature=-1", "generate--top-p=2",
         "generate--top-p=0", "gpt2-prompt-longer-than-positions", "resume-with-another-shape",
         "train-data-is-a-hub-name", "train.time_limit=soon", "resume-with-another-optimizer",
         "generate-past-the-positions", "generate-chat-past-the-positions", "generate-truncated-weights",
         "eval-truncated-weights", "export-garbage-weights", *HOSTILE]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_and_loses_nothing(world, tmp_path, name, capsys):
    """In-process through the CLI's own entry point (fast); the subprocess path is covered elsewhere."""
    from llamaforge.cli import main

    argv, words = case(world, tmp_path, name)
    before = snapshot(world), snapshot(tmp_path)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert_user_error(subprocess.CompletedProcess(argv, code, "", err), *words)
    assert (snapshot(world), snapshot(tmp_path)) == before


def test_a_second_process_on_the_same_run_is_refused_with_the_holders_pid(world, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llamaforge.runs import lock_run\n"
                               "with lock_run(__import__('pathlib').Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(60)", str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = run_cli("train", "--data", world / "data", "--out", run, *TRAIN, "--max-steps", "1")
        assert_user_error(done, "in use", f"PID {holder.pid}")
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    run_cli("train", "--data", world / "data", "--out", run, *TRAIN, "--max-steps", "1", check_rc=0)  # lock died


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    shutil.rmtree(run / "final")
    steps = [p.name for p in checkpoints(run)]
    assert steps[-2:] == ["step_2", "step_4"]
    weights = run / "checkpoints" / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    done = run_cli("train", "--data", world / "data", "--out", run, *TRAIN, "--max-steps", "4", "--save-every", "2",
                   "--train.keep_last", "3", check_rc=0)
    assert "step_4 is damaged" in done.stderr and "Traceback" not in done.stderr
    events = [r for r in read_metrics(run) if r["type"] == "event"]
    assert any(e["event"] == "checkpoint_invalid" and e["checkpoint"] == "step_4" for e in events)
    assert any(e["event"] == "resumed" and e["checkpoint"] == "step_2" for e in events)
    want = {r["step"]: r["loss"] for r in read_metrics(world / "run") if r["type"] == "train"}
    got = {r["step"]: r["loss"] for r in read_metrics(run) if r["type"] == "train"}
    assert got == want  # steps 3-4 retrained from step_2, exactly
    for p in checkpoints(run):  # every checkpoint damaged: refused, nothing deleted
        (p / "state.json").write_text("garbage")
    before = snapshot(run)
    assert_user_error(run_cli("train", "--data", world / "data", "--out", run, *TRAIN, "--max-steps", "6"),
                      "no usable checkpoint")
    assert snapshot(run) == before


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_in_a_checkpoint_never_runs(world, tmp_path):
    import torch

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    shutil.rmtree(run / "final")
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "rng.pt"):
        latest = checkpoints(run)[-1]
        good = (latest / name).read_bytes()
        torch.save({"state": _Payload(marker)}, latest / name)
        done = run_cli("train", "--data", world / "data", "--out", run, *TRAIN, "--max-steps", "6")
        assert_user_error(done, "cannot be read safely")
        assert not marker.exists()
        (latest / name).write_bytes(good)


def test_resume_with_another_shape_leaves_config_yaml_as_it_was(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    before = (run / "config.yaml").read_bytes()
    assert_user_error(run_cli("train", "--data", world / "data", "--out", run, *TRAIN, "--model.hidden_size", "48",
                              "--max-steps", "6"), "does not fit")
    assert (run / "config.yaml").read_bytes() == before


def test_a_partial_last_metrics_line_does_not_break_report_or_resume(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    shutil.rmtree(run / "final")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 5, "lo')  # power cut mid-write
    run_cli("report", "--run", run, "--out", tmp_path / "rep", check_rc=0)
    run_cli("train", "--data", world / "data", "--out", run, *TRAIN, "--max-steps", "5", check_rc=0)
    assert [r["step"] for r in read_metrics(run) if r["type"] == "train"] == [1, 2, 3, 4, 5]


def test_mmlu_cache_folders_differ_for_different_subject_lists():
    from llamaforge.eval.mmlu import selection_tag

    many = [f"subject_with_a_long_name_{i}" for i in range(8)]
    assert selection_tag(many) != selection_tag(many[:7])
    assert selection_tag(many) == selection_tag(list(reversed(many)))


def test_a_huge_single_line_document_is_tokenized_in_bounded_memory(tmp_path):
    text = " ".join(f"word{i % 1000}" for i in range(2_500_000))  # ~22 MB on one line
    (tmp_path / "big.txt").write_text(text)
    tokens, peak_mb = prepare_peak(tmp_path / "big.txt", tmp_path / "d")
    assert tokens > 2_500_000
    assert peak_mb < 1000, f"peak RSS {peak_mb} MB"  # measured ~650 MB for a 47 MB line (was 4.3 GB)


def test_long_documents_tokenized_in_pieces_give_the_same_ids(mistral, monkeypatch):
    import random

    import llamaforge.data.prepare as P

    P._init_worker(mistral.backend_tokenizer.to_str(), True)
    monkeypatch.setattr(P, "PIECE_CHARS", 40)
    rng = random.Random(3)
    words = ["hello", "world,", "über", "naïve", "a", "日本語", "x1", "  two", "end.\n", "tab\tsep", "<s>"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        whole = [1, *P._worker_tok.encode(text, add_special_tokens=False).ids, 2]
        assert P._long_doc(text, 1, 2, "uint16").tolist() == whole, text


def test_generation_never_runs_past_the_models_positions(mistral, small_model):
    """The library's generate() refuses like the CLI; the sample during training is clipped to the
    positions left after its prompt (and skipped when none are left)."""
    from llamaforge.errors import UserError
    from llamaforge.train.bench import sample_text
    from llamaforge.workflows.generate import generate

    model = small_model(vocab_size=32000, max_position_embeddings=16)
    with pytest.raises(UserError, match="16 positions"):
        generate(model, mistral, ["The cat"], max_new_tokens=15)
    asked = []
    real = model.generate
    model.generate = lambda ids, **kw: asked.append(kw["max_new_tokens"]) or real(ids, **kw)
    sample_text(model, mistral, "The cat sat", torch.device("cpu"), max_new_tokens=32)
    assert asked == [16 - len(mistral("The cat sat").input_ids)]
    assert sample_text(model, mistral, "word " * 20, torch.device("cpu")) == "" and len(asked) == 1


def test_text_without_spaces_tokenized_in_windows_gives_the_same_ids(mistral, monkeypatch):
    """Chinese, Japanese, Thai, base64 and minified code (no space to cut at) are cut by character count
    with LOOK_CHARS of context; the guard doubles a context that is too short. Tiny sizes here, so the
    cuts and the guard are exercised hundreds of times."""
    import random

    import llamaforge.data.prepare as P

    P._init_worker(mistral.backend_tokenizer.to_str(), True)
    monkeypatch.setattr(P, "PIECE_CHARS", 24)
    monkeypatch.setattr(P, "LOOK_CHARS", 4)
    rng = random.Random(5)
    alphabets = ["的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年", "日本語のテキストですカタカナひらがな漢字",
                 "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ", "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
                 "function(a,b){return[a+b,{x:1}];}var=>;\n\t", "😀👍🏽ß∑√ĳ\u200b"]
    for _ in range(150):
        chars = rng.choice(alphabets) + (rng.choice(alphabets) if rng.random() < 0.3 else "")
        text = "".join(rng.choice(chars) for _ in range(rng.randint(60, 400)))
        if rng.random() < 0.3:  # an occasional space far apart: pieces cut at spaces, then windows inside
            i = rng.randrange(len(text))
            text = text[:i] + " " + text[i + 1 :]
        whole = [1, *P._worker_tok.encode(text, add_special_tokens=False).ids, 2]
        assert P._long_doc(text, 1, 2, "uint16").tolist() == whole, text


@pytest.mark.slow  # ~1 min: 40 MB of Chinese through the tokenizer
def test_a_40_mb_document_without_spaces_stays_under_1_gb(tmp_path):
    chars = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"
    text = "".join(chars[(i * 7 + i // 31) % len(chars)] for i in range(14_000_000))
    (tmp_path / "zh.txt").write_text(text)  # 42 MB of UTF-8, one line, no space
    tokens, peak_mb = prepare_peak(tmp_path / "zh.txt", tmp_path / "d")
    assert tokens > 1_000_000
    assert peak_mb < 1000, f"peak RSS {peak_mb} MB"


def test_prepare_workers_die_with_their_parent(tmp_path):
    psutil = pytest.importorskip("psutil")
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(40000):
            f.write(json.dumps({"text": f"document {i} " + "some words here " * 40}) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "llamaforge", "prepare", "--source", str(tmp_path / "c.jsonl"),
                             "--out", str(tmp_path / "d"), "--workers", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(psutil.Process(proc.pid).children()) < 2:
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children()
    assert children, "prepare started no workers"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"workers still running: {[p.pid for p in alive]}"
