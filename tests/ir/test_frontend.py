"""The torch frontend: numbers match eager, sources are recorded, errors say what and where."""

import numpy as np
import pytest
import torch
from torch import nn

from compiler.errors import TraceError, UnsupportedOpError
from compiler.frontend import trace
from compiler.ir import interpreter
from compiler.pass_manager import deviation


class OptionABlock(nn.Module):
    """CIFAR ResNet's option-A shortcut: strided slice plus channel zero-padding."""

    def __init__(self, cin=4, cout=8):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return torch.relu(out + short)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6())
        self.block = OptionABlock()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 4 * 4, 10))

    def forward(self, x):
        y = self.block(self.stem(x))
        y = torch.cat([y[:, :4] * torch.sigmoid(y[:, 4:]), y[:, 4:]], dim=1)
        return nn.functional.softmax(self.head(y), dim=-1)


def randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def test_trace_matches_eager_and_records_sources():
    model = randomize_bn(Net()).eval()
    x = torch.randn(2, 3, 8, 8)
    g = trace(model, x)
    out = interpreter.run(g, [x.numpy()])
    with torch.no_grad():
        ref = model(x).numpy()
    assert deviation([ref], out) < 1e-5
    sources = {n.source for n in g.nodes}
    assert {"stem.0", "block.conv1", "block.bn2", "head.2"} <= sources
    ops = {n.op for n in g.nodes}
    assert {"conv2d", "batch_norm", "clip", "pad", "slice", "concat", "linear"} <= ops
    assert any(c.name == "stem.0.weight" for c in g.constants())


def test_trace_does_not_mutate_model():
    model = randomize_bn(Net()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, torch.randn(1, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unsupported_op_names_op_node_and_module():
    class Cum(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Identity())

        def forward(self, x):
            return torch.cumsum(self.inner(x), dim=1)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Cum()

        def forward(self, x):
            return self.body(x)

    with pytest.raises(UnsupportedOpError) as info:
        trace(Outer(), torch.randn(1, 4))
    msg = str(info.value)
    assert "aten.cumsum" in msg and "node 'cumsum'" in msg and "from module 'body'" in msg
    assert "register_aten" in msg


def test_untraceable_model_carries_torch_reason():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(TraceError) as info:
        trace(DataDependent(), torch.randn(3))
    assert "torch.export could not trace DataDependent" in str(info.value)
    assert info.value.__cause__ is not None


def test_not_a_module():
    with pytest.raises(TraceError, match="expected a torch.nn.Module"):
        trace(lambda x: x, torch.randn(1))


def test_numpy_example_inputs_and_attention():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(self.mha(x, x, x, need_weights=False)[0] + x)

    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    g = trace(M(), (x,))
    assert "attention" in {n.op for n in g.nodes}
    with torch.no_grad():
        ref = M()(torch.from_numpy(x)).numpy()
    assert deviation([ref], interpreter.run(g, [x])) < 1e-5
