"""What a dataset will look like, known before it loads: task, input shape, classes (or vocabulary)
and split sizes. Pre-flight checks (memory, batch size against the training split) use it, so a run
that cannot work is refused before minutes of loading and tokenising."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness.data.base import check_label_noise
from harness.errors import ConfigError

# datasets whose builders apply dataset.label_noise (device-resident image splits)
LABEL_NOISE_DATASETS = ("digits", "cifar10", "cifar100", "synthetic")
# vocabulary sizes of the WikiText tokenizers (word: types of the training split incl. <unk>, <eos>)
WIKITEXT_VOCAB = {("wikitext2", "word"): 33_278, ("wikitext103", "word"): 267_735, "byte": 256, "gpt2": 50_257}
WIKITEXT_TRAIN_TOKENS = {"wikitext2": 2_088_628, "wikitext103": 103_227_021}
FOLDER_CLASSES = {
    "imagenette": 10,
    "imagenette160": 10,
    "imagewoof": 10,
    "imagewoof160": 10,
    "tinyimagenet": 200,
    "imagenet100": 100,
}
FOLDER_TRAIN = {
    "imagenette": 9_469,
    "imagenette160": 9_469,
    "imagewoof": 9_025,
    "imagewoof160": 9_025,
    "tinyimagenet": 100_000,
    "imagenet100": 126_689,
}


@dataclass(frozen=True)
class DataSpec:
    task: str  # classification | lm
    input_shape: tuple[int, ...]
    num_classes: int  # classes, or vocabulary size
    train_size: int | None  # samples (images) of the training split after the validation split is carved; None: unknown
    resident_bytes: int  # bytes the dataset keeps in memory (device-resident tensors, token ids)


def _cached_vocab(data_dir: Path, name: str, tokenizer: str) -> int | None:
    for meta in sorted((data_dir / name.replace("wikitext", "wikitext-")).glob(".harness-cache/*.json")):
        try:
            spec = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if spec.get("tokenizer") == tokenizer and spec.get("vocab_size"):
            return int(spec["vocab_size"])
    return None


def data_spec(cfg, data_dir: str | Path) -> DataSpec:
    """The shape of ``cfg`` (a dataset config) without loading it. Refuses ``dataset.label_noise``
    outside [0, 1) or on a dataset whose builder does not apply it (language models, image folders)."""
    name, data_dir = str(cfg.name), Path(data_dir)
    noise, noise_seed = cfg.get("label_noise"), cfg.get("noise_seed", 0)
    if noise is not None or "noise_seed" in cfg:
        if check_label_noise(0.0 if noise is None else noise, noise_seed) and name not in LABEL_NOISE_DATASETS:
            kind = "a language-model dataset" if name.startswith("wikitext") or cfg.get("tokenizer") else "this dataset"
            raise ConfigError(
                f"dataset.label_noise={noise} is not supported by dataset={name} ({kind}); it applies to the "
                f"device-resident image datasets: {', '.join(LABEL_NOISE_DATASETS)}"
            )
    val = int(cfg.get("val_size") or 0)
    subset = cfg.get("train_subset")

    def images(n_train: int | None, n_total: int, shape: tuple[int, ...], classes: int) -> DataSpec:
        train = None if n_train is None else (min(int(subset), n_train - val) if subset else n_train - val)
        pixels = 1
        for d in shape:
            pixels *= d
        return DataSpec("classification", shape, classes, train, n_total * pixels)

    if name == "digits":
        return images(int(cfg.train_size), 1797, (1, 8, 8), 10)
    if name in ("cifar10", "cifar100"):
        return images(50_000, 60_000, (3, 32, 32), 10 if name == "cifar10" else 100)
    if name == "synthetic":
        c, s = int(cfg.channels), int(cfg.image_size)
        return images(int(cfg.train_size), int(cfg.train_size) + int(cfg.test_size), (c, s, s), int(cfg.num_classes))
    if name.startswith("wikitext"):
        tok = str(cfg.get("tokenizer", "word"))
        vocab = _cached_vocab(data_dir, name, tok) or WIKITEXT_VOCAB.get((name, tok)) or WIKITEXT_VOCAB.get(tok, 50_257)
        tokens = WIKITEXT_TRAIN_TOKENS.get(name, 2_088_628)
        itemsize = 2 if vocab < 2**16 else 4
        # the word tokenizer holds the text's Python strings while it builds the ids (first run only)
        return DataSpec("lm", (int(cfg.context),), vocab, None, int(tokens * 1.2 * itemsize))
    size = int(cfg.get("image_size", 224))
    classes = FOLDER_CLASSES.get(name)
    root = cfg.get("root")
    if classes is None and root:
        train_dir = (data_dir / str(root)) / "train"
        classes = sum(1 for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else None
    return DataSpec("classification", (3, size, size), classes or 1000, FOLDER_TRAIN.get(name), 0)
