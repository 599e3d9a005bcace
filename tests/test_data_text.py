"""WikiText loaders on tiny trees in the release layout (word and byte tokenizers, cache, windows),
the gpt2 and offline errors, and the real WikiText-2 of ../shared/data when present."""

import math
import os
import sys
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.data import build_dataset, download
from harness.data import wikitext as wt
from harness.data.tokens import TokenSplit
from harness.errors import ConfigError, DataMissingError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

TRAIN = " = Valkyria = \n\n the cat sat on the mat . \n the <unk> dog sat . \n"
VALID = " the cat ran . \n"
TEST = " a dog sat on the cat . \n\n"


def write_tree(data_dir: Path, folder="wikitext-2", suffix="tokens", texts=(TRAIN, VALID, TEST)) -> Path:
    d = data_dir / folder
    d.mkdir(parents=True, exist_ok=True)
    for split, text in zip(("train", "valid", "test"), texts):
        (d / f"wiki.{split}.{suffix}").write_text(text, encoding="utf-8")
    return d


def cfg(**kw):
    return OmegaConf.create({"name": "wikitext2", "tokenizer": "word", "context": 4, "download": True, **kw})


@pytest.fixture
def offline(monkeypatch):
    def fetch(url, dest):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(download, "fetch", fetch)


def words(text):  # the reference tokenization: whitespace split, <eos> after every line
    return [w for line in text.splitlines() for w in line.split() + ["<eos>"]]


def test_word_tokenizer_matches_reference(tmp_path, offline):
    write_tree(tmp_path)
    b = build_dataset(cfg(), tmp_path, torch.device("cpu"), seed=0)
    vocab = list(dict.fromkeys(words(TRAIN)))  # first-appearance order of the training split
    assert b.task == "lm" and b.num_classes == len(vocab) == b.meta["vocab_size"] and b.input_shape == (4,)
    ids = {w: i for i, w in enumerate(vocab)}
    assert b.train.ids.tolist() == [ids[w] for w in words(TRAIN)]
    # valid/test words that the training split lacks ("ran", "a") become <unk>
    assert b.val.ids.tolist() == [ids.get(w, ids["<unk>"]) for w in words(VALID)]
    assert b.test.ids.tolist() == [ids.get(w, ids["<unk>"]) for w in words(TEST)]
    assert b.meta["tokens"] == {"train": len(words(TRAIN)), "valid": len(words(VALID)), "test": len(words(TEST))}
    counts = np.array(list(Counter(words(TRAIN)).values()), dtype=float)
    p = counts / counts.sum()
    assert b.meta["unigram_ppl"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # the training unigram model (add-one smoothed) scored on the validation words
    c = Counter(words(TRAIN))
    q = {w: (c[w] + 1) / (sum(c.values()) + len(vocab)) for w in vocab}
    val = [w if w in ids else "<unk>" for w in words(VALID)]
    assert b.meta["unigram_ppl_valid"] == pytest.approx(math.exp(-np.mean([math.log(q[w]) for w in val])))


def test_byte_tokenizer_is_the_file_bytes(tmp_path, offline):
    write_tree(tmp_path, texts=(TRAIN, VALID, "é" + TEST))
    b = build_dataset(cfg(tokenizer="byte"), tmp_path, torch.device("cpu"), seed=0)
    assert b.num_classes == 256
    assert bytes(b.test.ids.tolist()) == ("é" + TEST).encode()
    assert b.meta["tokens"]["train"] == len(TRAIN.encode())


def test_cache_is_reused_and_invalidated_by_edits(tmp_path, offline, monkeypatch):
    d = write_tree(tmp_path)
    first = build_dataset(cfg(), tmp_path, torch.device("cpu"), seed=0)
    assert not first.meta["cached"] and list((d / ".harness-cache").glob("word-*.train.npy"))
    assert np.load(next((d / ".harness-cache").glob("word-*.train.npy"))).dtype == np.uint16

    def boom(files):
        raise AssertionError("tokenized again although a valid cache exists")

    monkeypatch.setitem(wt.TOKENIZE, "word", boom)
    second = build_dataset(cfg(), tmp_path, torch.device("cpu"), seed=0)
    assert second.meta["cached"] and torch.equal(second.train.ids, first.train.ids)
    assert second.num_classes == first.num_classes
    # a changed training file changes the key: tokenized again (here: our tripwire fires)
    (d / "wiki.train.tokens").write_text(TRAIN + " new words here \n", encoding="utf-8")
    with pytest.raises(AssertionError, match="tokenized again"):
        build_dataset(cfg(), tmp_path, torch.device("cpu"), seed=0)


def test_raw_variant_and_official_zip_folder(tmp_path, offline):
    write_tree(
        tmp_path, folder="wikitext-2-raw", suffix="raw", texts=("Hello world\nhello again\n", "Hello you\n", "world\n")
    )
    b = build_dataset(cfg(variant="raw", context=1), tmp_path, torch.device("cpu"), seed=0)
    # the raw release has no <unk>: one is added for unseen words ("you")
    assert b.num_classes == 6 and b.val.ids.tolist() == [0, 5, 2]


def test_train_windows_are_contiguous_and_seeded(tmp_path, offline):
    write_tree(tmp_path)
    b = build_dataset(cfg(steps_per_epoch=3), tmp_path, torch.device("cpu"), seed=0)
    ids = b.train.ids.long()
    batches = list(b.train.batches(5, train=True, epoch=0, seed=1))
    assert len(batches) == b.train.num_batches(5, True) == 3
    for batch in batches:
        assert batch.x.shape == batch.y.shape == (5, 4) and batch.x.dtype == batch.y.dtype == torch.int64
        for row, off in enumerate(batch.index.tolist()):
            assert torch.equal(batch.x[row], ids[off : off + 4]) and torch.equal(batch.y[row], ids[off + 1 : off + 5])
    again = list(b.train.batches(5, train=True, epoch=0, seed=1))
    other = list(b.train.batches(5, train=True, epoch=1, seed=1))
    assert all(torch.equal(a.x, c.x) for a, c in zip(batches, again))
    assert not all(torch.equal(a.index, c.index) for a, c in zip(batches, other))
    # default epoch length: train tokens // (batch * context)
    assert TokenSplit(ids, 4).num_batches(2, True) == (len(ids) - 1) // 8


def test_eval_windows_cover_every_token_once(tmp_path, offline):
    write_tree(tmp_path)
    b = build_dataset(cfg(context=3), tmp_path, torch.device("cpu"), seed=0)
    ids = b.test.ids.long()
    batches = list(b.test.batches(2, train=False))
    assert len(batches) == b.test.num_batches(2, False)
    assert torch.equal(torch.cat([x.reshape(-1) for x in (bt.x for bt in batches)]), ids[:-1])
    assert torch.equal(torch.cat([bt.y.reshape(-1) for bt in batches]), ids[1:])
    assert len(b.test) == math.ceil((len(ids) - 1) / 3)


def test_bad_tokenizer_and_gpt2_unavailable(tmp_path, offline, monkeypatch):
    write_tree(tmp_path)
    with pytest.raises(ConfigError, match="valid choices: word, byte, gpt2"):
        build_dataset(cfg(tokenizer="bpe"), tmp_path, torch.device("cpu"), seed=0)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    with pytest.raises(ConfigError, match="dataset.tokenizer=word"):
        build_dataset(cfg(tokenizer="gpt2"), tmp_path, torch.device("cpu"), seed=0)


def test_context_longer_than_split_is_a_config_error(tmp_path, offline):
    write_tree(tmp_path)
    with pytest.raises(ConfigError, match="dataset.context=64"):
        build_dataset(cfg(context=64), tmp_path, torch.device("cpu"), seed=0)


@pytest.mark.parametrize("name,folder", [("wikitext2", "wikitext-2"), ("wikitext103", "wikitext-103")])
def test_missing_offline_names_expected_paths(tmp_path, offline, name, folder):
    with pytest.raises(DataMissingError) as e:
        build_dataset(cfg(name=name), tmp_path, torch.device("cpu"), seed=0)
    msg = str(e.value)
    assert str(tmp_path / folder) in msg and "wiki.train.tokens" in msg and f"{folder}-v1.zip" in msg


@pytest.fixture
def real_wikitext2(tmp_path):
    src = SHARED / "wikitext-2"
    if not (src / "wiki.train.tokens").is_file():
        pytest.skip(f"real WikiText-2 not available: {src} is absent")
    d = tmp_path / "wikitext-2"
    d.mkdir()
    for f in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        os.symlink(src / f, d / f)  # the cache goes to tmp_path, never into the shared folder
    return tmp_path


def test_real_wikitext2_word_vocabulary_and_counts(real_wikitext2, offline):
    b = build_dataset(cfg(context=256), real_wikitext2, torch.device("cpu"), seed=0)
    assert b.num_classes == 33_278
    assert b.meta["tokens"] == {"train": 2_088_628, "valid": 217_646, "test": 245_569}
    # the unigram entropy of WikiText-2's training split is about 7.06 nats (perplexity ~1,167); the
    # training unigram model scores ~968 on the validation split
    assert 1_000 < b.meta["unigram_ppl"] < 1_400 and 900 < b.meta["unigram_ppl_valid"] < 1_050
