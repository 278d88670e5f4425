"""A plain, reusable training loop for classifiers, and their evaluation.

Datasets yield ``(inputs, targets)`` pairs (e.g. a ``TensorDataset``); the loss is mean
cross-entropy. Each optimizer step goes through a closure (zero grads, forward, loss, backward),
so two-pass optimizers such as SAM, whose ``step(closure)`` evaluates it twice, plug in through
``optimizer_factory``; the statistics reported are those of the first evaluation.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from quotientsharp.functional import eval_mode, model_device_dtype, to_device
from quotientsharp.optim import MESA, SAF, IndexedDataset

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def random_shift(
    images: torch.Tensor, generator: torch.Generator, max_shift: int = 1
) -> torch.Tensor:
    """Shift each image of ``(B, C, H, W)`` by up to ``max_shift`` pixels per axis (zero fill)."""
    b, c, h, w = images.shape
    m = max_shift
    padded = F.pad(images, (m, m, m, m))
    dy, dx = torch.randint(0, 2 * m + 1, (2, b), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of ``(B, C, H, W)`` left-right with probability ½."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


AUGMENTATIONS: dict[str, Augment] = {
    "shift": random_shift,
    "flip": random_flip,
    "shift+flip": lambda x, g: random_flip(random_shift(x, g), g),
}


Mix = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def mixup(inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator, alpha: float,
          n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): λ ~ Beta(α, α) once per batch, a random pairing π of the batch,
    ``(λ·x + (1−λ)·x[π], λ·onehot(y) + (1−λ)·onehot(y[π]))``; soft targets ``(B, n_classes)``.
    ``alpha = 0`` returns the batch unchanged (one-hot targets)."""
    if alpha < 0:
        raise ValueError(f"mixup alpha must be >= 0, got {alpha}")
    onehot = F.one_hot(targets, n_classes).to(inputs.dtype)
    if alpha == 0:
        return inputs, onehot
    # Beta(α, α) = G₁/(G₁ + G₂) with G₁, G₂ ~ Gamma(α), drawn from ``generator``
    gammas = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=generator)
    total = float(gammas.sum())
    lam = float(gammas[0]) / total if total > 0 else 1.0  # both underflow only for α ≪ 1e-2: no mixing
    perm = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    return lam * inputs + (1 - lam) * inputs[perm], lam * onehot + (1 - lam) * onehot[perm]


def make_optimizer(
    params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """``"adamw"`` or ``"sgd"`` (with ``momentum``); weight decay inside the optimizer."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def step_loss(opt: torch.optim.Optimizer, label_smoothing: float = 0.0) -> StepLoss:
    """``loss(logits, targets, indices, inputs)`` that a training step minimises with ``opt``.

    SAF: ``opt.loss(logits, targets, indices)`` (records the logits of the samples ``indices``);
    MESA: ``opt.loss(logits, targets, inputs)`` (the EMA teacher sees the same, augmented inputs);
    otherwise cross-entropy with ``label_smoothing`` (SAF/MESA take theirs at construction).
    """
    if isinstance(opt, SAF):
        return lambda logits, targets, indices, inputs: opt.loss(logits, targets, indices)
    if isinstance(opt, MESA):
        return lambda logits, targets, indices, inputs: opt.loss(logits, targets, inputs)
    return lambda logits, targets, indices, inputs: F.cross_entropy(logits, targets,
                                                                    label_smoothing=label_smoothing)


def train_classifier(
    model: nn.Module,
    train_data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    label_smoothing: float = 0.0,
    augment: str | Augment | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    mix: Mix | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with mini-batch cross-entropy; returns the history.

    ``augment``: None, ``"shift"`` (±1 pixel), ``"flip"``, ``"shift+flip"`` or a callable
    ``(images, generator) → images``. ``optimizer_factory(params)`` replaces the built-in
    ``optimizer``/``lr``/``weight_decay``/``momentum`` choice; an optimizer with ``set_epoch``
    (the SAM family's warm-up, SAF/MESA) is told each epoch's index, and SAF/MESA get the sample
    indices and inputs their regularised loss needs (:func:`step_loss`). ``mix(inputs, targets,
    generator) → (inputs, soft targets (B, C))`` runs after ``augment`` (e.g. :func:`mixup`); the
    accuracy then counts the argmax of the soft targets. Shuffling, augmentation, mixing and
    dropout are seeded from ``seed`` (the global RNG state is restored afterwards), so a model
    initialised identically gives an identical history. History: per-epoch ``train_loss`` and
    ``train_acc`` (running means over the epoch's augmented batches, train mode; the loss
    minimised, so SAF's/MESA's include their regulariser), ``epoch_time``
    (s), plus ``wall_time`` (s) and ``steps``.
    """
    device = torch.device(device) if device is not None else model_device_dtype(model)[0]
    model.to(device)
    opt = (optimizer_factory(model.parameters()) if optimizer_factory is not None
           else make_optimizer(model.parameters(), optimizer, lr, weight_decay, momentum))
    if isinstance(augment, str) and augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)} or a callable")
    augment_fn = AUGMENTATIONS[augment] if isinstance(augment, str) else augment
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(IndexedDataset(train_data), batch_size=batch_size, shuffle=True, generator=generator)
    loss_fn = step_loss(opt, label_smoothing)
    history: dict[str, Any] = {"train_loss": [], "train_acc": [], "epoch_time": [], "steps": 0}
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        epoch_bar = tqdm(range(epochs), desc="train", disable=not progress)
        for epoch in epoch_bar:
            if hasattr(opt, "set_epoch"):  # SAM-family warm-up, SAF/MESA schedules
                opt.set_epoch(epoch)
            epoch_start = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            for indices, inputs, targets in loader:
                inputs, targets = to_device(inputs, device), targets.to(device)
                if augment_fn is not None:
                    inputs = augment_fn(inputs, generator)
                if mix is not None:
                    inputs, targets = mix(inputs, targets, generator)
                first_pass: list[tuple[torch.Tensor, torch.Tensor]] = []

                def closure() -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    logits = model(inputs)
                    loss = loss_fn(logits, targets, indices, inputs)
                    loss.backward()
                    if not first_pass:
                        first_pass.append((loss.detach(), logits.detach()))
                    return loss

                opt.zero_grad(set_to_none=True)
                opt.step(closure)
                loss, logits = first_pass[0]
                n = targets.shape[0]
                loss_sum += float(loss) * n
                hard = targets if targets.ndim == 1 else targets.argmax(-1)
                correct += int((logits.argmax(-1) == hard).sum())
                seen += n
                history["steps"] += 1
            history["train_loss"].append(loss_sum / seen)
            history["train_acc"].append(correct / seen)
            history["epoch_time"].append(time.perf_counter() - epoch_start)
            epoch_bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    history["wall_time"] = time.perf_counter() - start
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and accuracy ``acc`` over ``dataset`` (eval mode, no augment)."""
    device = torch.device(device) if device is not None else model_device_dtype(model)[0]
    loss_sum, correct, seen = 0.0, 0, 0
    with eval_mode(model):
        for inputs, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            inputs, targets = to_device(inputs, device), targets.to(device)
            logits = model(inputs)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            seen += targets.shape[0]
    return {"loss": loss_sum / seen, "acc": correct / seen}
