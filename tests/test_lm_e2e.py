"""End to end through the CLI: GPT-2 on WikiText (a tiny tree in the release layout, and the real
WikiText-2 of ../shared/data when present), ViT on digits, and ViT / ResNet-18 on the CIFAR-10 JPEG tree."""

import math
import random
import tarfile
from pathlib import Path

import pytest

from tests.conftest import harness, records

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def grammar_text(n_lines: int, seed: int) -> str:
    """Sentences of a tiny grammar: after "the" comes a noun, after a noun a verb, ... so a model that
    reads its context predicts far better than the word frequencies alone."""
    rng = random.Random(seed)
    nouns, verbs = ["cat", "dog", "bird", "fish", "cow", "fox"], ["sees", "eats", "likes", "chases"]
    lines = []
    for _ in range(n_lines):
        words = []
        for _ in range(rng.randint(1, 3)):
            words += ["the", rng.choice(nouns), rng.choice(verbs), "a", rng.choice(nouns), rng.choice([".", ","])]
        lines.append(" " + " ".join(words) + " ")
    return "\n".join(lines) + "\n"


def unigram_ppl(text: str) -> float:
    from collections import Counter

    words = [w for line in text.splitlines() for w in line.split() + ["<eos>"]]
    p = [c / len(words) for c in Counter(words).values()]
    return math.exp(-sum(q * math.log(q) for q in p))


def test_gpt2_tiny_on_wikitext_tree_writes_lm_record(tmp_path):
    d = tmp_path / "data" / "wikitext-2"
    d.mkdir(parents=True)
    train = grammar_text(400, 0)
    for split, text in (("train", train), ("valid", grammar_text(40, 1)), ("test", grammar_text(40, 2))):
        (d / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    p = harness(
        "run",
        "model=gpt2_tiny",
        "dataset=wikitext2",
        "dataset.context=16",
        "dataset.download=false",
        "optimizer=adamw",
        "optimizer.lr=3e-3",
        "trainer.epochs=3",
        "trainer.batch_size=16",
        "trainer.eval_batch_size=32",
        "trainer.progress=none",
        "task.target=null",
        "schedule.warmup_epochs=0",
        f"data_dir={tmp_path / 'data'}",
        f"results_dir={tmp_path / 'results'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path / "results")
    m = rec["metrics"]
    assert rec["status"] == "ok" and rec["dataset_info"]["task"] == "lm"
    for k in ("val_loss", "val_ppl", "test_loss", "test_ppl", "train_loss"):
        assert math.isfinite(m[k]), k
    assert m["test_ppl"] == pytest.approx(math.exp(m["test_loss"]))
    # learned the grammar: far below the perplexity of word frequencies alone
    assert m["val_ppl"] < 0.6 * unigram_ppl(train), (m["val_ppl"], unigram_ppl(train))
    assert "val_ppl" in rec["curve"][0] and len(rec["curve"]) == 3
    thr = rec["throughput"]
    assert thr["tokens_per_s"] == pytest.approx(16 * thr["samples_per_s"])  # windows of 16 tokens
    assert thr["mfu"] is None and rec["hardware"]["peak_flops"] is None  # CPU: no peak figure
    info = rec["model_info"]
    vocab = rec["dataset_info"]["vocab_size"]
    padded = -(-vocab // 64) * 64
    # 2 blocks of 128: 12*128^2 weights + 13*128 biases/gains each, final LayerNorm, token and position tables
    params = 2 * (12 * 128 * 128 + 13 * 128) + 2 * 128 + padded * 128 + 16 * 128
    assert info["params"] == params
    assert info["flops_per_sample"] == 6 * (params - 16 * 128) + 12 * 2 * 4 * 32 * 16  # per token


def test_vit_tiny_on_digits_writes_vision_record(tmp_path):
    p = harness(
        "run",
        "model=vit_tiny",
        "dataset=digits",
        "model.depth=2",  # two blocks keep the CPU epoch short; the blocks are the same at any depth
        "trainer.epochs=1",
        "trainer.batch_size=64",
        "trainer.progress=none",
        "optimizer=adamw",
        f"results_dir={tmp_path / 'results'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path / "results")
    m = rec["metrics"]
    assert rec["status"] == "ok" and rec["dataset_info"]["task"] == "classification"
    assert 0.0 <= m["test_acc"] <= 1.0 and math.isfinite(m["test_loss"])
    assert "test_ppl" not in m and "tokens_per_s" not in rec["throughput"]
    # ViT-Ti: 192 wide, 2x2 patches (16 + class token), 2 blocks of 12*192^2 weights + 13*192 biases/gains
    blocks = 2 * (12 * 192 * 192 + 13 * 192)
    embed = 1 * 2 * 2 * 192 + 192 + 17 * 192 + 192  # patch projection + bias, position table, class token
    assert rec["model_info"]["params"] == blocks + embed + 2 * 192 + 192 * 10 + 10
    assert rec["model_info"]["flops_per_sample"] > 6 * blocks * 17


@pytest.fixture
def wikitext2_small_eval(tmp_path):
    """The real WikiText-2 training split and the first ~10k tokens of its validation and test splits
    (evaluating the full 218k/246k tokens through a 33,278-way softmax takes minutes on 2 CPU cores)."""
    src = SHARED / "wikitext-2"
    if not (src / "wiki.train.tokens").is_file():
        pytest.skip(f"WikiText-2 not available at {src}")
    d = tmp_path / "data" / "wikitext-2"
    d.mkdir(parents=True)
    (d / "wiki.train.tokens").symlink_to(src / "wiki.train.tokens")
    for split in ("valid", "test"):
        lines, n = [], 0
        with open(src / f"wiki.{split}.tokens", encoding="utf-8") as f:
            for line in f:
                lines.append(line)
                n += len(line.split()) + 1
                if n >= 10_000:
                    break
        (d / f"wiki.{split}.tokens").write_text("".join(lines), encoding="utf-8")
    return tmp_path / "data"


def test_gpt2_tiny_beats_unigram_perplexity_on_wikitext2(tmp_path, wikitext2_small_eval):
    p = harness(
        "run",
        "task=gpt2_tiny_wikitext2",
        "model.n_embd=64",
        "dataset.context=32",
        "dataset.steps_per_epoch=150",
        "dataset.download=false",
        "trainer.max_steps=150",
        "trainer.progress=none",
        f"data_dir={wikitext2_small_eval}",
        f"results_dir={tmp_path / 'results'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path / "results")
    info = rec["dataset_info"]
    assert info["vocab_size"] == 33_278 and info["tokens"]["train"] == 2_088_628
    unigram = info["unigram_ppl"]
    assert 1000 < unigram < 1300  # word frequencies of the training split alone
    assert rec["metrics"]["val_ppl"] < unigram, (rec["metrics"]["val_ppl"], unigram)
    assert rec["steps"] == 150


@pytest.fixture(scope="module")
def cifar_jpeg_subset(tmp_path_factory):
    """10 training and 5 test images per class from the CIFAR-10 JPEG tree (one short CPU epoch)."""
    archive = SHARED / "cifar10-jpeg.tar.xz"
    if not archive.is_file():
        pytest.skip(f"CIFAR-10 JPEG tree not available at {archive}")
    out = tmp_path_factory.mktemp("cifar_jpeg")
    keep = {"train": 10, "test": 5}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(archive, "r:xz") as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/<file>.jpg
            if not member.isfile() or len(parts) != 4:
                continue
            key = (parts[1], parts[2])
            if counts.get(key, 0) < keep[parts[1]]:
                counts[key] = counts.get(key, 0) + 1
                tar.extract(member, out, filter="data")
    assert len(counts) == 20
    return out / "cifar10-jpeg"


@pytest.mark.parametrize("model", ["vit_tiny", "resnet18"])
def test_one_epoch_on_cifar10_jpeg_imagefolder(tmp_path, cifar_jpeg_subset, model):
    p = harness(
        "run",
        "task=resnet18_cifar10",  # a task's model and dataset may be swapped on purpose (its identity then differs)
        f"model={model}",
        "dataset=imagefolder",
        "dataset.val_size=0",
        f"dataset.root={cifar_jpeg_subset}",
        "dataset.image_size=32",
        "dataset.crop_pct=1.0",
        "dataset.num_workers=0",  # in-process decoding: no worker start-up on 2 busy cores
        "optimizer=adamw",
        "trainer.epochs=1",
        "trainer.batch_size=25",
        "trainer.progress=none",
        f"results_dir={tmp_path / 'results'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path / "results")
    assert rec["status"] == "ok" and rec["steps"] == 4  # 100 images, batches of 25
    assert rec["dataset_info"]["num_classes"] == 10 and rec["dataset_info"]["input_shape"] == [3, 32, 32]
    assert 0.0 <= rec["metrics"]["test_acc"] <= 1.0 and math.isfinite(rec["metrics"]["test_loss"])
    assert rec["model_info"]["flops_per_sample"] > 0
