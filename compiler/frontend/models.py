"""Loading a user's model by spec: ``torchvision:NAME`` (random, seeded weights whose output
depends on the input) or ``package.module:factory``; the torchvision classifiers' names and the
smallest input each architecture accepts."""

from __future__ import annotations

import importlib

import torch

from compiler.errors import OptionError, did_you_mean

# Architectures whose input size is fixed or bounded below; every other model runs at 64x64.
INPUT_SIZES = {
    "inception_v3": 80,  # its stem needs at least 75 pixels
    "maxvit_t": 224,  # window partitioning fixes the size
    "vit_b_16": 224,
    "vit_b_32": 224,
    "vit_l_16": 224,
    "vit_l_32": 224,
    "vit_h_14": 224,
}
DEFAULT_SIZE = 64


def zoo_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def input_size(name: str) -> int:
    return INPUT_SIZES.get(name, DEFAULT_SIZE)


# A random-weight model whose output changes less than this (relative to its scale) between two
# random inputs would pass any numeric check: build() repairs it, check_model() refuses it.
MIN_INPUT_DEPENDENCE = 1e-3


def build(name: str, seed: int = 0):
    """A torchvision classifier with random (seeded) weights, in eval mode, whose output depends
    on its input.

    Two things make a random-weight model's output (nearly) constant, so that every numeric check
    on it passes vacuously: layers torchvision initialises to zero (the ViT heads), which are drawn
    again like an untouched nn.Linear / nn.Conv2d; and batch norms whose running statistics (mean
    0, variance 1) do not match the activations, so the signal vanishes or explodes through a deep
    stack (GoogLeNet, Inception-v3: the output moved by 3e-5 and 6e-7 of its scale between two
    inputs). When the output still moves less than ``MIN_INPUT_DEPENDENCE``, the batch-norm
    statistics are recalibrated on random inputs (one cumulative pass in training mode), as they
    would be after training.
    """
    import torch
    import torchvision

    torch.manual_seed(seed)
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not module.weight.any():
            module.reset_parameters()
    size = input_size(name)
    if input_dependence(model, size) < MIN_INPUT_DEPENDENCE:
        recalibrate_batch_norms(model, size, seed)
    return model


def input_dependence(model, size: int, seed: int = 1) -> float:
    """max |f(x1) - f(x2)| / max |f(x1)| for two random inputs (0 for a constant output)."""
    import torch

    from compiler.pass_manager import deviation

    g = torch.Generator().manual_seed(seed)
    x1, x2 = (torch.randn(1, 3, size, size, generator=g) for _ in range(2))
    with torch.no_grad():
        return deviation([model(x1).numpy()], [model(x2).numpy()])


def recalibrate_batch_norms(model, size: int, seed: int = 0, batch: int = 8) -> None:
    """Set every batch norm's running mean and variance to its input's statistics on one random
    batch (cumulative average, training mode, no gradients); the model is left in eval mode."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: one batch sets the statistics
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 7))
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


def load_model(spec: str):
    """Load a model by spec, as the CLI takes it.

    Specs: ``torchvision:NAME`` (random, seeded weights), ``timm:NAME`` (random weights; needs
    timm), ``package.module:factory`` (an ``nn.Module``, a class or a function returning one; the
    module is looked for in the current folder too, as ``python -c "import package"`` would), or a
    path to a ``torch.export`` program saved as ``.pt2`` (``torch.export.save``).
    """
    if spec.endswith(".pt2"):
        return _load_exported(spec)
    if ":" not in spec:
        raise OptionError(
            f"model spec {spec!r} has no ':'",
            hint="write torchvision:resnet18, timm:resnet18, package.module:factory or FILE.pt2",
        )
    where, what = spec.split(":", 1)
    if where == "torchvision":
        if what not in zoo_names():
            raise OptionError(
                f"torchvision has no classifier named {what!r}" + did_you_mean(what, zoo_names()),
                hint="see torchvision.models.list_models()",
            )
        return build(what)
    if where == "timm":
        return _load_timm(what)
    module = _import_from_cwd(where)
    factory = getattr(module, what, None)
    if factory is None:
        raise OptionError(f"module {where!r} has no attribute {what!r}")
    import torch

    model = factory if isinstance(factory, torch.nn.Module) else factory()
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_from_cwd(where: str):
    """Import ``where``; the current folder is searched too (a console script's sys.path lacks
    it, so ``slimgraph compress mynet:make`` failed beside mynet.py without PYTHONPATH=.)."""
    import os
    import sys

    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise OptionError(
            f"cannot import module {where!r}: {e}",
            hint="run from the folder that holds it, or add that folder to PYTHONPATH",
        ) from e
    finally:
        if added:
            sys.path.remove(cwd)


def _load_timm(name: str):
    try:
        import timm
    except ImportError:
        raise OptionError("timm: models need the timm package", hint="pip install timm") from None
    try:
        return timm.create_model(name, pretrained=False).eval()
    except RuntimeError as e:  # timm's "Unknown model"
        raise OptionError(f"timm has no model {name!r}: {e}", hint="see timm.list_models()") from e


def _load_exported(path: str):
    """The module of a saved ``torch.export`` program (``torch.export.load`` reads tensors and the
    program's graph, not arbitrary pickles)."""
    import torch

    try:
        program = torch.export.load(path)
    except FileNotFoundError as e:
        raise OptionError(f"no such file: {path!r}") from e
    except Exception as e:  # a corrupt or foreign file: say which
        raise OptionError(
            f"cannot read {path!r} as a torch.export program: {type(e).__name__}: {e}",
            hint="save it with torch.export.save(torch.export.export(model, args), 'file.pt2')",
        ) from e
    return ExportedModule(program.module())


class ExportedModule(torch.nn.Module):
    """A saved program's module. Its train/eval behaviour was fixed when it was exported, and it
    refuses ``.eval()``, which tracing calls: the mode stops here."""

    def __init__(self, program_module: torch.nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def forward(self, *args):
        return self.program(*args)

    def train(self, mode: bool = True):
        self.training = mode
        return self
