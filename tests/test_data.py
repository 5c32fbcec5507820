"""prepare: formats, round trip, split, robustness, errors; the training loader."""

import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import assert_user_error, run_cli
from llamaforge.data.loader import TokenWindows
from llamaforge.data.prepare import open_split, prepare, read_meta

DOCS = [f"Document number {i}: the quick brown fox, naïve café {'x' * (i % 7)}.\nSecond line {i * i}." for i in range(200)]
DOCS[5] = " starts with a space and ends with one "
DOCS[6] = "a literal <s> and </s> inside the text"


def documents(data_dir, split, tok):
    """The documents stored in a split, decoded (split at BOS, EOS stripped)."""
    ids = np.asarray(open_split(data_dir, split))
    starts = np.flatnonzero(ids == tok.bos_token_id)
    ends = list(starts[1:]) + [len(ids)]
    out = []
    for s, e in zip(starts, ends):
        assert ids[e - 1] == tok.eos_token_id
        out.append(tok.decode(ids[s + 1 : e - 1].tolist()))
    return out


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "other": 1}) + "\n")
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_round_trip_and_deterministic_split(tmp_path, mistral, workers):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    meta = prepare(str(src), tmp_path / "d", val_fraction=0.2, workers=workers, progress=False)
    train, val = documents(tmp_path / "d", "train", mistral), documents(tmp_path / "d", "val", mistral)
    assert sorted(train + val) == sorted(DOCS)
    assert train == [d for d in DOCS if d in set(train)]  # order kept inside a split
    assert 10 < len(val) < 70 and meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in train)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 32000
    # the split depends on the text only: shuffled input -> same validation documents
    shuffled = write_jsonl(tmp_path / "s.jsonl", DOCS[::-1])
    prepare(str(shuffled), tmp_path / "d2", val_fraction=0.2, workers=workers, progress=False)
    assert sorted(documents(tmp_path / "d2", "val", mistral)) == sorted(val)
    assert (tmp_path / "d" / "tokenizer" / "tokenizer.json").exists()


def test_formats_and_compressions(tmp_path, mistral):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = DOCS[:40]
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl.gz", docs[:10], gzip.open)
    write_jsonl(src / "b.jsonl.xz", docs[10:20], lzma.open)
    (src / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[20].encode()))
    (src / "d.txt").write_text(docs[21])
    (src / "e.json").write_text(json.dumps([{"body": d} for d in docs[22:26]]).replace('"body"', '"text"'))
    pq.write_table(pa.table({"text": docs[26:33]}), src / "f.parquet")
    import csv

    with open(src / "g.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[i, d] for i, d in enumerate(docs[33:40])])
    prepare(str(src), tmp_path / "d", val_fraction=0.0, workers=1, progress=False)
    assert sorted(documents(tmp_path / "d", "train", mistral)) == sorted(docs)
    # a glob picks a subset
    prepare(str(src / "*.parquet"), tmp_path / "g", val_fraction=0.0, workers=0, progress=False)
    assert documents(tmp_path / "g", "train", mistral) == docs[26:33]


def test_hf_source_reads_a_local_dataset(tmp_path, mistral):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS[:20]}).save_to_disk(str(tmp_path / "ds"))
    prepare(f"hf:{tmp_path / 'ds'}:train", tmp_path / "d", val_fraction=0.0, workers=0, progress=False)
    assert documents(tmp_path / "d", "train", mistral) == DOCS[:20]


def test_empty_and_invalid_utf8_are_counted(tmp_path, mistral):
    lines = [json.dumps({"text": "good one"}).encode(), json.dumps({"text": "   "}).encode(),
             b'{"text": "bad \xff byte"}', json.dumps({"text": ""}).encode()]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    meta = prepare(str(tmp_path / "c.jsonl"), tmp_path / "d", val_fraction=0.0, workers=0, progress=False)
    assert meta["skipped_empty"] == 2 and meta["invalid_utf8_docs"] == 1
    assert documents(tmp_path / "d", "train", mistral) == ["good one", "bad \ufffd byte"]


def test_rerun_is_idempotent_and_other_settings_refused(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS[:30])
    prepare(str(src), tmp_path / "d", workers=0, progress=False)
    before = os.stat(tmp_path / "d" / "train.bin").st_mtime_ns
    prepare(str(src), tmp_path / "d", workers=0, progress=False)
    assert os.stat(tmp_path / "d" / "train.bin").st_mtime_ns == before
    done = run_cli("prepare", "--source", src, "--out", tmp_path / "d", "--val-fraction", "0.5", "--workers", "0")
    assert_user_error(done, "other settings", "--force")


def test_bad_sources_get_one_line_errors(tmp_path):
    out = tmp_path / "o"
    assert_user_error(run_cli("prepare", "--source", tmp_path / "nope.jsonl", "--out", out), "does not exist")
    src = write_jsonl(tmp_path / "c.jsonl", DOCS[:3])
    assert_user_error(run_cli("prepare", "--source", src, "--out", out, "--text-field", "body"), "no field 'body'",
                      "--text-field")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    assert_user_error(run_cli("prepare", "--source", tmp_path / "bad.jsonl.gz", "--out", out), "unreadable")
    (tmp_path / "e.jsonl").write_text("\n" + json.dumps({"text": "  "}) + "\n")
    assert_user_error(run_cli("prepare", "--source", tmp_path / "e.jsonl", "--out", out), "no non-empty documents")
    (tmp_path / "j.jsonl").write_text('{"text": "ok"}\n{oops\n')
    assert_user_error(run_cli("prepare", "--source", tmp_path / "j.jsonl", "--out", out), "j.jsonl:2", "not JSON")
    (tmp_path / "x.doc").write_text("x")
    assert_user_error(run_cli("prepare", "--source", tmp_path / "x.doc", "--out", out), "unsupported file type")
    assert not out.exists()


def test_killed_prepare_leaves_no_finished_looking_folder(tmp_path):
    big = [d * 40 for d in DOCS] * 60  # ~20 MB of text: a few seconds of work
    src = write_jsonl(tmp_path / "big.jsonl", big)
    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "llamaforge", "prepare", "--source", str(src), "--out", str(out),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.stat().st_size > 0 for p in tmp_path.glob(".d.tmp-*/train.bin")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".d.tmp-*")), "the kill should have left the temporary folder behind"
    meta = prepare(str(src), out, workers=2, progress=False)
    assert read_meta(out).raw == meta and not list(tmp_path.glob(".d.tmp-*"))


def win(pair):
    """(inputs, targets) -> the (b, T + 1) token windows they were cut from."""
    x, y = pair
    return np.concatenate([x.numpy(), y[:, -1:].numpy()], axis=1)


def test_loader_visits_every_window_once_per_epoch():
    tokens = np.arange(10 * 8 + 1, dtype=np.uint16)  # 10 windows of 8 (+1)
    loader = TokenWindows(tokens, seq_len=8, seqs_per_step=2, seed=3)
    seen = [tuple(row[:1]) for _ in range(5) for row in win(loader.next_batch())]
    assert sorted(s[0] for s in seen) == [i * 8 for i in range(10)]
    batch = win(TokenWindows(tokens, 8, 2, seed=3).next_batch())
    assert np.array_equal(batch[:, 1:] - batch[:, :-1], np.ones((2, 8)))  # contiguous windows of 9 tokens
    second = [row[0] for _ in range(5) for row in win(loader.next_batch())]
    assert sorted(second) == [i * 8 for i in range(10)] and second != [s[0] for s in seen]


def test_loader_resumes_exactly_and_shards_without_overlap():
    tokens = np.arange(37 * 16 + 1, dtype=np.uint16)
    straight = TokenWindows(tokens, 16, 4, seed=7)
    batches = [win(straight.next_batch()) for _ in range(20)]  # crosses epoch boundaries (37 windows)
    first = TokenWindows(tokens, 16, 4, seed=7)
    for _ in range(7):
        first.next_batch()
    resumed = TokenWindows(tokens, 16, 4, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for b in batches[7:]:
        assert np.array_equal(win(resumed.next_batch()), b)
    ranks = [TokenWindows(tokens, 16, 4, rank=r, world=2, seed=7) for r in range(2)]
    for b in batches:
        assert np.array_equal(np.concatenate([win(r.next_batch()) for r in ranks]), b)
    with pytest.raises(Exception, match="seq_len"):
        TokenWindows(tokens, 8, 4, seed=7).load_state_dict(first.state_dict())


def test_prefetched_batches_are_the_loaders_and_its_state_is_the_handed_out_ones():
    """The read-ahead thread changes nothing a run sees: the same batches in order, a state that
    resumes with exactly the next batch (not the one read ahead), errors surfacing at their step."""
    from llamaforge.data.loader import Prefetched

    tokens = np.arange(37 * 16 + 1, dtype=np.uint16)
    plain = TokenWindows(tokens, 16, 4, seed=7)
    want = [win(plain.next_batch()) for _ in range(12)]
    ahead = Prefetched(TokenWindows(tokens, 16, 4, seed=7))
    got = [win(ahead.next_batch()) for _ in range(5)]
    state = json.loads(json.dumps(ahead.state_dict()))
    assert state["consumed"] == 5 * 4 and all(np.array_equal(a, b) for a, b in zip(got, want))
    resumed = Prefetched(TokenWindows(tokens, 16, 4, seed=7))
    resumed.next_batch()  # a read-ahead is in flight when the state is loaded
    resumed.load_state_dict(state)
    assert all(np.array_equal(win(resumed.next_batch()), b) for b in want[5:])
    ahead.close()
    resumed.close()

    class Broken(TokenWindows):
        def next_batch(self):
            raise ValueError("disk gone")

    with pytest.raises(ValueError, match="disk gone"):
        Prefetched(Broken(tokens, 16, 4)).next_batch()
