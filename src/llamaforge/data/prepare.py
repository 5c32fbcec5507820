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
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..fsutil import atomic_folder, atomic_write_bytes, check_replaceable
from ..runs import locked
from ..tokenizer import load_tokenizer, tokenizer_fingerprint
from .sources import SourceStats, iter_documents

log = logging.getLogger(__name__)
FORMAT = "llamaforge-tokens-v1"
BATCH_BYTES = 2 << 20  # text per worker task: large enough to amortize IPC, small enough to bound memory
PIECE_CHARS = 1 << 18  # longer documents are tokenized piece by piece (bounded memory, same ids)
LOOK_CHARS = 1024  # context either side of a cut inside text without spaces (doubled when it is too short)

_worker_tok = None  # per worker process: the Rust tokenizer


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the parent dies (even by SIGKILL), so a killed
    `prepare` never leaves ~400 MB tokenizer processes behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(tokenizer_json: str, threads: bool, parent: int | None = None) -> None:
    global _worker_tok
    if parent is not None:
        _die_with_parent()
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
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


def _pieces(text: str) -> list[str]:
    """A long document cut at single spaces into pieces of about PIECE_CHARS, each space dropped: with
    a sentencepiece-style tokenizer (a "▁" prefix added to each piece) the pieces' ids concatenate
    to the whole document's ids, and the tokenizer's memory stays bounded for any document size."""
    out, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = text.find(" ", start + PIECE_CHARS)
        while cut != -1 and (text[cut - 1].isspace() or text[cut + 1 : cut + 2].isspace()):
            cut = text.find(" ", cut + 1)  # a single space between two non-spaces only
        if cut == -1:
            break
        out.append(text[start:cut])
        start = cut + 1
    out.append(text[start:])
    return out


def _window(text: str, pos: int, look: int) -> tuple[list[int], int] | None:
    """The ids of the tokens of `text` that start in [pos, cut), and `cut` (the first token start at or
    after pos + PIECE_CHARS, or the end), from one window with `look` characters of context on either
    side. None when `pos` is not a token start in this window: its context was too short."""
    a, b = max(0, pos - look), min(len(text), pos + PIECE_CHARS + look)
    enc = _worker_tok.encode(text[a:b], add_special_tokens=False)
    starts = [a + s for s, _ in enc.offsets]
    if pos and pos not in starts:
        return None
    cut = len(text) if b == len(text) else next((s for s in starts if s >= pos + PIECE_CHARS), None)
    if cut is None:
        return None
    return [i for i, s in zip(enc.ids, starts) if pos <= s < cut], cut


def _windowed(text: str, dtype: str) -> np.ndarray:
    """The ids of tokenizing `text` whole, window by window, for text with no space to cut at (Chinese,
    Japanese, Thai, base64, minified code): windows of PIECE_CHARS that overlap by LOOK_CHARS of context;
    each cut falls on a token start, and the next window must start a token there too (the guard), else
    the context doubles. Memory is bounded by the window, not the document."""
    ids, pos = [], 0  # one array per window: no Python list of every id
    while pos < len(text):
        look = LOOK_CHARS
        got = _window(text, pos, look)
        while got is None and look < PIECE_CHARS:
            look *= 2
            got = _window(text, pos, look)
        if got is None:
            raise UserError("a document without spaces could not be cut at a token boundary; "
                            "split it into lines or paragraphs and prepare again")
        part, pos = got
        ids.append(np.asarray(part, dtype=dtype))
    return np.concatenate(ids) if ids else np.zeros(0, dtype)


def _long_doc(text: str, bos: int, eos: int, dtype: str) -> np.ndarray:
    """<s> ids </s> of a long document, piece by piece, as one array (no Python list of every id)."""
    parts = [np.array([bos], dtype=dtype)]
    for piece in _pieces(text):
        if len(piece) <= 2 * PIECE_CHARS:
            parts.append(np.asarray(_worker_tok.encode(piece, add_special_tokens=False).ids, dtype=dtype))
        else:
            parts.append(_windowed(piece, dtype))
    return np.concatenate(parts + [np.array([eos], dtype=dtype)])


def _encode(texts: list[str], bos: int, eos: int, val_fraction: float, dtype: str) -> Encoded:
    keep = [t for t in texts if t.strip()]
    short = [t for t in keep if len(t) <= PIECE_CHARS]
    enc = iter(_worker_tok.encode_batch_fast(short, add_special_tokens=False))
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    out = Encoded({}, {"train": 0, "val": 0}, {"train": 0, "val": 0}, len(texts) - len(keep))
    for text in keep:
        raw = text.encode("utf-8")
        split = "val" if held_out(raw, val_fraction) else "train"
        if len(text) <= PIECE_CHARS:
            parts[split].append(np.array([bos, *next(enc).ids, eos], dtype=dtype))
        else:
            parts[split].append(_long_doc(text, bos, eos, dtype))
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
    if is_data_folder(out) and not force:
        meta = read_meta(out)
        if settings.matches(meta.raw):
            log.info("%s is already prepared with these settings", out)
            return meta.raw
        raise UserError(f"{out} holds data prepared with other settings; pass --force to replace it or another --out")
    check_replaceable(out, is_data_folder, "data folder with llamaforge's meta.json")  # before any file is made
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out.parent / f".{out.name}.lock", out), \
            atomic_folder(out, is_data_folder, "data folder with llamaforge's meta.json") as tmp:
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
            with ProcessPoolExecutor(workers, initializer=_init_worker,
                                     initargs=(tokenizer_json, workers == 1, os.getpid())) as pool:
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


def is_data_folder(path: Path) -> bool:
    """A folder `prepare` wrote (its meta.json names our format), so `--force` may replace it."""
    try:
        return json.loads((Path(path) / "meta.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class Split:
    tokens: int
    bytes: int


@dataclass(frozen=True)
class Meta:
    """meta.json, parsed once: the fields the readers use, with their types checked."""

    source: str
    tokenizer: str
    vocab_size: int
    dtype: str  # uint16 | uint32
    splits: dict[str, Split]
    raw: dict  # the whole file (prepare's settings, statistics)


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError
    return value


def read_meta(data_dir: str | Path) -> Meta:
    """meta.json of a prepared data folder, parsed: every field the readers use is there, typed and sane."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        given = str(data_dir)
        if given.startswith("hf:"):  # a Hub dataset is prepared first, then trained on from its folder
            name = given[3:].split(":")[0]
            out = f"data/{name.rstrip('/').split('/')[-1] or 'corpus'}"
            raise UserError(f"--data takes a prepared folder, not {given}; run `llamaforge prepare --source {given} "
                            f"--out {out}` first, then pass --data {out}")
        raise UserError(f"{data_dir} is not prepared data (no meta.json); run `llamaforge prepare --source YOUR_CORPUS "
                        f"--out {data_dir}` first")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; prepare the data again (`llamaforge prepare --force`)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{path} has format {found!r}, expected {FORMAT}; prepare the data again")
    try:
        dtype = meta["dtype"]
        vocab = _count(meta["vocab_size"])
        if dtype not in ("uint16", "uint32") or not 0 < vocab <= (1 << 16 if dtype == "uint16" else 1 << 32) or \
                not all(isinstance(meta[k], str) and meta[k] for k in ("source", "tokenizer")):
            raise ValueError
        splits = {s: Split(_count(meta["splits"][s]["tokens"]), _count(meta["splits"][s]["bytes"])) for s in ("train", "val")}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} lacks a field or has a wrong one (source, tokenizer, dtype, vocab_size, splits); "
                        "prepare the data again") from None
    return Meta(meta["source"], meta["tokenizer"], vocab, dtype, splits, meta)


def check_ids(path: Path, ids: np.ndarray, vocab: int) -> None:
    """Every token id below the vocabulary (else an IndexError deep inside the model): the maximum is
    computed once per file version (size, mtime) and cached beside it in .NAME.max.json."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = path.with_name(f".{path.name}.max.json")
    try:
        cached = json.loads(cache.read_text())
        largest = cached["max"] if {k: cached.get(k) for k in key} == key else None
    except (OSError, ValueError, KeyError, TypeError):
        largest = None
    if not isinstance(largest, int):
        largest = max((int(ids[i : i + (1 << 26)].max()) for i in range(0, len(ids), 1 << 26)), default=0)
        try:
            atomic_write_bytes(cache, json.dumps(dict(key, max=largest)).encode())
        except OSError:  # a read-only data folder: checked again next time
            pass
    if largest >= vocab:
        raise UserError(f"{path} holds token id {largest}, beyond the vocabulary of {vocab} in meta.json (edited or "
                        "damaged); prepare the data again")


def open_split(data_dir: str | Path, split: str) -> np.memmap:
    """The token file of a split, memory-mapped read-only."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    tokens, dtype = meta.splits[split].tokens, np.dtype(meta.dtype).newbyteorder("<")
    size = path.stat().st_size if path.is_file() else -1
    if size != tokens * dtype.itemsize:
        state = "missing" if size < 0 else f"{size:,} bytes, expected {tokens * dtype.itemsize:,}"
        raise UserError(f"{path} is {state} (truncated or replaced); prepare the data again")
    if tokens == 0:
        return np.zeros(0, dtype=meta.dtype)
    ids = np.memmap(path, dtype=dtype, mode="r")
    check_ids(path, ids, meta.vocab_size)
    return ids


def unigram_entropy(data_dir: str | Path, split: str = "train") -> float:
    """Entropy (nats/token) of a split's token frequencies: the loss of the best context-free model,
    the baseline a language model must beat."""
    tokens = open_split(data_dir, split)
    counts = np.zeros(read_meta(data_dir).vocab_size, dtype=np.int64)
    for s in range(0, len(tokens), 1 << 24):  # chunked: bounded memory on big corpora
        counts += np.bincount(tokens[s : s + (1 << 24)], minlength=len(counts))[: len(counts)]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
