"""What a torch module's tensors are called: the user's own state-dict keys, on nested submodules.

The frontend names every weight constant by its key in the user's ``state_dict()`` and records
the key as the constant's source, so a module built from the graph can register each tensor where
the user's model had it (``layer1.0.conv1.weight`` on submodules ``layer1``, ``0``, ``conv1``).
A tensor a pass made is named beside the layer that reads it (:func:`state_key`).
"""

from __future__ import annotations

import re

from torch import nn

from compiler.ir.graph import Value

__all__ = ["ROLES", "Scope", "flat_name", "is_user_tensor", "place", "state_key"]

# what a weighted op's inputs are called in torch's modules, by input index from 1
ROLES = {
    "conv2d": ("weight", "bias"),
    "linear": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "running_mean", "running_var"),
    "layer_norm": ("weight", "bias"),
    "group_norm": ("weight", "bias"),
}
_ROLE_WORDS = ("weight", "bias", "running_mean", "running_var")


def is_user_tensor(value: Value) -> bool:
    """Whether constant ``value`` is a parameter or buffer of the user's model, under its
    state-dict key (the frontend names it so and records the key as its source)."""
    return value.meta.get("source") == value.name


def state_key(value: Value) -> str:
    """The state-dict key a constant gets: the user's key for the user's tensors; for a tensor a
    pass derived from one, that key's module and its role with what was made of it
    (``conv1.weight.codebook`` -> ``conv1.weight_codebook``, ``conv1.weight_f0``); else the
    reading layer's module path and the tensor's role (``conv1.bias`` for a folded batch norm's
    bias), or the module path and the value's name."""
    if is_user_tensor(value):
        return value.name
    parts = value.name.split(".")
    for i, part in enumerate(parts[1:], 1):
        if part.startswith(_ROLE_WORDS):
            return ".".join(parts[:i]) + "." + "_".join(parts[i:])
    if len(parts) > 1:
        return value.name
    for node, i in value.uses:
        roles = ROLES.get(node.op, ())
        if node.source and 1 <= i <= len(roles):
            return f"{node.source}.{roles[i - 1]}"
    source = value.meta.get("source") or next((n.source for n, _ in value.uses if n.source), None)
    return f"{source}.{value.name}" if source else value.name


def flat_name(key: str, module: nn.Module) -> str:
    """A free attribute name of ``module`` made from ``key``: 'a.b-c' -> 'a_b_c'."""
    base = re.sub(r"\W", "_", key) or "const"
    if base[0].isdigit():
        base = f"c_{base}"
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


class Scope(nn.Module):
    """A submodule path of the user's model, holding its tensors: ``module.layer1[0].conv1``
    reaches what the user's ``model.layer1[0].conv1`` held (indexing as their Sequential's)."""

    def __getitem__(self, key: int | str) -> nn.Module:
        return self._modules[str(key)]


def _free(module: nn.Module, name: str) -> bool:
    return bool(name) and not hasattr(module, name)


def place(root: nn.Module, key: str) -> tuple[nn.Module, str, str]:
    """``(submodule, attribute, path)`` under which ``key`` ('layer1.0.conv1.weight') can be
    registered, making the submodules on the way; a key that clashes with an attribute, or with
    a tensor or submodule on its path, goes to a flat name on ``root``."""
    *path, leaf = key.split(".")
    owner = root
    for part in path:
        child = owner._modules.get(part)
        if child is None:
            if not _free(owner, part):
                flat = flat_name(key, root)
                return root, flat, flat
            child = Scope()
            owner.add_module(part, child)
        owner = child
    if not _free(owner, leaf):
        flat = flat_name(key, root)
        return root, flat, flat
    return owner, leaf, key
