"""WikiText-2 and WikiText-103 (Merity et al. 2017, "Pointer Sentinel Mixture Models", CC BY-SA 3.0).

Reads the tokenized release (``wiki.{train,valid,test}.tokens``, ``dataset.variant=tokens``) or the
raw one (``wiki.*.raw``, ``variant=raw``) under ``data_dir``, in the directories the official zips
unpack to (``wikitext-2/``, ``wikitext-2-raw/``, ``wikitext-103/``, ``wikitext-103-raw/``), and
downloads the official zip when they are missing.

Tokenizers (``dataset.tokenizer``):
  word  vocabulary of the training split in first-appearance order, whitespace split, ``<eos>``
        after every line (as in PyTorch's word_language_model example); words of valid/test that
        the training split lacks map to ``<unk>``. WikiText-2: 33,278 types.
  byte  the file's bytes, vocabulary 256.
  gpt2  GPT-2 BPE through tiktoken (needs the package and its cached encoding files).
Token ids are cached as .npy (uint16, or uint32 for larger vocabularies) in ``.harness-cache/``
next to the text, keyed on tokenizer and the files' sizes and mtimes, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from harness.data import download
from harness.data.base import DataBundle
from harness.data.tokens import TokenSplit, smallest_uint, unigram_model_perplexity, unigram_perplexity
from harness.errors import ConfigError, DataCorruptError, DataMissingError

SPLITS = ("train", "valid", "test")
TOKENIZERS = ("word", "byte", "gpt2")
VARIANTS = ("tokens", "raw")
CACHE_VERSION = 1
_SMERITY, _S3 = "https://wikitext.smerity.com", "https://s3.amazonaws.com/research.metamind.io/wikitext"

# (directories searched in order, archive name, md5 of the archive when known)
SPECS = {
    "wikitext2": {
        "tokens": (["wikitext-2", "wikitext-2-v1"], "wikitext-2-v1.zip", "542ccefacc6c27f945fb54453812b3cd"),
        "raw": (["wikitext-2-raw", "wikitext-2-raw-v1", "wikitext-2"], "wikitext-2-raw-v1.zip", None),
    },
    "wikitext103": {
        "tokens": (["wikitext-103", "wikitext-103-v1"], "wikitext-103-v1.zip", "9ddaacaf6af0710eda8c456decff7832"),
        "raw": (["wikitext-103-raw", "wikitext-103-raw-v1", "wikitext-103"], "wikitext-103-raw-v1.zip", None),
    },
}


def split_files(root: Path, variant: str) -> dict[str, Path]:
    suffix = "tokens" if variant == "tokens" else "raw"
    return {s: root / f"wiki.{s}.{suffix}" for s in SPLITS}


def find_wikitext(name: str, variant: str, data_dir: Path, download_ok: bool = True) -> dict[str, Path]:
    dirs, archive, md5 = SPECS[name][variant]
    for d in dirs:
        files = split_files(data_dir / d, variant)
        if all(p.is_file() for p in files.values()):
            return files
    expected = (
        " or ".join(f"{data_dir / d}/" for d in dirs[:2])
        + " with "
        + ", ".join(p.name for p in split_files(Path(), variant).values())
    )
    if not download_ok:
        raise DataMissingError(f"{name} not found: expected {expected} (dataset.download=false)")
    download.download_and_extract(
        [f"{_SMERITY}/{archive}", f"{_S3}/{archive}"], data_dir, md5, what=name, expected=expected
    )
    for d in dirs:
        files = split_files(data_dir / d, variant)
        if all(p.is_file() for p in files.values()):
            return files
    raise DataMissingError(f"{name}: {archive} unpacked into {data_dir} but {expected} is still missing")


# -- tokenizers: each returns ({split: ids}, vocab_size, vocabulary list or None) -------------------------


def _word_ids(path: Path, w2i: dict[str, int], grow: bool) -> np.ndarray:
    chunks, buf = [], []
    unk = w2i.get("<unk>", -1)
    with open(path, encoding="utf-8") as f:
        for line in f:
            for w in line.split() + ["<eos>"]:
                i = w2i.get(w)
                if i is None:
                    if grow:
                        i = w2i[w] = len(w2i)
                    else:
                        i = unk
                buf.append(i)
            if len(buf) >= 1 << 20:  # bounded Python lists: WikiText-103 has 103M tokens
                chunks.append(np.array(buf, dtype=np.int64))
                buf = []
    chunks.append(np.array(buf, dtype=np.int64))
    return np.concatenate(chunks)


def tokenize_word(files: dict[str, Path]):
    w2i: dict[str, int] = {}
    ids = {"train": _word_ids(files["train"], w2i, grow=True)}
    w2i.setdefault("<unk>", len(w2i))  # the raw release has no <unk>; unseen words in valid/test need one
    for s in ("valid", "test"):
        ids[s] = _word_ids(files[s], w2i, grow=False)
    return ids, len(w2i), list(w2i)


def tokenize_byte(files: dict[str, Path]):
    return {s: np.fromfile(p, dtype=np.uint8) for s, p in files.items()}, 256, None


def gpt2_encoding():
    try:
        import tiktoken

        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # ImportError, or no network and no cached encoding files
        raise ConfigError(
            f"dataset.tokenizer=gpt2 is unavailable ({type(e).__name__}: {e}). It needs `pip install tiktoken` and "
            "the GPT-2 encoding files (downloaded on first use, or cached in TIKTOKEN_CACHE_DIR). "
            "Use dataset.tokenizer=word (or byte) instead; valid choices: " + ", ".join(TOKENIZERS)
        ) from e


def tokenize_gpt2(files: dict[str, Path]):
    enc = gpt2_encoding()
    ids = {}
    for s, p in files.items():
        text = p.read_text(encoding="utf-8")
        # encode in ~4 MB pieces cut after a newline so memory stays bounded on WikiText-103
        pieces, start = [], 0
        while start < len(text):
            end = text.find("\n", start + (4 << 20))
            end = len(text) if end < 0 else end + 1
            pieces.append(text[start:end])
            start = end
        ids[s] = np.concatenate([np.asarray(t, dtype=np.int64) for t in enc.encode_ordinary_batch(pieces)] or [[]])
    return ids, enc.n_vocab, None


TOKENIZE = {"word": tokenize_word, "byte": tokenize_byte, "gpt2": tokenize_gpt2}


# -- cache --------------------------------------------------------------------------------------------------


def cache_paths(files: dict[str, Path], tokenizer: str) -> tuple[dict[str, Path], Path]:
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files.values()]
    key = hashlib.sha1(json.dumps([CACHE_VERSION, tokenizer, stats]).encode()).hexdigest()[:12]
    d = files["train"].parent / ".harness-cache"
    return {s: d / f"{tokenizer}-{key}.{s}.npy" for s in SPLITS}, d / f"{tokenizer}-{key}.json"


def _corrupt(path: Path, reason: str) -> DataCorruptError:
    return DataCorruptError(
        f"{path} is damaged ({reason}). Delete {path.parent} and run again to download a fresh copy (offline: "
        f"unpack the official zip into {path.parent.parent}; see datasets/README.md)."
    )


def check_text_files(files: dict[str, Path]) -> None:
    """Cheap checks of every split file before tokenizing: not empty, and ending with a newline as
    every official WikiText file does (a file cut short by an interrupted copy usually does not)."""
    for path in files.values():
        size = path.stat().st_size
        if size == 0:
            raise _corrupt(path, "the file is empty")
        with open(path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                raise _corrupt(path, f"it ends mid-line after {size:,} bytes: truncated")


def _undecodable(files: dict[str, Path]) -> tuple[Path, UnicodeDecodeError] | None:
    for path in files.values():
        try:
            with open(path, encoding="utf-8") as f:
                while f.read(1 << 22):
                    pass
        except UnicodeDecodeError as e:
            return path, e
    return None


def _load_cache(arrays: dict[str, Path], info: Path):
    """The cached token ids, or None when the cache is absent or unreadable (it is rebuilt)."""
    if not (info.is_file() and all(p.is_file() for p in arrays.values())):
        return None
    try:
        meta = json.loads(info.read_text())
        return {s: np.load(p) for s, p in arrays.items()}, int(meta["vocab_size"]), meta.get("vocab")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        print(f"[harness] the token cache {info.parent} is unreadable ({e}); tokenizing again", file=sys.stderr)
        return None


def load_tokens(
    files: dict[str, Path], tokenizer: str, log=print
) -> tuple[dict[str, np.ndarray], int, list | None, bool]:
    """Token ids per split, vocabulary size, vocabulary (word) and whether the cache was used.
    A damaged split file (empty, truncated, not UTF-8) raises ``DataCorruptError`` naming it."""
    check_text_files(files)
    arrays, info = cache_paths(files, tokenizer)
    cached = _load_cache(arrays, info)
    if cached is not None:
        return (*cached, True)
    log(f"[harness] tokenizing {files['train'].parent} with the {tokenizer} tokenizer (cached for later runs)")
    try:
        ids, vocab_size, vocab = TOKENIZE[tokenizer](files)
    except UnicodeDecodeError as e:
        bad = _undecodable(files)
        path, err = bad if bad else (files["train"], e)
        raise _corrupt(path, f"not UTF-8 text at byte {err.start:,}") from e
    for split, a in ids.items():
        if len(a) < 2:
            raise _corrupt(files[split], f"it holds {len(a)} token(s)")
    ids = {s: a.astype(smallest_uint(vocab_size)) for s, a in ids.items()}
    try:
        info.parent.mkdir(exist_ok=True)
        for s, p in arrays.items():
            tmp = p.with_name(p.name + ".tmp.npy")
            np.save(tmp, ids[s])
            os.replace(tmp, p)
        tmp = info.with_name(info.name + ".tmp")
        tmp.write_text(json.dumps({"tokenizer": tokenizer, "vocab_size": vocab_size, "vocab": vocab}))
        os.replace(tmp, info)  # written last: its presence means the arrays are complete
    except OSError as e:
        log(f"[harness] could not cache token ids in {info.parent} ({e}); the next run tokenizes again")
    return ids, vocab_size, vocab, False


def build_wikitext(
    name: str,
    data_dir: Path,
    device,
    *,
    tokenizer: str,
    variant: str,
    context: int,
    steps_per_epoch: int | None,
    download: bool,
    eval_tokens: int | None = None,
) -> DataBundle:
    tokenizer, variant = str(tokenizer), str(variant)
    if eval_tokens is not None and (not isinstance(eval_tokens, int) or eval_tokens < int(context) + 1):
        raise ConfigError(
            f"dataset.eval_tokens={eval_tokens!r} must be null (whole splits) or an integer > dataset.context"
        )
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"dataset.tokenizer={tokenizer!r}; valid choices: {', '.join(TOKENIZERS)}")
    if variant not in VARIANTS:
        raise ConfigError(f"dataset.variant={variant!r}; valid choices: {', '.join(VARIANTS)}")
    if tokenizer == "gpt2":
        gpt2_encoding()  # fail on a missing tokenizer before looking for (or downloading) data
    files = find_wikitext(name, variant, data_dir, bool(download))
    ids, vocab_size, vocab, cached = load_tokens(files, tokenizer, log=lambda m: print(m, file=sys.stderr))
    context = int(context)
    steps = steps_per_epoch
    train = TokenSplit(ids["train"], context, device, steps_per_epoch=steps)
    if eval_tokens is not None:  # a prefix of each evaluation split (CPU-sized studies); recorded, part of the task
        ids = {s: (a if s == "train" else a[: int(eval_tokens)]) for s, a in ids.items()}
    val = TokenSplit(ids["valid"], context, device)
    test = TokenSplit(ids["test"], context, device)
    meta = {
        "source": f"{_SMERITY}/{SPECS[name][variant][1]}",
        "license": "CC BY-SA 3.0",
        "root": str(files["train"].parent),
        "variant": variant,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "context": context,
        "tokens": {s: int(len(a)) for s, a in ids.items()},
        "eval_tokens": eval_tokens,
        "unigram_ppl": unigram_perplexity(ids["train"], vocab_size),  # exp(entropy) of the training split
        "unigram_ppl_valid": unigram_model_perplexity(ids["train"], ids["valid"], vocab_size),
        "cached": cached,
    }
    return DataBundle(
        name=name,
        task="lm",
        train=train,
        test=test,
        val=val,
        num_classes=vocab_size,
        input_shape=(context,),
        class_names=None,
        meta=meta,
    )


def wikitext2(data_dir, device, seed, **options) -> DataBundle:
    """``conf/dataset/wikitext2.yaml``: WikiText-2 (Merity et al. 2017), 2.1M/218K/246K word tokens."""
    return build_wikitext("wikitext2", Path(data_dir), device, **options)


def wikitext103(data_dir, device, seed, **options) -> DataBundle:
    """``conf/dataset/wikitext103.yaml``: WikiText-103 (Merity et al. 2017), 103M word tokens."""
    return build_wikitext("wikitext103", Path(data_dir), device, **options)
