"""Fine-tune populations (issue #13): the paper's regime, many fine-tunes of ONE pretrained model.

Two studies, each through :func:`quotientsharp.studies.transformer_run.run_study` (same units,
resuming, stale-result refusal, measures, τ statistics and outputs as the from-scratch studies):

- ``vit`` (the model-soups analogue): a ViT pretrained once on Fashion-MNIST (60k), fine-tuned
  on MNIST-5k (4k/1k) with AdamW and hyperparameters drawn at random per model
  (:func:`vit_population`): learning rate log-uniform over two decades, weight decay
  log-uniform, epochs, label smoothing, mixup α and augmentation strength (random shift).
- ``text`` (the BERTs-of-a-feather analogue): a HuggingFace ``BertForMaskedLM`` built from a
  config and pretrained once with masked-language modelling on the offline corpora (WordNet
  glosses, BBC News, the tweet texts of the fine-tune training split, no labels), then copied
  into ``BertForSequenceClassification`` and fine-tuned on the 3-way tweet sentiment task with
  identical hyperparameters, differing only in seed (pooler/classifier init, data order,
  dropout) (:func:`text_population`; ``hparams="random"`` draws them instead).

The pretrained checkpoint is cached as ``<pretrain_dir>/<kind>-<key>.{pt,json}``, ``key`` the
SHA-256 of its configuration: a rerun (or another study with the same configuration) reuses it,
a changed configuration gets a new file. Every model's hyperparameters carry the key, so a
stored fine-tune or measure of another checkpoint is refused, never reused.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..curvature.layerwise import parse_value_name
from ..data import ClassificationData, get_dataset
from ..data.common import require_file, stratified_split
from ..data.text import (
    WORDNET_DIR,
    WORDNET_INSTALL,
    Vocab,
    load_tweets,
    read_bbc,
    read_tweets,
    read_wordnet_glosses,
    tokenize,
)
from ..models import TinyViT
from ..train import mixup, random_shift, train_classifier
from . import transformers as study
from .report import difference_text, tau_cell, tau_ci_text, tau_table, write_json_atomic
from .runner import Executor, sequential

KINDS = ("vit", "text")


# --------------------------------------------------------------------------- the pretrained cache
def config_key(kind: str, config: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of ``kind`` and the canonical JSON of ``config``."""
    text = json.dumps({"kind": kind, "config": config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (in key order)."""
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def checkpoint_paths(pretrain_dir: str | Path, kind: str, config: Mapping[str, Any]) -> tuple[Path, Path]:
    """``(<dir>/<kind>-<key>.pt, <dir>/<kind>-<key>.json)``."""
    stem = Path(pretrain_dir) / f"{kind}-{config_key(kind, config)}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def pretrained(kind: str, config: Mapping[str, Any], pretrain_dir: str | Path,
               progress: bool = False) -> tuple[Path, dict]:
    """The cached checkpoint of ``config`` (pretrained now if absent): ``(state-dict path, record)``.

    The record holds the configuration, its key, the state digest, wall time and the source-task
    metrics. A cached file whose record or digest disagrees raises instead of being reused."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    pt, meta = checkpoint_paths(pretrain_dir, kind, config)
    config = json.loads(json.dumps(config))
    if pt.exists() and meta.exists():
        record = json.loads(meta.read_text())
        if record["config"] != config:
            raise ValueError(f"{meta} holds another configuration than its key says; delete it")
        if state_digest(torch.load(pt, weights_only=True)) != record["state_sha256"]:
            raise ValueError(f"{pt} does not match the digest in {meta}; delete both to pretrain again")
        return pt, record
    model, record = PRETRAINERS[kind](config, progress)
    pt.parent.mkdir(parents=True, exist_ok=True)
    study.save_state_dict(model, pt)
    record = {"kind": kind, "key": config_key(kind, config), "config": config,
              "state_sha256": state_digest(model.state_dict()), "torch": torch.__version__,
              "threads": torch.get_num_threads(), **record}
    write_json_atomic(meta, record)
    return pt, record


# --------------------------------------------------------------------------- vision
def build_vit(arch: Mapping[str, Any], n_classes: int) -> TinyViT:
    """TinyViT on 28×28 grayscale images, patch ``arch["patch_size"]``."""
    dims = {k: v for k, v in arch.items() if k != "patch_size"}
    return TinyViT(image_size=28, patch_size=arch["patch_size"], in_channels=1, n_classes=n_classes, **dims)


def pretrain_vit(config: Mapping[str, Any], progress: bool = False) -> tuple[nn.Module, dict]:
    """Supervised pretraining on the source task (AdamW, ±``shift`` pixel shifts)."""
    data = get_dataset(config["data"]["name"], **config["data"].get("kwargs", {}))
    torch.manual_seed(config["seed"])
    model = build_vit(config["arch"], data.n_classes)
    history = train_classifier(model, data.train, epochs=config["epochs"], batch_size=config["batch_size"],
                               lr=config["lr"], weight_decay=config["weight_decay"],
                               augment=partial(random_shift, max_shift=config["shift"]), seed=config["seed"],
                               progress=progress)
    record = study.trained_record(model, data, history)
    return model, {"seconds": history["wall_time"], "source": {k: v for k, v in record.items() if k != "history"},
                   "history": history}


def vit_population(n_models: int, seed: int = 0, epochs: Sequence[int] = tuple(range(2, 9)),
                   lr: tuple[float, float] = (5e-5, 5e-3)) -> list[dict]:
    """Fine-tune hyperparameters shaped like the model soups' random search; model i depends only
    on ``(seed, i)``. lr log-uniform on ``lr`` (two decades; in a pilot from a Fashion-MNIST ViT,
    4 epochs at 1e-2 fell to 62% test accuracy and at 1e-4 underfit at 71%, against 87% at
    1e-3), weight decay log-uniform on [8e-5, 0.53], epochs uniform on ``epochs`` (the soups'
    4–16 halved for CPU), label smoothing U[0, 0.23], mixup α U[0, 0.88] (half the models
    without mixup), augmentation strength: random shifts of up to 0–3 pixels (batch 128)."""
    models = []
    for i in range(n_models):
        rng = np.random.default_rng([seed, 7, i])
        mix = float(rng.uniform(0, 0.88))
        models.append({"id": f"ftvit{i:03d}", "index": i,
                       "lr": float(10 ** rng.uniform(math.log10(lr[0]), math.log10(lr[1]))),
                       "weight_decay": float(10 ** rng.uniform(math.log10(8e-5), math.log10(0.53))),
                       "epochs": int(epochs[int(rng.integers(len(epochs)))]),
                       "label_smoothing": float(rng.uniform(0, 0.23)),
                       "mixup": mix if rng.random() < 0.5 else 0.0,
                       "augment_shift": int(rng.integers(4)), "batch_size": 128,
                       "init_seed": seed * 100_003 + i})
    return models


def finetune_vit(config: Mapping[str, Any], data: ClassificationData, hp: Mapping[str, Any]) -> tuple[nn.Module, dict]:
    """Load the pretrained ViT, re-initialise its head (seed ``init_seed``), fine-tune with AdamW."""
    path, record = pretrained("vit", config["pretrain"], config["pretrain_dir"])
    model = build_vit(record["config"]["arch"], data.n_classes)
    model.load_state_dict(torch.load(path, weights_only=True))
    torch.manual_seed(hp["init_seed"])
    model.head.reset_parameters()
    shift = partial(random_shift, max_shift=hp["augment_shift"]) if hp["augment_shift"] else None
    mix = partial(mixup, alpha=hp["mixup"], n_classes=data.n_classes) if hp["mixup"] > 0 else None
    history = train_classifier(model, data.train, epochs=hp["epochs"], batch_size=hp["batch_size"], lr=hp["lr"],
                               weight_decay=hp["weight_decay"], optimizer="adamw",
                               label_smoothing=hp["label_smoothing"], augment=shift, mix=mix,
                               seed=hp["init_seed"], progress=False)
    return model, study.trained_record(model, data, history)


def load_vit(config, data, hp, path) -> nn.Module:
    """The fine-tuned ViT stored at ``path`` (a state dict), rebuilt from ``config["pretrain"]["arch"]``
    with ``data.n_classes`` outputs, in eval mode.
    """
    model = build_vit(config["pretrain"]["arch"], data.n_classes)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def target_data(config: Mapping[str, Any]) -> ClassificationData:
    """The fine-tune task; text is encoded with the pretrained model's vocabulary."""
    spec = config["data"]
    if config["kind"] == "text":
        _, record = pretrained("text", config["pretrain"], config["pretrain_dir"])
        return load_tweets(**spec.get("kwargs", {}), vocab=Vocab(record["vocab"]))
    return get_dataset(spec["name"], **spec.get("kwargs", {}))


VIT_FINETUNE = study.Recipe(target_data, finetune_vit, load_vit)


# --------------------------------------------------------------------------- text
class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` on word-id tensors: prepends ``[CLS]`` (id ``cls_id``),
    masks padding (id 0) and returns the logits. Input ``(B, T)`` int64, output ``(B, n_classes)``."""

    def __init__(self, bert: nn.Module, cls_id: int):
        super().__init__()
        self.bert, self.cls_id = bert, cls_id

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([torch.full_like(tokens[:, :1], self.cls_id), tokens], dim=1)
        return self.bert(input_ids=ids, attention_mask=(ids != 0).long()).logits


def bert_config(config: Mapping[str, Any], vocab_len: int, num_labels: int = 2):
    """The ``BertConfig`` of a pretraining config: word vocabulary + [CLS] + [MASK], positions for
    ``max_len`` + 1, eager attention (double backward on every backend)."""
    from transformers import BertConfig

    bert = BertConfig(vocab_size=vocab_len + 2, max_position_embeddings=config["max_len"] + 1, pad_token_id=0,
                      num_labels=num_labels, **config["arch"])
    bert._attn_implementation = "eager"
    return bert


def pretraining_corpus(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """Texts per source, no labels: WordNet glosses (all four parts of speech), BBC News articles
    cut into ``max_len``-token pieces, and the tweets of the fine-tune *training* split only
    (the dev tweets never enter pretraining). ``max_per_source`` (quick runs) keeps the first ones."""
    corpus = config["corpus"]
    out: dict[str, list[str]] = {}
    if corpus.get("wordnet"):
        glosses = []
        for pos in ("noun", "verb", "adj", "adv"):
            glosses += read_wordnet_glosses(require_file(WORDNET_DIR / f"data.{pos}", "WordNet", WORDNET_INSTALL))[0]
        out["wordnet"] = glosses
    if corpus.get("bbc"):
        L = config["max_len"]
        pieces = []
        for text in read_bbc()[0]:
            words = tokenize(text)
            pieces += [" ".join(words[i:i + L]) for i in range(0, len(words), L)]
        out["bbc"] = pieces
    if corpus.get("tweets"):
        split = corpus["tweets"]
        texts, labels, _, _ = read_tweets(split.get("min_confidence", 0.6))
        train_idx, _ = stratified_split(labels, split["n_train"], split["n_test"], split.get("seed", 0))
        out["tweets"] = [texts[i] for i in train_idx]
    cap = corpus.get("max_per_source")
    return {k: v[:cap] if cap else v for k, v in out.items()}


def mask_tokens(ids: torch.Tensor, generator: torch.Generator, mask_id: int, vocab_len: int,
                prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each real word (id ≥ 2) is a target with probability ``prob``; a target
    becomes [MASK] (80%), a random word (10%) or stays (10%). Returns ``(inputs, labels)``,
    labels −100 off target."""
    target = (torch.rand(ids.shape, generator=generator) < prob) & (ids >= 2)
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    random_words = torch.randint(2, vocab_len, ids.shape, generator=generator)
    inputs = torch.where(target & (r < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(target & (r >= 0.8) & (r < 0.9), random_words, inputs)
    return inputs, labels


def pretrain_bert(config: Mapping[str, Any], progress: bool = False) -> tuple[nn.Module, dict]:
    """Masked-language-model pretraining of ``BertForMaskedLM`` (from a config, nothing downloaded):
    word vocabulary built on the corpus, AdamW with linear warm-up and decay."""
    from transformers import BertForMaskedLM

    corpus = pretraining_corpus(config)
    texts = [t for source in corpus.values() for t in source]
    vocab = Vocab.build(texts, config["vocab_size"])
    ids = vocab.encode(texts, config["max_len"])
    ids = ids[(ids >= 2).sum(1) >= 2]  # at least two real words
    cls_id, mask_id = len(vocab), len(vocab) + 1
    torch.manual_seed(config["seed"])
    model = BertForMaskedLM(bert_config(config, len(vocab)))
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    steps = config["epochs"] * math.ceil(len(ids) / config["batch_size"])
    warm = max(1, int(config["warmup"] * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    generator = torch.Generator().manual_seed(config["seed"])
    history: dict[str, list] = {"mlm_loss": [], "mlm_acc": [], "epoch_time": []}
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        model.train()
        for _ in tqdm(range(config["epochs"]), desc="pretrain", disable=not progress):
            t0, loss_sum, correct, n_targets = time.perf_counter(), 0.0, 0, 0
            for batch in torch.randperm(len(ids), generator=generator).split(config["batch_size"]):
                inputs, labels = mask_tokens(ids[batch], generator, mask_id, len(vocab), config["mask_prob"])
                inputs = torch.cat([torch.full_like(inputs[:, :1], cls_id), inputs], dim=1)
                labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
                out = model(input_ids=inputs, attention_mask=(inputs != 0).long(), labels=labels)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                sched.step()
                k = int((labels != -100).sum())
                loss_sum += float(out.loss.detach()) * k
                correct += int((out.logits.argmax(-1) == labels).sum())
                n_targets += k
            history["mlm_loss"].append(loss_sum / n_targets)
            history["mlm_acc"].append(correct / n_targets)
            history["epoch_time"].append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    return model, {"seconds": seconds, "history": history, "vocab": vocab.tokens,
                   "corpus": {k: len(v) for k, v in corpus.items()}, "n_sequences": len(ids),
                   "n_params": sum(p.numel() for p in model.parameters())}


TEXT_HPARAMS = {"lr": 3e-4, "weight_decay": 0.01, "epochs": 3, "batch_size": 32, "label_smoothing": 0.0}
"""The one recipe of every seed-only text fine-tune (AdamW, constant lr, BERT's dropout 0.1)."""


def text_population(n_models: int, seed: int = 0, hparams: str = "seeds",
                    fixed: Mapping[str, Any] = TEXT_HPARAMS) -> list[dict]:
    """``hparams="seeds"``: identical hyperparameters ``fixed``, model i differing only in
    ``init_seed`` (pooler/classifier init, data order, dropout). ``"random"``: lr log-uniform on
    [1e-5, 1e-3], weight decay log-uniform on [1e-4, 0.1], 1–4 epochs, label smoothing U[0, 0.2]
    (batch 32). Model i depends only on ``(seed, i)``."""
    if hparams not in ("seeds", "random"):
        raise ValueError(f"hparams must be 'seeds' or 'random', got {hparams!r}")
    models = []
    for i in range(n_models):
        hp = dict(fixed)
        if hparams == "random":
            rng = np.random.default_rng([seed, 11, i])
            hp.update(lr=float(10 ** rng.uniform(-5, -3)), weight_decay=float(10 ** rng.uniform(-4, -1)),
                      epochs=int(rng.integers(1, 5)), label_smoothing=float(rng.uniform(0, 0.2)))
        tag = "ftext" if hparams == "seeds" else "ftextr"
        models.append({"id": f"{tag}{i:03d}", "index": i, **hp, "init_seed": seed * 100_003 + i})
    return models


def build_bert_classifier(pretrain: Mapping[str, Any], vocab_len: int, n_classes: int) -> BertClassifier:
    """An untrained :class:`BertClassifier` (HF ``BertForSequenceClassification`` from
    :func:`bert_config`) with ``n_classes`` labels over a vocabulary of ``vocab_len`` tokens.
    """
    from transformers import BertForSequenceClassification

    return BertClassifier(BertForSequenceClassification(bert_config(pretrain, vocab_len, n_classes)), vocab_len)


def finetune_text(config: Mapping[str, Any], data: ClassificationData, hp: Mapping[str, Any]) -> tuple[nn.Module, dict]:
    """Seeded fresh pooler and classifier, the pretrained encoder copied in, AdamW fine-tuning."""
    path, record = pretrained("text", config["pretrain"], config["pretrain_dir"])
    torch.manual_seed(hp["init_seed"])
    model = build_bert_classifier(record["config"], len(record["vocab"]), data.n_classes)
    state = {k: v for k, v in torch.load(path, weights_only=True).items() if k.startswith("bert.")}
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("bert.pooler.", "classifier.")) for k in missing):
        raise ValueError(f"checkpoint {path} does not fit: missing {missing}, unexpected {unexpected}")
    history = train_classifier(model, data.train, epochs=hp["epochs"], batch_size=hp["batch_size"], lr=hp["lr"],
                               weight_decay=hp["weight_decay"], optimizer="adamw",
                               label_smoothing=hp["label_smoothing"], seed=hp["init_seed"], progress=False)
    return model, study.trained_record(model, data, history)


def load_text(config, data, hp, path) -> nn.Module:
    """The fine-tuned BERT classifier stored at ``path`` (a state dict), rebuilt with the pretrained
    configuration and ``data``'s vocabulary, in eval mode.
    """
    model = build_bert_classifier(config["pretrain"], len(data.vocab), data.n_classes)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


TEXT_FINETUNE = study.Recipe(target_data, finetune_text, load_text)
PRETRAINERS = {"vit": pretrain_vit, "text": pretrain_bert}
RECIPES = {"vit": VIT_FINETUNE, "text": TEXT_FINETUNE}


# --------------------------------------------------------------------------- configuration
def pretrain_config(kind: str, quick: bool = False, seed: int = 0) -> dict:
    """Full: ViT width 64, 3 layers (TinyViT has 2), 4 heads, patch 7, 6 epochs on all 60k
    Fashion-MNIST images; BERT width 64, 2 layers, 4 heads, MLP 256, vocabulary 5k, one epoch of
    MLM over the whole corpus (~165k pieces; width 128 would make every measurement ~4× dearer
    on CPU). Quick: a width-32 ViT, 3 epochs on 10k images; a width-64 BERT with 2 heads,
    1 epoch on ≤ 2k texts per source."""
    if kind == "vit":
        return {"data": {"name": "fashion_mnist", "kwargs": {"train_subset": 10000 if quick else None}},
                "arch": ({"d_model": 32, "depth": 2, "n_heads": 2, "mlp_dim": 64, "patch_size": 7} if quick else
                         {"d_model": 64, "depth": 3, "n_heads": 4, "mlp_dim": 128, "patch_size": 7}),
                "epochs": 3 if quick else 6, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "shift": 2,
                "seed": seed}
    if kind == "text":
        split = {"n_train": 2000, "n_test": 500} if quick else {"n_train": 20000, "n_test": 5000}
        return {"corpus": {"wordnet": True, "bbc": True, "tweets": {**split, "min_confidence": 0.6, "seed": 0},
                           **({"max_per_source": 2000} if quick else {})},
                "vocab_size": 2000 if quick else 5000, "max_len": 32,
                "arch": ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
                         if quick else
                         {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}),
                "epochs": 1, "batch_size": 128, "lr": 1e-3 if quick else 5e-4, "warmup": 0.05,
                "weight_decay": 0.01, "mask_prob": 0.15, "seed": seed}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


FINETUNE_LAYER_RENYI = {"layer_slq_probes": 2, "layer_batches": 1}
"""Per-layer Rényi in the fine-tune studies (issue 13 §4): one SLQ run per weight tensor (20 on the
ViT, 17 on the BERT) with the study's m but 2 probes on the first batch: measured about the cost of
the full-Hessian SLQ (8 probes on 2 batches) instead of ~20x it; one α/layer choice per population."""


def finetune_config(kind: str, out: str | Path, *, quick: bool = False, n_models: int | None = None,
                    seed: int = 0, pretrain_dir: str | Path | None = None, hparams: str = "seeds",
                    **plan_overrides) -> dict:
    """The study configuration for :func:`~quotientsharp.studies.transformer_run.run_study`.

    The paper's measurement protocol: 8 fixed batches of 256 training images (2048) / of 128
    tweets (1024) for every sharpness measure; the Hessian-spectrum units
    (:data:`~quotientsharp.studies.transformer_measures.SPECTRAL_MEASURES`) take the first 2 of them
    (``spectral_batches``; measured: SLQ alone took 217 CPU-s per ViT on all 2048 images, the
    worst-case sharpness measures 13–15 s each). The plan is otherwise the from-scratch studies'
    (their default measures) plus per-layer Rényi (:data:`FINETUNE_LAYER_RENYI`). Quick: 4 models, 2 batches of 32, the quick plan; text shrinks to
    2k/500 tweets, the ViT fine-tunes run 4 or 6 epochs."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    pre = pretrain_config(kind, quick, seed)
    key = config_key(kind, pre)
    layer = {"measures": study.default_measures() + ["layer_renyi"], **FINETUNE_LAYER_RENYI}
    plan = study.study_config(kind, quick=quick, **layer | ({} if quick else {"spectral_batches": 2}) | plan_overrides)["plan"]
    n = n_models or (4 if quick else (72 if kind == "vit" else 48))
    if kind == "vit":
        models = vit_population(n, seed, epochs=(4, 6) if quick else tuple(range(2, 9)))
        data = {"name": "mnist5k", "kwargs": {}}
    else:
        fixed = dict(TEXT_HPARAMS, **({"epochs": 4} if quick else {}))
        models = text_population(n, seed, hparams, fixed)
        split = pre["corpus"]["tweets"]
        data = {"name": "tweets", "kwargs": {"n_train": split["n_train"], "n_test": split["n_test"],
                                             "min_confidence": split["min_confidence"], "seed": split["seed"],
                                             "max_len": pre["max_len"]}}
    for hp in models:
        hp["pretrained"] = key
    subset = ({"n_batches": 2, "batch_size": 32, "seed": seed} if quick else
              {"n_batches": 8, "batch_size": 256 if kind == "vit" else 128, "seed": seed})
    return {"task": kind, "regime": "finetune", "kind": kind, "hparams": hparams if kind == "text" else "random",
            "data": data, "arch": {"pretrained": key}, "pretrain": pre,
            "pretrain_dir": str(Path(pretrain_dir) if pretrain_dir else Path(out) / "pretrained"),
            "models": models, "subset": subset, "plan": plan, "seed": seed, "n_boot": 2000 if not quick else 500}


def run_finetune_study(out: str | Path, config: Mapping[str, Any], progress: bool = True,
                       executor: Executor = sequential) -> dict:
    """Pretrain (or reuse) the checkpoint, then :func:`~quotientsharp.studies.transformer_run.run_study` the population; the summary
    gains ``"pretrained"`` (key, wall time, source metrics), ``"measurement"`` (sizes) and
    ``"timing"`` (seconds per phase and per model)."""
    _, record = pretrained(config["kind"], config["pretrain"], config["pretrain_dir"], progress=progress)
    summary = study.run_study(out, config, progress=progress, executor=executor, recipe=RECIPES[config["kind"]])
    n = summary["n_models"]
    train_s = [r["train_seconds"] for r in summary["models"]]
    summary["pretrained"] = {k: v for k, v in record.items() if k not in ("vocab", "history")} | {
        "vocab_size": len(record["vocab"]) if "vocab" in record else None, "history": record["history"]}
    sub = config["subset"]
    spectral = min(config["plan"].get("spectral_batches") or sub["n_batches"], sub["n_batches"])
    summary["measurement"] = {"n_batches": sub["n_batches"], "batch_size": sub["batch_size"],
                              "n_examples": sub["n_batches"] * sub["batch_size"], "seed": sub["seed"],
                              "spectral_measures": list(study.SPECTRAL_MEASURES), "spectral_batches": spectral,
                              "spectral_examples": spectral * sub["batch_size"]}
    summary["timing"] = {"pretrain_s": record["seconds"], "finetune_s_per_model": {
        "mean": sum(train_s) / n, "min": min(train_s), "max": max(train_s)},
        "measure_s_per_model": sum(summary["seconds"]["measures"].values()) / n,
        "measure_s_per_measure_per_model": {k: v / n for k, v in summary["seconds"]["measures"].items()}}
    out = Path(out)
    write_json_atomic(out / "summary.json", summary)
    return summary


def progress_report(out: str | Path) -> dict:
    """What a (possibly running or stopped) study in ``out`` has finished, from its unit files:
    fine-tuned models, models with every planned measure, accuracy and gap ranges of the trained
    ones, and the measured seconds per phase (pretraining, fine-tune and measuring per model)."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    records = {}
    for hp in config["models"]:
        path = out / "models" / f"{hp['id']}.json"
        if path.exists():
            records[hp["id"]] = json.loads(path.read_text())["result"]
    measured, measure_s = [], []
    for model_id in records:
        units = [out / "measures" / model_id / f"{name}.json" for name in config["plan"]["measures"]]
        if all(u.exists() for u in units):
            measured.append(model_id)
            measure_s.append(sum(json.loads(u.read_text())["result"]["seconds"] for u in units))
    meta = checkpoint_paths(config["pretrain_dir"], config["kind"], config["pretrain"])[1]
    pre = json.loads(meta.read_text()) if meta.exists() else None
    span = lambda key: [min(r[key] for r in records.values()), max(r[key] for r in records.values())] if records else None  # noqa: E731
    train_s = [r["history"]["wall_time"] for r in records.values()]
    return {"n_planned": len(config["models"]), "n_trained": len(records), "n_measured": len(measured),
            "train_acc": span("train_acc"), "test_acc": span("test_acc"), "error_gap": span("error_gap"),
            "loss_gap": span("loss_gap"),
            "pretrain_s": pre["seconds"] if pre else None,
            "source_test_acc": pre["source"]["test_acc"] if pre and "source" in pre else None,
            "pretrain_mlm_acc": pre["history"]["mlm_acc"][-1] if pre and "mlm_acc" in pre.get("history", {}) else None,
            "finetune_s_per_model": sum(train_s) / len(train_s) if train_s else None,
            "measure_s_per_model": sum(measure_s) / len(measure_s) if measure_s else None}


REGIME_PAPER = {"vit": "ImageNet ViT", "text": "MNLI BERT"}


def regimes_table(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], gap: str = "error_gap") -> str:
    """Markdown: τ-a [95% CI] of every measure against ``gap`` for each task's from-scratch and
    fine-tuned populations side by side, the paper's value beside each task; per-layer Rényi as
    one row, the layer and α chosen on half of the models and τ on the other half
    (``summary["layer_renyi_selection"]``; the per-layer τ are in each study's ``tau_table.md``);
    then the paired Δτ rows. ``summaries = {"vit": {"from scratch": summary, "fine-tuned": summary}, "text": …}``."""
    columns = [(task, regime, s) for task, regimes in summaries.items() for regime, s in regimes.items()]
    header = ["measure"]
    for task in summaries:
        header += [f"{task}, {regime} (n={s['n_models']})" for t, regime, s in columns if t == task]
        header.append(f"paper ({REGIME_PAPER[task]})")
    names = list(dict.fromkeys(n for _, _, s in columns for n in s["kendall_tau"][gap] if parse_value_name(n) is None))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for task in summaries:
            cells += [tau_cell(s, gap, name) if name in s["kendall_tau"][gap] else "—"
                      for t, _, s in columns if t == task]
            paper = study.PAPER_ANCHORS[REGIME_PAPER[task]].get(name)
            cells.append("" if paper is None else f"{paper:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if any(gap in s.get("layer_renyi_selection", {}) for _, _, s in columns):
        cells = ["layer_renyi, best layer and α (chosen on half, τ on the other half)"]
        for task in summaries:
            cells += [selection_cell(s.get("layer_renyi_selection", {}).get(gap)) for t, _, s in columns if t == task]
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    pairs = list(dict.fromkeys(p for _, _, s in columns for p in s.get("tau_difference", {}).get(gap, {})))
    for pair in pairs:
        cells = [f"Δτ {pair.replace(' - ', ' − ')} (paired)"]
        for task in summaries:
            for t, _, s in columns:
                if t == task:
                    cells.append(difference_text(s.get("tau_difference", {}).get(gap, {}).get(pair)))
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_cell(selection: Mapping[str, Any] | None) -> str:
    """``τ [CI] (α, layer)`` of a per-layer Rényi selection on its evaluation half; ``—`` without one."""
    if selection is None:
        return "—"
    choice = selection["choice"]
    return (f"{tau_ci_text(selection['tau_evaluation'], selection['ci95_evaluation'])} "
            f"(α={choice['alpha']}, {choice['layer']}; {selection['tau_selection']:+.2f} on the selection half)")


# --------------------------------------------------------------------------- command line
def main(kind: str, argv: Sequence[str] | None = None, description: str = "") -> dict:
    """The command line of ``experiments/{vit,text}_finetune_study.py``."""
    import argparse

    from ..data import DatasetUnavailableError
    from . import parallel

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="output folder (reused to resume)")
    parser.add_argument("--quick", action="store_true", help="small pretraining, 4 fine-tunes, cheap settings")
    parser.add_argument("--n-models", type=int, help=f"population size (default {72 if kind == 'vit' else 48}; quick 4)")
    parser.add_argument("--pretrain-dir", help="checkpoint cache (default OUT/pretrained)")
    if kind == "text":
        parser.add_argument("--hparams", choices=["seeds", "random"], default="seeds",
                            help="identical hyperparameters, seeds only (default) or random ones")
    parser.add_argument("--rho", type=float, help="worst-case radius (default 0.1)")
    parser.add_argument("--rho-average", type=float, help="average-case radius (default 0.01)")
    parser.add_argument("--slq-probes", type=int, help="SLQ probes for Tr H and Rényi (default 8)")
    parser.add_argument("--measures", nargs="+", choices=list(study.MEASURES), help="measurement units (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="population, subset, solver and bootstrap seed")
    parser.add_argument("--status", action="store_true", help="print what OUT has finished (JSON) and exit")
    parallel.add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.status:
        report = progress_report(args.out)
        print(json.dumps(report, indent=1))
        return report
    executor = parallel.run_setup(parser, args)
    overrides = {k: v for k, v in (("rho", args.rho), ("rho_average", args.rho_average),
                                   ("slq_probes", args.slq_probes), ("measures", args.measures)) if v is not None}
    config = finetune_config(kind, args.out, quick=args.quick, n_models=args.n_models, seed=args.seed,
                             pretrain_dir=args.pretrain_dir, hparams=getattr(args, "hparams", "seeds"), **overrides)
    t0 = time.perf_counter()
    try:
        summary = run_finetune_study(args.out, config, progress=not args.no_progress, executor=executor)
    except DatasetUnavailableError as err:
        sys.exit(f"error: {err}")
    acc, gap = summary["population"]["test_acc"], summary["population"]["error_gap"]
    t = summary["timing"]
    print(f"\n{kind} fine-tune study on {summary['dataset']}: {summary['n_models']} fine-tunes of checkpoint "
          f"{summary['pretrained']['key']} (pretrained in {t['pretrain_s']:.0f} s); test accuracy "
          f"{acc[0]:.3f}–{acc[1]:.3f}, error gap {gap[0]:+.4f} to {gap[1]:+.4f}; fine-tune "
          f"{t['finetune_s_per_model']['mean']:.1f} s/model, measures {t['measure_s_per_model']:.1f} s/model; "
          f"measured on {summary['measurement']['n_batches']}×{summary['measurement']['batch_size']} examples\n")
    print(tau_table(summary))
    print(f"\nwall time {time.perf_counter() - t0:.1f} s; outputs in {args.out}")
    if args.quick:
        study.require_learned(summary)
    return summary
