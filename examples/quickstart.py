"""Quickstart: trace a torchvision model, fuse it, check it, emit ONNX and a trainable torch module.

Run it: python examples/quickstart.py [OUT_DIR]
"""

import os
import sys
import tempfile

import torch
import torchvision

from compiler import compile


def main(out_dir: str | None = None):
    out_dir = out_dir or tempfile.mkdtemp()
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 96, 96)

    # 1. compile: trace with torch.export, run the fuse passes (checked after each), emit ONNX
    compiled = compile(model, x, passes=["fuse"], backend="onnx")
    print(compiled.report)

    # 2. the ONNX model runs in ONNX Runtime and matches torch
    with torch.no_grad():
        expected = model(x)
    got = compiled(x)
    error = (got - expected).abs().max().item() / expected.abs().max().item()
    print(f"ONNX Runtime vs torch: max relative deviation {error:.2e}")
    assert error < 1e-4

    # 3. save atomically; the file is an ordinary ONNX model
    path = os.path.join(out_dir, "mobilenet_v2.onnx")
    compiled.save(path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")

    # 4. a trainable torch module of the fused graph, for fine-tuning
    trainable = compiled.to_torch()
    n_params = sum(p.numel() for p in trainable.parameters())
    print(f"trainable module with {n_params} parameters")
    return compiled


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
