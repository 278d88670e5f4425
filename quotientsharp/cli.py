"""Command line: measure a saved model.

    quotientsharp measure MODEL (--data FILE | --dataset NAME) [--measures ...] [--rho 0.1] ...
    python -m quotientsharp measure ...             (the same)

MODEL is a HuggingFace checkpoint directory (``save_pretrained``; loaded offline with the class
named in its ``config.json``, else ``AutoModelForSequenceClassification``) or a file written by
``torch.save(module)`` (a whole module: unpickling runs code, so load only files you trust).

Data, one of:
- ``--data FILE.pt``: ``torch.save((inputs, targets))``, or a dict of tensors with the targets
  under ``"labels"`` (HuggingFace keyword inputs such as ``input_ids``, ``attention_mask``).
- ``--data FILE.npz``: arrays ``inputs`` and ``targets``, or keyword arrays plus ``labels``.
- ``--dataset NAME``: an offline data set of :mod:`quotientsharp.data` (``--split`` train/test).

The measurement batches are the first ``n_batches × batch_size`` examples in file order
(``--shuffle``: a random subset drawn with ``--seed``). Floating inputs are cast to the model's
dtype (``--dtype`` casts the model first) and everything is moved to ``--device``.

Each measure is the library's public function on those batches (``value`` = mean over batches);
results go to ``--out`` as JSON (``{"measures": {name: {"value", "stderr", "seconds", "details"}}}``,
a measure that raises is stored with its ``"error"`` and the exit status is 1) and a table is
printed. Measures: see :data:`MEASURES` or ``quotientsharp measure --help``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quotientsharp.functional import map_tensors

Batch = Any  # an (inputs, targets) pair or a dict of keyword tensors with "labels"

LOSSES: dict[str, Callable] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


# --------------------------------------------------------------------------- loading
def load_model(path: str | Path) -> tuple[nn.Module, str]:
    """The module saved at ``path`` and its kind (``"huggingface"`` or ``"torch"``)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a directory without config.json: not a HuggingFace checkpoint "
                             f"(save one with model.save_pretrained(dir))")
        import transformers
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        names = [a for a in (config.architectures or []) if hasattr(transformers, a)]
        cls = getattr(transformers, names[0]) if names else transformers.AutoModelForSequenceClassification
        return cls.from_pretrained(path, local_files_only=True), "huggingface"
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj, "torch"
    if isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a state dict, not a module: save the module itself "
                         f"(torch.save(model, path)) or a HuggingFace checkpoint (model.save_pretrained(dir))")
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")


def _tensor(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.long() if not (t.is_floating_point() or t.is_complex()) and t.dtype != torch.bool else t


def _examples_from(obj: Any, source: str) -> tuple | dict:
    """Normalise loaded data to ``(inputs, targets)`` or a keyword dict with ``"labels"``."""
    if isinstance(obj, Mapping):
        if "inputs" in obj and "targets" in obj and len(obj) == 2:
            return _tensor(obj["inputs"]), _tensor(obj["targets"])
        if "labels" not in obj:
            raise ValueError(f"{source}: a dict of data needs its targets under 'labels' "
                             f"(or exactly the keys 'inputs' and 'targets'); got keys {sorted(obj)}")
        return {k: _tensor(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return _tensor(obj[0]), _tensor(obj[1])
    raise ValueError(f"{source}: expected (inputs, targets) or a dict with 'labels', got {type(obj).__name__}")


def load_examples(data: str | None = None, dataset: str | None = None, split: str = "train") -> tuple | dict:
    """All examples of a data file (``.pt``/``.npz``) or of a named offline data set."""
    if (data is None) == (dataset is None):
        raise ValueError("give exactly one of --data FILE and --dataset NAME")
    if dataset is not None:
        from quotientsharp.data import get_dataset
        subset = getattr(get_dataset(dataset), split)
        return tuple(subset.tensors)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix == ".pt":
        return _examples_from(torch.load(path, map_location="cpu", weights_only=True), str(path))
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return _examples_from({k: arrays[k] for k in arrays.files}, str(path))
    raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .pt or .npz")


def n_examples(examples: tuple | dict) -> int:
    targets = examples["labels"] if isinstance(examples, dict) else examples[1]
    return int(targets.shape[0])


def make_batches(examples: tuple | dict, batch_size: int, n_batches: int, shuffle: bool = False,
                 seed: int = 0) -> list[Batch]:
    """``n_batches`` batches of ``batch_size`` examples: the first ones in order, or (``shuffle``)
    a random subset drawn with ``torch.Generator().manual_seed(seed)``."""
    if batch_size < 1 or n_batches < 1:
        raise ValueError(f"batch size and number of batches must be >= 1, got {batch_size} and {n_batches}")
    n, need = n_examples(examples), batch_size * n_batches
    if need > n:
        raise ValueError(f"{n_batches} batches of {batch_size} need {need} examples; the data has {n}")
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
             else torch.arange(n))[:need]
    if isinstance(examples, dict):
        return [{k: v[idx] for k, v in examples.items()} for idx in order.split(batch_size)]
    return [(examples[0][idx], examples[1][idx]) for idx in order.split(batch_size)]


def _place(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a batch to ``device`` and cast its floating tensors to ``dtype``."""
    return map_tensors(lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device), batch)


# --------------------------------------------------------------------------- measures
def _sharpness(kind: str, base: str, metric: str | None = None) -> Callable:
    def run(model, batches, loss_fn, a) -> dict:
        from quotientsharp import measures
        fn = getattr(measures, f"{base}_sharpness")
        extra = {"metric": metric, "eps_rel": a.eps_rel} if base == "geodesic" else {}
        if kind == "average":
            extra |= {"n_samples": a.n_samples, "antithetic": a.antithetic}
        r = fn(model, batches, loss_fn, a.rho_average if kind == "average" else a.rho, kind=kind,
               n_iter=a.n_iter, n_restarts=a.n_restarts, seed=a.seed, progress=False, **extra)
        return {"": (r.value, r.stderr, {k: v for k, v in r.to_dict().items() if k != "traces"})}
    return run


def _max_eigenvalue(model, batches, loss_fn, a) -> dict:
    from quotientsharp.curvature import hessian_max_eigenvalue
    r = hessian_max_eigenvalue(model, loader=batches, loss_fn=loss_fn, tol=a.lanczos_tol, seed=a.seed, progress=False)
    return {"": (r.value, r.stderr, r.to_dict())}


def _trace(model, batches, loss_fn, a) -> dict:
    from quotientsharp.curvature import hessian_trace
    r = hessian_trace(model, loader=batches, loss_fn=loss_fn, n_probes=a.n_probes, seed=a.seed, progress=False)
    return {"": (r.value, r.stderr, r.to_dict())}


def _renyi(quotient: bool) -> Callable:
    def run(model, batches, loss_fn, a) -> dict:
        from quotientsharp.curvature import quotient_renyi_sharpness, renyi_sharpness
        common = dict(loader=batches, loss_fn=loss_fn, alpha=list(a.alpha), m=a.slq_m, n_probes=a.n_probes,
                      seed=a.seed, progress=False)
        results = (quotient_renyi_sharpness(model, metric="mix", eps_rel=a.eps_rel, **common) if quotient
                   else renyi_sharpness(model, **common))
        return {f"_{alpha:g}": (r.sharpness, None, r.to_dict()) for alpha, r in results.items()}
    return run


MEASURES: dict[str, tuple[Callable, str]] = {
    "geodesic_mix": (_sharpness("worst", "geodesic", "mix"), "worst-case geodesic sharpness, mixed metric, radius --rho"),
    "geodesic_inv": (_sharpness("worst", "geodesic", "inv"), "worst-case geodesic sharpness, inverse metric, radius --rho"),
    "geodesic_mix_avg": (_sharpness("average", "geodesic", "mix"), "average-case geodesic sharpness (mix), --rho-average"),
    "geodesic_inv_avg": (_sharpness("average", "geodesic", "inv"), "average-case geodesic sharpness (inv), --rho-average"),
    "adaptive": (_sharpness("worst", "adaptive"), "worst-case adaptive sharpness (|w|-scaled ball), --rho"),
    "adaptive_avg": (_sharpness("average", "adaptive"), "average-case adaptive sharpness, --rho-average"),
    "euclidean": (_sharpness("worst", "euclidean"), "worst-case Euclidean sharpness, --rho"),
    "euclidean_avg": (_sharpness("average", "euclidean"), "average-case Euclidean sharpness, --rho-average"),
    "hessian_max_eigenvalue": (_max_eigenvalue, "largest Hessian eigenvalue (Lanczos, --lanczos-tol)"),
    "hessian_trace": (_trace, "Hessian trace (Hutchinson, --n-probes)"),
    "renyi": (_renyi(False), "Renyi sharpness -H_alpha of the Hessian spectrum (SLQ), one row per --alpha"),
    "quotient_renyi": (_renyi(True), "Renyi sharpness of the quotient Hessian (mix metric), one row per --alpha"),
}
"""``name: (run, help)``; ``run(model, batches, loss_fn, args) -> {suffix: (value, stderr, details)}``
(the row is ``name + suffix``)."""

DEFAULT_MEASURES = ["geodesic_mix", "geodesic_inv", "adaptive", "euclidean"]


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def run_measures(model: nn.Module, batches: list[Batch], loss_fn: Callable, names: Sequence[str],
                 args: argparse.Namespace, progress: bool = True) -> dict[str, dict]:
    """``{row: {"value", "stderr", "seconds", "details"}}`` (or ``{"error"}``) for every measure."""
    from tqdm.auto import tqdm

    rows: dict[str, dict] = {}
    with tqdm(names, desc="measures", unit="measure", disable=not progress, file=sys.stderr) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = MEASURES[name][0](model, batches, loss_fn, args)
                except (ValueError, RuntimeError) as err:
                    out, error = {}, f"{type(err).__name__}: {err}"
            messages = sorted({str(w.message) for w in caught})
            if not out:
                rows[name] = {"error": error, "seconds": time.perf_counter() - t0, "warnings": messages}
                continue
            seconds = (time.perf_counter() - t0) / len(out)
            for suffix, (value, stderr, details) in out.items():
                rows[name + suffix] = {"value": float(value), "stderr": stderr, "seconds": seconds,
                                       "warnings": messages, "details": details}
    return rows


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: measure, value, standard error, seconds (or the error)."""
    width = max(len("measure"), *(len(n) for n in rows))
    lines = [f"{'measure':<{width}}  {'value':>12}  {'stderr':>10}  {'seconds':>8}"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"{name:<{width}}  error: {r['error']}")
            continue
        stderr = "" if r["stderr"] is None else f"{r['stderr']:.3g}"
        lines.append(f"{name:<{width}}  {r['value']:>12.6g}  {stderr:>10}  {r['seconds']:>8.1f}")
    notes = dict.fromkeys(f"warning ({name}): {w}"
                          for name, r in rows.items() for w in r.get("warnings", []))
    return "\n".join(lines + list(notes))


# --------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    from quotientsharp import __version__
    from quotientsharp.data import LOADERS

    parser = argparse.ArgumentParser(prog="quotientsharp", description="Sharpness of saved models.")
    parser.add_argument("--version", action="version", version=f"quotientsharp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser(
        "measure", help="measure a saved model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure a saved model (HuggingFace directory or torch.save'd module) on a data file "
                    "or an offline data set.\n\nmeasures:\n"
                    + "\n".join(f"  {k:<24}{h}" for k, (_, h) in MEASURES.items()))
    m.add_argument("model", help="HuggingFace checkpoint directory or torch.save'd module file")
    data = m.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help=".pt ((inputs, targets) or dict with 'labels') or .npz file")
    data.add_argument("--dataset", choices=sorted(LOADERS), help="an offline data set (quotientsharp.data)")
    m.add_argument("--split", choices=["train", "test"], default="train", help="split of --dataset (default train)")
    m.add_argument("--measures", nargs="+", choices=list(MEASURES), default=DEFAULT_MEASURES, metavar="NAME",
                   help=f"measures to compute (default: {' '.join(DEFAULT_MEASURES)})")
    m.add_argument("--rho", type=float, default=0.1, help="worst-case radius (default 0.1)")
    m.add_argument("--rho-average", type=float, default=0.01, help="average-case radius (default 0.01)")
    m.add_argument("--n-iter", type=int, default=20, help="ascent iterations, worst case (default 20)")
    m.add_argument("--n-restarts", type=int, default=0, help="extra random-start ascents (default 0)")
    m.add_argument("--n-samples", type=int, default=20, help="draws per batch, average case (default 20)")
    m.add_argument("--antithetic", action="store_true", help="average case: evaluate each draw at ±xi")
    m.add_argument("--eps-rel", type=float, default=0.0,
                   help="relative Gram relaxation of the attention quotient (default 0: exact)")
    m.add_argument("--n-probes", type=int, default=20, help="probes for Hessian trace and SLQ (default 20)")
    m.add_argument("--slq-m", type=int, default=15, help="Lanczos steps per SLQ probe (default 15)")
    m.add_argument("--alpha", type=float, nargs="+", default=[0.5], help="Renyi orders (default 0.5)")
    m.add_argument("--lanczos-tol", type=float, default=1e-4, help="Lanczos tolerance of λmax (default 1e-4)")
    m.add_argument("--loss", choices=list(LOSSES), default="cross_entropy", help="loss (default cross_entropy)")
    m.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    m.add_argument("--n-batches", type=int, default=4, help="number of batches (default 4)")
    m.add_argument("--shuffle", action="store_true", help="a random subset (seeded by --seed) instead of the first examples")
    m.add_argument("--seed", type=int, default=0, help="solver, probe and subset seed (default 0)")
    m.add_argument("--device", default="cpu", help="torch device (default cpu)")
    m.add_argument("--dtype", choices=["float32", "float64"], help="cast the model to this dtype first")
    m.add_argument("--out", default="measures.json", help="JSON output file (default measures.json)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def measure(args: argparse.Namespace) -> int:
    """The ``measure`` command; returns the exit status (1 if some measure raised)."""
    if args.quiet and Path(args.model).is_dir():
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    model, kind = load_model(args.model)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch build has no CUDA device available")
    if args.dtype:
        model = model.to(getattr(torch, args.dtype))
    model = model.to(device)
    dtype = next(model.parameters()).dtype
    examples = load_examples(args.data, args.dataset, args.split)
    batches = [_place(b, device, dtype) for b in
               make_batches(examples, args.batch_size, args.n_batches, args.shuffle, args.seed)]
    rows = run_measures(model, batches, LOSSES[args.loss], args.measures, args, progress=not args.quiet)
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "out")}
    result = {"model": str(args.model), "model_type": kind, "model_class": type(model).__name__,
              "n_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "n_examples": args.batch_size * args.n_batches, "dtype": str(dtype).removeprefix("torch."),
              "settings": settings, "measures": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    print(format_table(rows))
    print(f"wrote {out}")
    return 1 if any("error" in r for r in rows.values()) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``quotientsharp`` and ``python -m quotientsharp``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return measure(args)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
