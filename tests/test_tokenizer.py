"""The tokenizer against HF tokenizers: each property on the suite's own BPE and on metaseq's
real files (skipped, with the way to enable it, when they are not found); the ids particular to
metaseq's vocabulary on the real files only."""

import json
import random
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer

from opt_serving import tokenizer as tk
from opt_serving.protocol import char_offsets
from opt_serving.tokenizer import AssetError, Tokenizer, check_vocab, locate_assets
from paths import ASSETS, real_assets

TEXTS = ["Person 1: Hi!\nSearch Decision:", " café 😀 naïve — 日本語",
         "Question: why?\n\nAnswer:", "</s> literal", "a\tb  c   d"]


@pytest.fixture(scope="module", params=["suite", "metaseq"])
def folder(request):
    return ASSETS if request.param == "suite" else real_assets()


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer(locate_assets(assets_dir=folder))


@pytest.fixture(scope="module")
def hf(folder):
    return ByteLevelBPETokenizer(str(folder / tk.VOCAB_FILE), str(folder / tk.MERGES_FILE))


@pytest.fixture(scope="module")
def metaseq():
    return Tokenizer(locate_assets(assets_dir=real_assets()))


def test_encode_is_hf_bpe_without_specials(tok, hf):
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text).ids
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_metaseq_ids(metaseq):
    assert metaseq.encode("Hello world") == [31414, 232]  # no <s> or </s> added
    assert metaseq.decode_token(7471) == "\ufffd"  # the tail of a split emoji, as metaseq shows it
    # "\n" and "\n\n" are one token each (though "\n\n" after text encodes as two "\n":
    # why stops match text); "Question:" is two, so min_tokens cannot block it by id.
    assert metaseq.single_token_ids(["\n", "\n\n", "Question:"]) == (50118, 50140)
    assert metaseq.encode("Hi!\n\nQ")[2:4] == [50118, 50118]


def test_carriage_returns_become_newlines(tok):
    assert tok.encode("a\r\nb\rc") == tok.encode("a\nb\nc")


def test_decode_matches_hf_including_split_characters(tok, hf):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert tok.decode(ids) == hf.decode(ids)
    for i in [0, 1, 2, 3, 4, 50118] + rng.sample(range(tok.vocab_size), 200):
        assert tok.decode_token(i) == hf.decode([i]), i
    assert tok.decode_token(2) == "</s>"
    split = [i for i in tok.encode("😀") if not _valid(tok.token_bytes(i))]
    assert split and tok.decode_token(split[-1]) == "\ufffd"  # a split character's tail


def test_bytes_round_trip(tok):
    for text in TEXTS:
        assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode()
    with pytest.raises(ValueError, match="outside the dictionary"):
        tok.token_bytes(50270)


def test_single_token_stop_ids(tok):
    assert tok.single_token_ids(["\n", "Question: why not?"]) == (50118,)
    assert tok.single_token_ids(["."]) == (4,)


def test_char_offsets_count_characters_not_bytes(tok):
    text = "ok café 😀! 日本"
    pieces = [tok.token_bytes(i) for i in tok.encode(text)]
    assert any(not _valid(p) for p in pieces)  # the emoji is split across tokens
    # Independent reference: the characters of the text that begin before each token's byte.
    char_starts, pos = [], 0
    for ch in text:
        char_starts.append(pos)
        pos += len(ch.encode())
    token_starts = [len(b"".join(pieces[:i])) for i in range(len(pieces))]
    expected = [sum(1 for c in char_starts if c < t) for t in token_starts]
    assert char_offsets(pieces) == expected


def _valid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_openai_encoder_json_is_refused_with_an_explanation(tmp_path):
    vocab = {"!": 0, **{f"tok{i}": i for i in range(1, tk.OPENAI_GPT2_SIZE)}}
    (tmp_path / tk.VOCAB_FILE).write_text(json.dumps(vocab))
    (tmp_path / tk.MERGES_FILE).symlink_to(ASSETS / tk.MERGES_FILE)
    with pytest.raises(AssetError, match=r"OpenAI's GPT-2 encoder\.json.*#128"):
        Tokenizer(locate_assets(assets_dir=tmp_path))


def test_other_wrong_vocabularies_are_refused():
    check_vocab(json.loads((ASSETS / tk.VOCAB_FILE).read_text()))  # the right one passes
    with pytest.raises(AssetError, match="50265 entries"):
        check_vocab({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3})
    shifted = {f"t{i}": i for i in range(tk.DICT_SIZE)}
    with pytest.raises(AssetError, match="<s>=0"):
        check_vocab(shifted)


def _asset_dir(path: Path) -> Path:
    path.mkdir()
    for name in (tk.VOCAB_FILE, tk.MERGES_FILE):
        (path / name).symlink_to(ASSETS / name)
    return path


def test_locate_prefers_the_named_assets_dir_then_the_checkpoint_folder(tmp_path, monkeypatch):
    ckpt, assets, own = _asset_dir(tmp_path / "ckpt"), _asset_dir(tmp_path / "a"), tmp_path / "own"
    monkeypatch.setattr(tk, "default_assets_dir", lambda: own)
    assert locate_assets(ckpt, assets).vocab == assets / tk.VOCAB_FILE  # named: it wins
    assert locate_assets(ckpt, tmp_path / "empty").vocab == ckpt / tk.VOCAB_FILE
    assert locate_assets(tmp_path, assets).vocab == assets / tk.VOCAB_FILE
    _asset_dir(own)
    assert locate_assets(tmp_path).merges == own / tk.MERGES_FILE


def test_missing_assets_say_where_we_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "default_assets_dir", lambda: tmp_path / "own")
    with pytest.raises(AssetError) as err:
        locate_assets(tmp_path / "ckpt", tmp_path / "assets")
    message = str(err.value)
    assert str(tmp_path / "ckpt") in message and str(tmp_path / "own") in message
    assert "opt-assets" in message and "--assets" in message
