"""Classification accuracy and fine-tuning for any image classifier: ``evaluate`` (top-1 of an
``nn.Module`` or a compiled artifact, on a fixed batch when the artifact needs one) and ``finetune``
(SGD with momentum, cosine schedule, crop-and-flip augmentation, cross-entropy)
on arrays the caller loads."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compiler.errors import InputError


def _logits(output: Any) -> np.ndarray:
    output = output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(output, torch.Tensor):
        return output.detach().cpu().float().numpy()
    return np.asarray(output)


def _static_batch(model: Any) -> int | None:
    """The traced batch of a compiled model (ONNX and numba artifacts accept only that one)."""
    graph = getattr(model, "graph", None)
    shape = graph.inputs[0].shape if getattr(graph, "inputs", None) else ()
    return int(shape[0]) if shape else None


def evaluate(
    model: nn.Module | Callable[[Any], Any],
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    batch_size: int | None = 500,
    progress: bool = False,
) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in percent.

    Args:
        model: an ``nn.Module`` (run under ``no_grad`` in eval mode; its train flag is restored)
            or any callable mapping a batch to logits: a :class:`~compiler.api.CompiledModel`, an
            ONNX wrapper... Modules get torch tensors, other callables numpy arrays.
        x: float images ``(N, 3, 32, 32)`` in [0, 1] (as :func:`load_cifar` returns them).
        y: int labels ``(N,)``.
        batch_size: rows per call. Every call gets exactly this many: the last partial batch is
            padded with zeros and the extra rows discarded, so models compiled for a fixed batch
            work. For those pass the traced batch, or None to take it from ``model.graph`` (a
            CompiledModel); None falls back to 500 for other models.
        progress: show a tqdm bar over the batches.
    """
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"evaluate needs as many labels as images (> 0), got {len(x)}, {len(y)}")
    batch_size = batch_size or _static_batch(model) or 500
    is_module = isinstance(model, nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.eval()
    device = _device(model) if is_module else None
    starts = range(0, len(x), batch_size)
    if progress:
        starts = tqdm(starts, desc="evaluate", unit="batch")
    correct = 0
    try:
        with torch.no_grad():
            for start in starts:
                batch = x[start : start + batch_size]
                rows = len(batch)
                if rows < batch_size:
                    pad = np.zeros((batch_size - rows, *x.shape[1:]), x.dtype)
                    batch = np.concatenate([batch, pad])
                if is_module:
                    batch = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
                logits = _logits(model(batch))[:rows]
                correct += int((logits.argmax(axis=1) == y[start : start + rows]).sum())
    finally:
        if was_training:
            model.train()
    return 100.0 * correct / len(x)


# -- fine-tuning -----------------------------------------------------------------------------------


def _device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard CIFAR augmentation: random 32x32 crop of the 4-pixel zero-padded image, h-flip.

    The zero padding is black in [0, 1] pixel space, as torchvision's ``RandomCrop(32, 4)``
    before ``Normalize`` (the models normalize inside).
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (n, c, h, w)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, crops.flip(3), crops).contiguous()


def finetune(
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: float = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    seed: int = 0,
    augment: bool = True,
    progress: bool = True,
    frozen: tuple[str, ...] = ("normalize",),
) -> nn.Module:
    """Train ``module`` in place with SGD, a per-step cosine LR schedule and cross-entropy.

    Works on any classifier taking [0, 1] NCHW images, including the torch backend's
    ``GraphModule`` (``compile(...).to_torch()``): its reshapes let the leading dim absorb the
    batch, so it trains at ``batch_size`` whatever batch it was traced with (it keeps eval-mode
    batch norm, see ``backends.torch.backend``). Batches are drawn without replacement and the
    last partial one is dropped, so every step sees ``batch_size`` images (``min(batch_size, N)``
    when N is smaller).

    Args:
        module: the model; only parameters with ``requires_grad`` are trained.
        x: float images ``(N, 3, 32, 32)`` in [0, 1]; y: int labels ``(N,)``.
        epochs: passes over the data; a fraction runs that share of one epoch's steps (>= 1 step).
        lr: initial learning rate, decayed to 0 by a cosine over all steps. The default is 10x
            below the usual CIFAR 0.01 because compiled graphs have batch norm folded into the
            convolutions, which scales the effective step by (running std / gamma)^2: on the fused
            ResNet-20 GraphModule one epoch of 2048 images took dev accuracy from 81.35 % to
            9.45 % at lr=0.01, 81.1 % at 0.003 and 82.2 % at 0.001 (the eager model with live
            batch norm reached 83.15 % at 0.01).
        batch_size: images per step.
        weight_decay, momentum: SGD's.
        seed: seeds the shuffling and the augmentation (torch's global RNG is untouched).
        augment: random crop (4-pixel padding) and horizontal flip.
        progress: a tqdm bar per epoch showing the running loss.
        frozen: parameters whose names start with one of these are not trained. The default
            keeps an input normalization's mean/std fixed: the torch backend turns every float
            constant into a parameter ("normalize_mean"), and one SGD step on them costs more
            accuracy than it could gain.

    Returns:
        ``module``, trained, in eval mode.
    """
    device = _device(module)
    xs = torch.as_tensor(np.asarray(x, np.float32) if not isinstance(x, torch.Tensor) else x)
    ys = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long()
    if len(xs) != len(ys) or len(xs) == 0 or epochs <= 0:
        raise InputError(
            f"finetune needs as many labels as images (> 0) and epochs > 0, got {len(xs)} "
            f"images, {len(ys)} labels, epochs={epochs}"
        )
    batch_size = min(batch_size, len(xs))
    per_epoch = len(xs) // batch_size
    total = max(1, math.ceil(epochs * per_epoch))
    named = module.named_parameters()
    params = [p for n, p in named if p.requires_grad and not n.startswith(tuple(frozen))]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    generator = torch.Generator().manual_seed(seed)
    module.train()
    epochs_run = math.ceil(total / per_epoch)
    for epoch in range(epochs_run):
        steps = min(per_epoch, total - epoch * per_epoch)
        order = torch.randperm(len(xs), generator=generator)[: steps * batch_size]
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{epochs_run}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        running = 0.0
        for i, index in enumerate(order.view(steps, batch_size)):
            images = xs[index].to(device)
            if augment:
                images = augment_batch(images, generator)
            loss = _sgd_step(module, optimizer, images, ys[index].to(device))
            schedule.step()
            running += (loss - running) / (i + 1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            bar.update()
        bar.close()
    return module.eval()


def _sgd_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> float:
    loss = F.cross_entropy(module(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()
