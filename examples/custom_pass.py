"""A user-written pass in about 20 lines: round every conv/linear weight to bfloat16 precision.

Run it: python examples/custom_pass.py
"""

from dataclasses import dataclass

import numpy as np
import torch
import torchvision

from compiler import Pass, compile, register_pass


@register_pass
@dataclass
class RoundWeights(Pass):
    """conv2d/linear(x, $w) -> conv2d/linear(x, round(w)) keeping ``mantissa_bits`` bits (lossy)."""

    name = "round-weights"
    exact = False  # the pass manager records the deviation instead of demanding a match
    mantissa_bits: int = 7  # bfloat16 keeps 7 explicit mantissa bits

    def run(self, graph) -> bool:
        drop = 23 - self.mantissa_bits
        for node in graph.nodes:
            w = node.inputs[1] if node.op in ("conv2d", "linear") else None
            if w is not None and w.is_constant and w.dtype == "float32":
                bits = w.data.view(np.uint32) + np.uint32(1 << (drop - 1))  # round half up
                w.data = (bits & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)).view(np.float32)
        return True


def main():
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    compiled = compile(model, x, passes=["fuse", RoundWeights(mantissa_bits=7)])
    print(compiled.report)
    last = compiled.report.rows[-1]
    assert last.name.startswith("round-weights") and 0 < last.deviation < 0.05
    return compiled


if __name__ == "__main__":
    main()
