"""Image-transformer study: Kendall τ between sharpness and the generalization gap of TinyViTs.

    python experiments/vit_study.py --quick --out results/vit_quick    # digits, 4 models, minutes
    python experiments/vit_study.py --out results/vit                  # Fashion-MNIST 10k, 24 models
    python experiments/vit_study.py --out results/vit --ray            # one Ray task per model

Writes ``DIR/models/<id>.{pt,json}``, ``DIR/measures/<id>/<measure>.json`` as each finishes,
``DIR/summary.json`` and ``DIR/models.csv``, and prints the τ table. Rerunning with the same
``--out`` skips finished work. Fashion-MNIST: ``apt-get install -y dataset-fashion-mnist``
(or ``--dataset digits``).
"""
from study_cli import main  # experiments/study_cli.py (this folder is on sys.path when run as a script)

from quotientsharp.studies.runner import run_resumable

if __name__ == "__main__":
    run_resumable(main, "vit", description=__doc__.splitlines()[0])
