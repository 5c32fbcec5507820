"""`prepare`: stream documents from a source into flat token files, in worker processes, in bounded memory.

DATA_DIR/
  meta.json        tokenizer (name, hash, vocab size), dtype, source, per-split tokens/documents/bytes
  train.bin        little-endian uint16 (uint32 when the vocabulary needs it): <s> doc </s> <s> doc </s> ...
  val.bin          same, the held-out documents
  tokenizer/       the tokenizer files (AutoTokenizer.from_pretrained reads them)

Documents go to val when a hash of their text falls under `val_fraction`: deterministic, and
independent of order and worker count. The folder is written as DATA_DIR.tmp-PID and renamed when
complete, so a killed run never leaves a folder that looks finished; re-running with the same
settings finds the finished folder and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..fsutil import atomic_folder
from ..tokenizer import load_tokenizer, tokenizer_fingerprint
from .sources import SourceStats, iter_documents

log = logging.getLogger(__name__)
FORMAT = "llamaforge-tokens-v1"
BATCH_BYTES = 2 << 20  # text per worker task: large enough to amortize IPC, small enough to bound memory

_worker_tok = None  # per worker process: the Rust tokenizer


def _init_worker(tokenizer_json: str, threads: bool) -> None:
    global _worker_tok
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core instead
    from tokenizers import Tokenizer

    _worker_tok = Tokenizer.from_str(tokenizer_json)
    _worker_tok.encode_special_tokens = True  # a literal "<s>" in a document is text, not BOS


def held_out(raw: bytes, fraction: float) -> bool:
    """The train/validation split: a document (or conversation) is held out when a hash of its bytes
    falls under `fraction` — deterministic, and independent of order and worker count."""
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") / 2**64 < fraction


@dataclass
class Encoded:
    ids: dict[str, np.ndarray]  # split -> concatenated <s> doc </s> ids
    docs: dict[str, int]
    nbytes: dict[str, int]
    empty: int


def _encode(texts: list[str], bos: int, eos: int, val_fraction: float, dtype: str) -> Encoded:
    keep = [t for t in texts if t.strip()]
    enc = _worker_tok.encode_batch_fast(keep, add_special_tokens=False)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    out = Encoded({}, {"train": 0, "val": 0}, {"train": 0, "val": 0}, len(texts) - len(keep))
    for text, e in zip(keep, enc):
        raw = text.encode("utf-8")
        split = "val" if held_out(raw, val_fraction) else "train"
        parts[split].append(np.array([bos, *e.ids, eos], dtype=dtype))
        out.docs[split] += 1
        out.nbytes[split] += len(raw)
    out.ids = {k: np.concatenate(v) if v else np.zeros(0, dtype) for k, v in parts.items()}
    return out


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@dataclass
class Settings:
    source: str
    tokenizer: str
    tokenizer_hash: str
    text_field: str
    val_fraction: float

    def matches(self, meta: dict) -> bool:
        return all(meta.get(k) == v for k, v in self.__dict__.items())


@dataclass
class Totals:
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    docs: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    nbytes: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    empty: int = 0


def prepare(source: str, out: str | Path, tokenizer: str = "mistral", val_fraction: float = 0.01,
            workers: int = 2, text_field: str = "text", force: bool = False, progress: bool = True) -> dict:
    """Tokenize `source` into `out`; returns meta.json's content."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    out = Path(out)
    tok = load_tokenizer(tokenizer)
    settings = Settings(source, tokenizer, tokenizer_fingerprint(tok), text_field, val_fraction)
    meta_path = out / "meta.json"
    if meta_path.exists() and not force:
        meta = json.loads(meta_path.read_text())
        if settings.matches(meta):
            log.info("%s is already prepared with these settings", out)
            return meta
        raise UserError(f"{out} holds data prepared with other settings; pass --force to replace it or another --out")
    with atomic_folder(out) as tmp:
        meta = _write(tok, settings, tmp, workers, progress)
        tok.save_pretrained(tmp / "tokenizer")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _write(tok, settings: Settings, tmp: Path, workers: int, progress: bool) -> dict:
    vocab = len(tok)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    stats, totals = SourceStats(), Totals()
    args = (tok.bos_token_id, tok.eos_token_id, settings.val_fraction, dtype)
    docs = iter_documents(settings.source, settings.text_field, stats)
    files = {s: open(tmp / f"{s}.bin", "wb") for s in ("train", "val")}
    bar = tqdm(desc="prepare", unit="doc", disable=None if progress else True, smoothing=0.1)  # None: only on a terminal
    start = time.perf_counter()

    def write(enc: Encoded) -> None:
        for s in ("train", "val"):
            enc.ids[s].astype(f"<{np.dtype(dtype).char}", copy=False).tofile(files[s])
            totals.tokens[s] += len(enc.ids[s])
            totals.docs[s] += enc.docs[s]
            totals.nbytes[s] += enc.nbytes[s]
        totals.empty += enc.empty
        bar.update(enc.docs["train"] + enc.docs["val"] + enc.empty)
        rate = (totals.tokens["train"] + totals.tokens["val"]) / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(tokens=totals.tokens["train"] + totals.tokens["val"], tok_s=f"{rate:,.0f}", refresh=False)

    tokenizer_json = tok.backend_tokenizer.to_str()
    try:
        if workers <= 0:  # in-process, for debugging
            _init_worker(tokenizer_json, threads=True)
            for batch in _batches(docs):
                write(_encode(batch, *args))
        else:
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer_json, workers == 1)) as pool:
                pending: deque = deque()
                for batch in _batches(docs):
                    pending.append(pool.submit(_encode, batch, *args))
                    while len(pending) > 2 * workers:  # bounded: at most 2 tasks queued per worker
                        write(pending.popleft().result())
                while pending:
                    write(pending.popleft().result())
    finally:
        bar.close()
        for f in files.values():
            f.close()
    if totals.docs["train"] + totals.docs["val"] == 0:
        raise UserError(f"source {settings.source!r} has no non-empty documents; check the source and --text-field")
    if totals.docs["train"] == 0:
        raise UserError("every document went to validation; lower --val-fraction")
    seconds = time.perf_counter() - start
    meta = dict(settings.__dict__)
    meta.update(
        format=FORMAT, dtype=dtype, vocab_size=vocab, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
        splits={s: {"tokens": totals.tokens[s], "documents": totals.docs[s], "bytes": totals.nbytes[s]} for s in ("train", "val")},
        skipped_empty=totals.empty, invalid_utf8_docs=stats.invalid_utf8_docs, seconds=round(seconds, 2),
        tokens_per_second=round((totals.tokens["train"] + totals.tokens["val"]) / max(seconds, 1e-9)),
    )
    return meta


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{data_dir} is not prepared data (no meta.json); run `llamaforge prepare --out {data_dir}` first")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {FORMAT}; prepare the data again")
    return meta


def open_split(data_dir: str | Path, split: str) -> np.memmap:
    """The token file of a split, memory-mapped read-only."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if meta["splits"][split]["tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")


def unigram_entropy(data_dir: str | Path, split: str = "train") -> float:
    """Entropy (nats/token) of a split's token frequencies: the loss of the best context-free model,
    the baseline a language model must beat."""
    tokens = open_split(data_dir, split)
    counts = np.zeros(read_meta(data_dir)["vocab_size"], dtype=np.int64)
    for s in range(0, len(tokens), 1 << 24):  # chunked: bounded memory on big corpora
        counts += np.bincount(tokens[s : s + (1 << 24)], minlength=len(counts))[: len(counts)]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
