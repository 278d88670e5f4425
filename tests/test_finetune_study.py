"""Fine-tune populations (issue #13): pretrained-checkpoint cache, populations, mixup, masking,
and tiny end-to-end studies (vision and HF BERT) that learn, resume and refuse stale results."""
import copy
import json
import math
import shutil

import pytest
import torch

from quotientsharp.data import DatasetUnavailableError
from quotientsharp.studies import finetune as ft
from quotientsharp.studies import transformers as study
from quotientsharp.train import mixup

TINY_VIT = {"data": {"name": "fashion_mnist", "kwargs": {"train_subset": 600}},
            "arch": {"d_model": 16, "depth": 1, "n_heads": 2, "mlp_dim": 32, "patch_size": 7},
            "epochs": 2, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.01, "shift": 1, "seed": 0}


def require(loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except DatasetUnavailableError as err:
        pytest.skip(str(err))


def tiny_vit_config(out, n_models=3):
    from quotientsharp.data import load_fashion_mnist, load_mnist5k
    require(load_fashion_mnist, train_subset=10)
    require(load_mnist5k)
    config = ft.finetune_config("vit", out, quick=True, n_models=n_models, n_iter=2, n_samples=2, slq_m=4,
                                slq_probes=1, measures=["geodesic_inv", "adaptive", "hessian_slq"])
    config["pretrain"] = TINY_VIT
    key = ft.config_key("vit", TINY_VIT)
    config["arch"] = {"pretrained": key}
    config["models"] = [hp | {"pretrained": key, "epochs": 4, "lr": 3e-3} for hp in config["models"]]
    config["subset"] = {"n_batches": 2, "batch_size": 16, "seed": 0}
    config["n_boot"] = 50
    return config


@pytest.fixture(scope="module")
def vit_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit_ft")
    config = tiny_vit_config(out)
    return out, config, ft.run_finetune_study(out, config, progress=False)


# --------------------------------------------------------------------------- populations
def test_vit_population_is_prefix_stable_and_soups_shaped():
    pop = ft.vit_population(200, seed=0)
    assert ft.vit_population(50, seed=0) == pop[:50] and ft.vit_population(50, seed=1) != pop[:50]
    lr = [m["lr"] for m in pop]
    assert 5e-5 <= min(lr) < 1e-4 and 2.5e-3 < max(lr) <= 5e-3  # log-uniform over two decades
    assert sum(m["lr"] < 5e-4 for m in pop) == pytest.approx(100, abs=25)  # half below the log-midpoint
    wd = [m["weight_decay"] for m in pop]
    assert 8e-5 <= min(wd) < 1e-3 and 0.1 < max(wd) <= 0.53
    assert {m["epochs"] for m in pop} == set(range(2, 9)) and {m["augment_shift"] for m in pop} == {0, 1, 2, 3}
    assert all(0 <= m["label_smoothing"] <= 0.23 and 0 <= m["mixup"] <= 0.88 for m in pop)
    assert 0.3 < sum(m["mixup"] == 0 for m in pop) / 200 < 0.7
    assert len({m["init_seed"] for m in pop}) == 200


def test_text_population_differs_in_seed_only():
    pop = ft.text_population(48, seed=0)
    assert ft.text_population(10, seed=0) == pop[:10]
    strip = [{k: v for k, v in m.items() if k not in ("id", "index", "init_seed")} for m in pop]
    assert all(s == strip[0] for s in strip) and strip[0] == ft.TEXT_HPARAMS
    assert len({m["init_seed"] for m in pop}) == 48
    random = ft.text_population(24, seed=0, hparams="random")
    assert len({m["lr"] for m in random}) == 24 and len({m["epochs"] for m in random}) > 1
    assert all(1e-5 <= m["lr"] <= 1e-3 for m in random)
    with pytest.raises(ValueError, match="hparams"):
        ft.text_population(2, hparams="grid")


def test_finetune_config_uses_the_paper_measurement_protocol(tmp_path):
    vit = ft.finetune_config("vit", tmp_path)
    text = ft.finetune_config("text", tmp_path)
    assert vit["subset"] | {"seed": 0} == {"n_batches": 8, "batch_size": 256, "seed": 0}
    assert text["subset"] | {"seed": 0} == {"n_batches": 8, "batch_size": 128, "seed": 0}
    assert len(vit["models"]) == 72 and len(text["models"]) == 48
    assert vit["plan"]["measures"] == study.default_measures() + ["layer_renyi"] == text["plan"]["measures"]
    assert vit["plan"]["spectral_batches"] == 2 == text["plan"]["spectral_batches"]
    assert {k: vit["plan"][k] for k in ft.FINETUNE_LAYER_RENYI} == ft.FINETUNE_LAYER_RENYI

    key = ft.config_key("vit", vit["pretrain"])
    assert all(hp["pretrained"] == key for hp in vit["models"])
    # the fine-tune split's training tweets are the only tweets in the pretraining corpus
    split = text["pretrain"]["corpus"]["tweets"]
    assert {k: text["data"]["kwargs"][k] for k in ("n_train", "n_test", "seed")} == \
        {k: split[k] for k in ("n_train", "n_test", "seed")}


def test_measure_specific_settings_key_only_their_own_units():
    """Adding per-layer Rényi (and its own plan entries) keeps every committed unit of the fine-tune
    studies valid: the other measures' unit configs are those stored before it existed."""
    from pathlib import Path

    from quotientsharp.studies.transformer_measures import unit_settings

    plan = {k: v for k, v in ft.finetune_config("vit", "unused")["plan"].items() if k != "measures"}
    assert "layer_slq_probes" not in unit_settings(plan, "adaptive")
    assert unit_settings(plan, "layer_renyi") == plan
    stored = Path(__file__).parents[1] / "benchmarks/results/finetune/vit/measures/ftvit000"
    for name in ("adaptive", "geodesic_mix_rel", "hessian_slq", "quotient_renyi"):
        record = json.loads((stored / f"{name}.json").read_text())
        assert record["config"]["plan"] == json.loads(json.dumps(unit_settings(plan, name)))


# --------------------------------------------------------------------------- pieces
def test_spectral_measures_see_only_the_first_batches(monkeypatch):
    seen = {}
    for name in ("hessian_slq", "adaptive"):
        monkeypatch.setitem(study.MEASURES, name, lambda m, b, p, s, name=name: (float(seen.setdefault(name, len(b))), {}))
    batches = [(torch.zeros(1), torch.zeros(1))] * 8
    for name in ("hessian_slq", "adaptive"):
        assert study.measure_unit(name, None, batches, {"spectral_batches": 2}, 0)["values"] == {name: seen[name]}
    assert seen == {"hessian_slq": 2, "adaptive": 8}


def test_mixup_mixes_inputs_and_one_hot_targets_with_one_lambda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (64,))
    mx, my = mixup(x, y, g, alpha=0.4, n_classes=5)
    assert my.shape == (64, 5) and torch.allclose(my.sum(1), torch.ones(64, dtype=torch.float64))
    # the same draws from a fresh generator: λ ~ Beta(α, α) as G₁/(G₁+G₂), then the pairing π
    g2 = torch.Generator().manual_seed(0)
    gammas = torch._standard_gamma(torch.full((2,), 0.4, dtype=torch.float64), generator=g2)
    lam = float(gammas[0] / gammas.sum())
    perm = torch.randperm(64, generator=g2)
    assert torch.allclose(mx, lam * x + (1 - lam) * x[perm])
    assert torch.allclose(my, lam * torch.eye(5, dtype=torch.float64)[y] + (1 - lam) * torch.eye(5, dtype=torch.float64)[y[perm]])
    same, onehot = mixup(x, y, g, alpha=0.0, n_classes=5)
    assert torch.equal(same, x) and torch.equal(onehot.argmax(1), y)
    with pytest.raises(ValueError, match="alpha"):
        mixup(x, y, g, alpha=-1.0, n_classes=5)


def test_mask_tokens_follows_bert_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (400, 50))
    ids[:, 40:] = 0  # padding
    inputs, labels = ft.mask_tokens(ids, g, mask_id=101, vocab_len=100, prob=0.15)
    target = labels != -100
    assert not target[:, 40:].any() and torch.equal(labels[target], ids[target])
    assert target[:, :40].float().mean().item() == pytest.approx(0.15, abs=0.01)
    masked = (inputs == 101) & target
    changed = target & (inputs != ids) & (inputs != 101)
    assert masked.sum() / target.sum() == pytest.approx(0.8, abs=0.02)
    assert changed.sum() / target.sum() == pytest.approx(0.1 * 97 / 98, abs=0.02)  # a random word may equal the old one
    assert torch.equal(inputs[~target], ids[~target])


def test_not_learned_is_said_plainly():
    summary = {"n_models": 4, "learned": {"excluded": ["a", "b", "c", "d"], "chance_acc": 0.1, "n_models": 0}}
    assert "NOT LEARNED" in study.not_learned_notice(summary)[0]
    summary["learned"]["excluded"] = ["a"]
    assert "1 of 4 models did not learn" in study.not_learned_notice(summary)[0]
    summary["learned"]["excluded"] = []
    assert study.not_learned_notice(summary) == []
    with pytest.raises(SystemExit, match="2 of 3 models did not learn"):
        study.require_learned({"n_models": 3, "learned": {"excluded": ["x", "y"]}})


def test_vit_study_quick_population_trains_long_enough_to_learn():
    """Today's quick ViT study trained 1–4 epochs and stayed at chance on digits (1,437 images:
    12 steps per epoch at batch 128); every quick model now takes at least 30 epochs."""
    config = study.study_config("vit", quick=True)
    assert min(m["epochs"] for m in config["models"]) >= 30
    assert study.study_config("vit")["models"] == study.population("vit", 24)  # the full study is unchanged


@pytest.mark.slow
def test_vit_study_quick_population_learns():
    """The quick model with the fewest optimizer steps learns (its own optimizer, lr and
    architecture); ~20 CPU-s, so slow."""
    pytest.importorskip("sklearn")
    config = study.study_config("vit", quick=True)
    data = study.load_data(config["data"])
    hp = min(config["models"], key=lambda m: m["epochs"] / m["batch_size"])
    _, record = study.train_model("vit", config["arch"], data, hp)
    assert record["train_acc"] > study.majority_rate(data) + 0.3


# --------------------------------------------------------------------------- checkpoint cache
def test_pretrained_checkpoint_is_deterministic_cached_and_keyed(tmp_path, monkeypatch):
    from quotientsharp.data import load_fashion_mnist
    require(load_fashion_mnist, train_subset=10)
    pt, record = ft.pretrained("vit", TINY_VIT, tmp_path / "a")
    pt2, record2 = ft.pretrained("vit", TINY_VIT, tmp_path / "b")  # trained again, elsewhere
    assert record["state_sha256"] == record2["state_sha256"] and pt.name == pt2.name
    first, second = torch.load(pt, weights_only=True), torch.load(pt2, weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert record["source"]["train_acc"] > 0.3 and record["seconds"] > 0

    def refuse(*args, **kwargs):
        raise AssertionError("a cached checkpoint was pretrained again")
    monkeypatch.setitem(ft.PRETRAINERS, "vit", refuse)
    assert ft.pretrained("vit", TINY_VIT, tmp_path / "a") == (pt, record)
    other = TINY_VIT | {"epochs": 3}
    assert ft.checkpoint_paths(tmp_path / "a", "vit", other)[0] != pt
    with pytest.raises(AssertionError, match="pretrained again"):
        ft.pretrained("vit", other, tmp_path / "a")
    weights = torch.load(pt, weights_only=True)
    weights["head.bias"] += 1
    torch.save(weights, pt)
    with pytest.raises(ValueError, match="digest"):
        ft.pretrained("vit", TINY_VIT, tmp_path / "a")


# --------------------------------------------------------------------------- end to end
def test_vit_finetune_study_learns_and_writes_everything(vit_study):
    out, config, summary = vit_study
    assert summary["n_models"] == 3 and summary["learned"]["excluded"] == []
    assert summary["population"]["test_acc"][0] > 0.25  # MNIST, 10 classes; a 1-layer width-16 ViT
    assert summary["measurement"] == {"n_batches": 2, "batch_size": 16, "n_examples": 32, "seed": 0,
                                      "spectral_measures": list(study.SPECTRAL_MEASURES), "spectral_batches": 2,
                                      "spectral_examples": 32}
    assert summary["pretrained"]["key"] == config["arch"]["pretrained"]
    assert summary["timing"]["pretrain_s"] > 0 and summary["timing"]["measure_s_per_model"] > 0
    assert json.loads((out / "summary.json").read_text())["timing"] == summary["timing"]
    for name in ("geodesic_inv", "adaptive", "hessian_trace", "renyi_0.5"):
        assert all(math.isfinite(r["values"][name]) for r in summary["models"])
    assert "geodesic_inv - adaptive" in summary["tau_difference"]["error_gap"]
    status = ft.progress_report(out)
    assert status["n_planned"] == status["n_trained"] == status["n_measured"] == 3
    assert status["test_acc"] == summary["population"]["test_acc"]
    assert status["pretrain_s"] == summary["timing"]["pretrain_s"]
    # the fine-tunes start from the checkpoint: the encoder of a 0-epoch fine-tune is the pretrained one
    data = ft.target_data(config)
    model, _ = ft.finetune_vit(config, data, config["models"][0] | {"epochs": 0})
    pt, _ = ft.pretrained("vit", config["pretrain"], config["pretrain_dir"])
    base = torch.load(pt, weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], base[k]) for k in base if not k.startswith("head."))
    assert not torch.equal(state["head.weight"], base["head.weight"])


def test_vit_finetune_study_resumes_and_refuses_stale(vit_study, tmp_path, monkeypatch):
    out, config, _ = vit_study
    copy_out = tmp_path / "study"
    shutil.copytree(out, copy_out)
    config = copy.deepcopy(config)
    config["pretrain_dir"] = str(copy_out / "pretrained")

    # resume: nothing is redone; a lost .pt with a lost measure is retrained from its seed and checked
    hp = config["models"][1]
    (copy_out / "models" / f"{hp['id']}.pt").unlink()
    (copy_out / "measures" / hp["id"] / "adaptive.json").unlink()
    calls = []
    real = ft.finetune_vit
    monkeypatch.setattr(ft, "finetune_vit", lambda c, d, h: calls.append(h["id"]) or real(c, d, h))
    monkeypatch.setattr(ft, "RECIPES", {"vit": study.Recipe(ft.target_data, ft.finetune_vit, ft.load_vit)})
    again = ft.run_finetune_study(copy_out, config, progress=False)
    assert calls == [hp["id"]] and (copy_out / "measures" / hp["id"] / "adaptive.json").exists()
    assert again["kendall_tau"] == ft.run_finetune_study(copy_out, config, progress=False)["kendall_tau"]
    assert calls == [hp["id"]]

    # another pretraining configuration: the stored fine-tunes belong to the old checkpoint
    changed = copy.deepcopy(config)
    changed["pretrain"]["epochs"] = 1
    key = ft.config_key("vit", changed["pretrain"])
    changed["arch"] = {"pretrained": key}
    changed["models"] = [m | {"pretrained": key} for m in changed["models"]]
    with pytest.raises(ValueError, match="another configuration"):
        ft.run_finetune_study(copy_out, changed, progress=False)


def test_text_finetune_study_bert_learns_with_identical_hparams(tmp_path):
    from quotientsharp.data import load_bbc, load_tweets
    require(load_tweets, n_train=10, n_test=10)
    require(load_bbc)
    pytest.importorskip("transformers")
    if not (ft.WORDNET_DIR / "data.noun").exists():
        pytest.skip(f"WordNet not installed: {ft.WORDNET_INSTALL}")
    config = ft.finetune_config("text", tmp_path, quick=True, n_models=2, n_iter=2, slq_m=4, slq_probes=1,
                                measures=["geodesic_mix", "adaptive"])
    pre = config["pretrain"]
    pre["corpus"]["max_per_source"] = 300
    pre["corpus"]["tweets"] |= {"n_train": 1200, "n_test": 300}
    pre.update(vocab_size=600, arch={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "intermediate_size": 64})
    key = ft.config_key("text", pre)
    config["data"]["kwargs"] |= {"n_train": 1200, "n_test": 300}
    config["arch"] = {"pretrained": key}
    config["models"] = [hp | {"pretrained": key, "lr": 2e-3, "epochs": 3} for hp in config["models"]]
    config["subset"] = {"n_batches": 2, "batch_size": 8, "seed": 0}
    config["n_boot"] = 20
    summary = ft.run_finetune_study(tmp_path, config, progress=False)
    assert summary["pretrained"]["corpus"] == {"wordnet": 300, "bbc": 300, "tweets": 300}
    assert summary["learned"]["excluded"] == [] and summary["n_models"] == 2
    rows = summary["models"]
    assert rows[0]["train_acc"] != rows[1]["train_acc"] or rows[0]["test_loss"] != rows[1]["test_loss"]
    for r in rows:
        assert r["values"]["geodesic_mix"] >= 0 and math.isfinite(r["values"]["adaptive"])
    unit = json.loads((tmp_path / "measures" / rows[0]["id"] / "geodesic_mix.json").read_text())
    assert "AttentionGL(metric='mix', 2 blocks, 4 heads)" in unit["result"]["details"]["config"]["quotient"]
    # the encoder comes from the checkpoint; pooler and classifier from the seed
    data = ft.target_data(config)
    zero = [ft.finetune_text(config, data, hp | {"epochs": 0})[0].state_dict() for hp in config["models"]]
    pt, _ = ft.pretrained("text", pre, config["pretrain_dir"])
    base = torch.load(pt, weights_only=True)
    encoder = [k for k in base if k.startswith("bert.encoder.")]
    assert encoder and all(torch.equal(zero[0]["bert." + k], base[k]) for k in encoder)
    assert not torch.equal(zero[0]["bert.classifier.weight"], zero[1]["bert.classifier.weight"])
    again = ft.finetune_text(config, data, config["models"][0] | {"epochs": 0})[0].state_dict()
    assert torch.equal(again["bert.classifier.weight"], zero[0]["bert.classifier.weight"])


def test_regimes_table_puts_both_regimes_and_the_paper_side_by_side(vit_study):
    _, _, summary = vit_study
    scratch = copy.deepcopy(summary)
    scratch["n_models"] = 48
    scratch["kendall_tau"]["error_gap"]["geodesic_inv"] = -0.5
    table = ft.regimes_table({"vit": {"from scratch": scratch, "fine-tuned": summary}})
    lines = table.splitlines()
    assert lines[0] == "| measure | vit, from scratch (n=48) | vit, fine-tuned (n=3) | paper (ImageNet ViT) |"
    row = next(line for line in lines if line.startswith("| geodesic_inv |")).split(" | ")
    assert row[1] == study.tau_cell(scratch, "error_gap", "geodesic_inv") and row[1].startswith("-0.50")
    assert row[2] == study.tau_cell(summary, "error_gap", "geodesic_inv") and row[3] == "-0.71 |"
    assert any(line.startswith("| Δτ geodesic_inv − adaptive (paired) |") for line in lines)


def test_regimes_table_shows_per_layer_renyi_as_one_held_out_row(vit_study):
    """Per-layer values stay out of the side-by-side table; their held-out selection is one row,
    and a regime without it shows a dash."""
    _, _, summary = vit_study
    tuned = copy.deepcopy(summary)
    tuned["kendall_tau"]["error_gap"]["layer_renyi_0.5@blocks.0.attn.q.weight"] = 0.3
    tuned["layer_renyi_selection"] = {"error_gap": {
        "choice": {"layer": "blocks.0.attn.q.weight", "alpha": "0.5", "name": "layer_renyi_0.5@blocks.0.attn.q.weight"},
        "tau_selection": 0.6, "tau_evaluation": -0.25, "ci95_evaluation": [-0.5, 0.05]}}
    lines = ft.regimes_table({"vit": {"from scratch": summary, "fine-tuned": tuned}}).splitlines()
    assert not any("@" in line.split(" | ")[0] for line in lines)
    row = next(line for line in lines if line.startswith("| layer_renyi, best layer")).split(" | ")
    assert row[1] == "—"
    assert row[2] == "-0.25 [-0.50, +0.05] (α=0.5, blocks.0.attn.q.weight; +0.60 on the selection half)"
    assert ft.regimes_table({"vit": {"from scratch": summary}}).count("layer_renyi") == 0
