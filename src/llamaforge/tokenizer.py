"""Tokenizers: Mistral-7B-v0.1's offline (from the `mistral-common` wheel), from the Hub, or a BPE of your own.

The offline Mistral tokenizer is built deliberately from the sentencepiece model rather than by
loading `tokenizer.model` into transformers with no config (which gives wrong ids):
- BPE with the sentencepiece vocabulary and merges, byte fallback for unknown characters;
- normalizer: prepend "▁" and turn spaces into "▁" exactly as sentencepiece's dummy prefix does,
  so ids equal sentencepiece's, leading spaces included;
- BOS added, EOS *not* appended: lm-eval slices continuations off the context, and an appended EOS
  makes every multiple-choice option score the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .cache import MISTRAL_TOKENIZER, cache_dir, carried_file
from .errors import UserError
from .fsutil import atomic_write_bytes
from .model import hf as _register_auto_classes  # noqa: F401  (our folders load without a remote-code prompt)

MISTRAL = "mistral"  # the offline name; "mistralai/Mistral-7B-v0.1" goes to the Hub
MISTRAL_HUB = "mistralai/Mistral-7B-v0.1"
SPECIALS = ("<unk>", "<s>", "</s>")


def _mistral_tokenizer_json() -> Path:
    """tokenizer.json for Mistral v0.1, built once from the sentencepiece model and cached."""
    out = cache_dir() / "tokenizers" / f"mistral-v0.1-{MISTRAL_TOKENIZER.member_sha256[:12]}.json"
    if out.exists():
        return out
    from transformers.convert_slow_tokenizer import SentencePieceExtractor
    from transformers.tokenization_utils_base import generate_merges

    pieces = SentencePieceExtractor(str(carried_file(MISTRAL_TOKENIZER))).proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    # merges ranked by piece score, as sentencepiece's BPE applies them: whitespace runs ("▁▁")
    # score -1e9 and merge last, so " Hello" is "▁" + "▁Hello" as in sentencepiece.
    merges = generate_merges(vocab, vocab_scores={p.piece: p.score for p in pieces})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    atomic_write_bytes(out, tok.to_str().encode())
    return out


def _wrap(tok: Tokenizer, bos: str | None, eos: str, unk: str | None, pad: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        add_bos_token=bos is not None,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )


def load_tokenizer(name: str = MISTRAL) -> PreTrainedTokenizerFast:
    """`mistral` (offline), a local tokenizer/model folder, or a Hub name such as mistralai/Mistral-7B-v0.1."""
    if name == MISTRAL:
        tok = Tokenizer.from_file(str(_mistral_tokenizer_json()))
        # pad = <unk>: never produced by the byte-fallback model, and distinct from EOS so batched
        # generation can still tell "finished" from "padding".
        return _wrap(tok, "<s>", "</s>", "<unk>", "<unk>")
    path = Path(name)
    if path.exists() and not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise UserError(f"{path} holds no tokenizer files; pass --tokenizer mistral or a folder with tokenizer.json")
    try:
        # trust_remote_code=False, said explicitly: a folder whose config.json has `auto_map` would
        # otherwise make transformers ask its remote-code question (on stdout when no terminal is attached)
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except OSError as e:
        raise UserError(
            f"could not load tokenizer {name!r} ({str(e).splitlines()[0]}); offline, use --tokenizer mistral"
        ) from None


def train_bpe(texts, vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of your own (other languages, small test vocabularies).

    `texts` is any iterable of strings. Ids 0, 1, 2 are <unk>, <s>, </s> as in Mistral's, so the
    rest of the toolkit treats both alike; BOS is added, EOS is not."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return _wrap(tok, "<s>", "</s>", "<unk>", "<unk>")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short hash of the tokenizer's full definition (written into prepared data's meta.json)."""
    import hashlib

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
