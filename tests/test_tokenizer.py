"""The offline Mistral tokenizer against sentencepiece (the reference) and the Hub's files."""

import json
from pathlib import Path

import pytest

from llamaforge.cache import MISTRAL_TOKENIZER, carried_file, sha256_file
from llamaforge.tokenizer import train_bpe

TEXTS = [
    "Hello world, this is a test.",
    " Hello",
    "  two leading spaces",
    "trailing spaces   ",
    "naïve café, Straße, 日本語 and emoji 🤗🚀",
    "line\nbreak\n\n  indented x",
    "tab\tseparated\tvalues",
    "\u00a0non-breaking space",
    "1234567890 $%^&*() <html> {json: true}",
    "",
]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mistral-7b-v0.1-hf" / "tokenizer.json"


@pytest.mark.compat
def test_course_example_ids(mistral):
    assert mistral("Hello world, this is a test.").input_ids == [1, 22557, 1526, 28725, 456, 349, 264, 1369, 28723]
    assert len(mistral) == 32000
    assert (mistral.bos_token_id, mistral.eos_token_id, mistral.unk_token_id) == (1, 2, 0)


def test_tokenizer_model_is_verified():
    assert sha256_file(carried_file(MISTRAL_TOKENIZER)) == MISTRAL_TOKENIZER.member_sha256


@pytest.mark.compat
def test_ids_equal_sentencepiece(mistral):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(carried_file(MISTRAL_TOKENIZER)))
    for text in TEXTS:
        ids = mistral(text).input_ids
        assert ids == [1] + sp.encode(text), text
        assert ids[-1] != mistral.eos_token_id or text == ""  # EOS is never appended
        assert mistral.decode(ids, skip_special_tokens=True) == text


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared/reference not present")
def test_ids_equal_the_hub_files_where_they_agree_with_sentencepiece(mistral):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(REFERENCE))
    for text in TEXTS:
        if text.startswith(" "):
            continue  # the Hub's Metaspace(prepend_scheme=first) drops one leading space; we follow sentencepiece
        assert mistral(text).input_ids == ref.encode(text).ids, text


@pytest.mark.compat
def test_saved_tokenizer_round_trips_through_autotokenizer(mistral, tmp_path):
    from transformers import AutoTokenizer

    from llamaforge.model.io import _set_tokenizer_flags

    mistral.save_pretrained(tmp_path)
    _set_tokenizer_flags(tmp_path / "tokenizer_config.json", mistral)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again(text).input_ids == mistral(text).input_ids


def test_train_bpe_small_vocabulary():
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + ["pack my box with five dozen liquor jugs"] * 50
    tok = train_bpe(texts, vocab_size=300)
    assert len(tok) <= 300
    ids = tok("the lazy fox").input_ids
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.decode(ids, skip_special_tokens=True) == "the lazy fox"
    assert tok.decode(tok("naïve ☃").input_ids, skip_special_tokens=True) == "naïve ☃"  # byte level: no unknowns
