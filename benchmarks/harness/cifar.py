"""Real-data toolkit for benchmarks: CIFAR ResNets, JPEG CIFAR-10 splits, evaluate and finetune."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compiler.errors import InputError, OptionError

#: Environment variable naming the shared data folder (default: ``<repo root>/../shared/data``).
DATA_ENV = "SLIMGRAPH_DATA"
SPLITS = ("train_20k", "test_dev_2k", "test_eval_8k")
FINAL_SPLIT = "test_eval_8k"
CHECKPOINTS = {20: "resnet_cifar10/resnet20-12fca82f.th", 56: "resnet_cifar10/resnet56-4bfd9763.th"}
#: Every file this module reads, relative to :func:`data_dir`.
DATA_FILES = tuple(f"cifar10/{s}.npz" for s in SPLITS) + tuple(CHECKPOINTS.values())
#: the CIFAR models' input normalization module (compiler.finetune keeps parameters so named fixed)
FROZEN_PREFIX = "normalize"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# -- locating the data -----------------------------------------------------------------------------


def data_dir() -> Path:
    """The shared data folder: ``$SLIMGRAPH_DATA``, else ``<repo root>/../shared/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def require_data(*relative_paths: str) -> list[Path]:
    """Resolve paths inside :func:`data_dir`, failing clearly when one is missing.

    Args:
        relative_paths: paths relative to the data folder, e.g. ``"cifar10/train_20k.npz"``.

    Returns:
        The absolute paths, in order.

    Raises:
        InputError: a path does not exist; the message names it and ``$SLIMGRAPH_DATA``.
    """
    root = data_dir()
    paths = [root / p for p in relative_paths]
    for rel, path in zip(relative_paths, paths, strict=True):
        if not path.exists():
            raise InputError(
                f"real-data file '{rel}' not found at {path}",
                hint=f"set {DATA_ENV} to the folder holding cifar10/ and resnet_cifar10/ "
                f"(now {root}); see its README.md",
            )
    return paths


def data_available(*relative_paths: str) -> bool:
    """Whether every path (default: every file this module reads) exists in :func:`data_dir`."""
    root = data_dir()
    return all((root / p).exists() for p in relative_paths or DATA_FILES)


# -- the model -------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so the model takes [0, 1] RGB; the stats are buffers."""

    def __init__(self, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> None:
        super().__init__()
        # Not persistent: the checkpoints' state_dicts do not hold them, and strict loading works.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``planes // 4`` channels on each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3(stride) bn relu conv3x3 bn, plus the shortcut, relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet of He et al. (2016) as in akamaster/pytorch_resnet_cifar10.

    ``forward`` takes float NCHW RGB images in [0, 1] (shape ``(N, 3, 32, 32)``): the first step,
    ``self.normalize``, applies the ImageNet mean/std the checkpoints were trained with, so it is
    part of the traced graph and callers never normalize. Returns ``(N, 10)`` logits.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int) -> CifarResNet:
    """A randomly initialized CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110...).

    Raises:
        OptionError: ``depth`` is not of the form 6n + 2 with n >= 1.
    """
    if depth < 8 or (depth - 2) % 6:
        raise OptionError(
            f"a CIFAR ResNet has depth 6n + 2, got {depth}", hint="use 20, 32, 44, 56 or 110"
        )
    return CifarResNet((depth - 2) // 6)


def load_pretrained(depth: int) -> CifarResNet:
    """The pretrained CIFAR-10 ResNet-20 or -56 from ``resnet_cifar10/``, in eval mode.

    The model takes [0, 1] RGB NCHW input (normalization is inside, see :class:`CifarResNet`).

    Raises:
        OptionError: no checkpoint for ``depth``.
        InputError: the checkpoint file is missing.
    """
    if depth not in CHECKPOINTS:
        raise OptionError(
            f"no pretrained CIFAR ResNet-{depth}", hint=f"use depth in {sorted(CHECKPOINTS)}"
        )
    (path,) = require_data(CHECKPOINTS[depth])
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    model = cifar_resnet(depth)
    model.load_state_dict(state, strict=True)
    return model.eval()


# -- the data --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=len(SPLITS))
def _read_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    (path,) = require_data(f"cifar10/{split}.npz")
    with np.load(path) as f:
        x, y = f["x"], f["y"]
    x.flags.writeable = y.flags.writeable = False  # shared by every caller through the cache
    return x, y


def load_cifar(split: str, *, final_evaluation: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One split of the JPEG CIFAR-10 data as float images and labels.

    Args:
        split: ``"train_20k"`` (calibration, importance scores, fine-tuning), ``"test_dev_2k"``
            (accuracy in tests and benchmark tables) or ``"test_eval_8k"``.
        final_evaluation: must be True to read ``"test_eval_8k"``, which is kept for the final
            evaluation only: never for calibration, tuning, thresholds or tests.

    Returns:
        ``x`` float32 ``(N, 3, 32, 32)`` RGB in [0, 1] (a new array) and ``y`` int64 ``(N,)``.

    Raises:
        OptionError: unknown split, or ``test_eval_8k`` without ``final_evaluation=True``.
        InputError: the file is missing.
    """
    if split not in SPLITS:
        raise OptionError(f"unknown CIFAR-10 split {split!r}", hint=f"use one of {SPLITS}")
    if split == FINAL_SPLIT and not final_evaluation:
        raise OptionError(
            f"'{FINAL_SPLIT}' is reserved for final evaluation",
            hint="use 'test_dev_2k' for tests, tuning and tables; pass final_evaluation=True "
            "only for the final numbers",
        )
    x, y = _read_split(split)
    return to_float_images(x), y.copy()


def to_float_images(x: np.ndarray) -> np.ndarray:
    """uint8 NHWC images -> float32 NCHW in [0, 1]."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def calibration_batch(n: int = 256, seed: int = 0) -> np.ndarray:
    """``n`` distinct random images of ``train_20k`` (float32 NCHW in [0, 1]), for calibration."""
    x, _ = _read_split("train_20k")
    if not 0 < n <= len(x):
        raise OptionError(f"calibration_batch needs 0 < n <= {len(x)}, got {n}")
    index = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return to_float_images(x[index])


# -- evaluation ------------------------------------------------------------------------------------


from compiler.finetune import augment_batch, evaluate, finetune  # noqa: E402,F401  (re-exported)

__all__ = [
    "DATA_ENV",
    "DATA_FILES",
    "SPLITS",
    "BasicBlock",
    "CifarResNet",
    "Normalize",
    "PadShortcut",
    "augment_batch",
    "calibration_batch",
    "cifar_resnet",
    "data_available",
    "data_dir",
    "evaluate",
    "finetune",
    "load_cifar",
    "load_pretrained",
    "require_data",
    "to_float_images",
]
