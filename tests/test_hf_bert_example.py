"""experiments/hf_bert_sharpness.py end to end (--quick): a HuggingFace BERT built from a config,
fine-tuned on the tweets, its GL(h) symmetries found by the adapter and measured."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "hf_bert_sharpness.py"


def load_script():
    spec = importlib.util.spec_from_file_location("hf_bert_sharpness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_learns_finds_every_head_and_measures(tmp_path):
    from quotientsharp.data import DatasetUnavailableError, load_tweets
    try:
        load_tweets(n_train=10, n_test=10)
    except DatasetUnavailableError as err:
        pytest.skip(str(err))
    result = load_script().main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["train_acc"] > 0.6 and result["test_acc"] > 0.55  # 3-way, majority class ≈ 0.5
    geodesic, adaptive = result["geodesic"], result["adaptive"]
    # 2 layers × (QK, VO) blocks × 4 heads, all found by the adapter on the HF module names
    assert "AttentionGL(metric='mix', 4 blocks, 16 heads)" in geodesic["config"]["quotient"]
    assert geodesic["config"]["metrics"] == ["mix"] and adaptive["config"]["measure"] == "adaptive"
    for r in (geodesic, adaptive):
        # a trained model is strictly sharper than its base loss somewhere in the ball (v = 0 would
        # mean the ascent never moved); the value is the batch mean
        assert all(math.isfinite(v) and v > 0 for v in r["per_batch"]) and len(r["per_batch"]) == 2
        assert r["value"] == pytest.approx(sum(r["per_batch"]) / 2, rel=1e-12)
        assert all(e["xi_norm"] <= 0.1 * (1 + 1e-6) for e in r["extras"])
