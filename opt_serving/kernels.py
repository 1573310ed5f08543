"""Linear layers at memory bandwidth on CPUs: oneDNN with weights prepacked once.

torch's default CPU matrix multiply reaches about half the machine's memory bandwidth at
small batches. oneDNN with the weight reordered once into its blocked layout (what Inductor's
freezing does, without a compile) reads it near bandwidth. Which dtype gains depends on the
CPU (both measured on 2-core development machines, opt-125m's layer shapes):

- with bf16 instructions (AMX / AVX-512 bf16; Xeon): packed bf16 takes 7.2 ms for the layer
  matmuls at batch 1 against 11.3 ms in plain bf16 and 11.5 ms in plain fp32; at batch 16,
  8.1 ms against 11.5 and 29.6 ms. There fp32 packing gave little (slower at batch 1) and
  changed results with the batch size, so fp32 stays on torch's multiply and bf16 is
  opt-serve's default.
- without them (AVX2; EPYC): bf16 has no fast kernel at all, and packed fp32 decodes 1.12x
  as fast as torch's multiply at batch 1 and 1.56x at batch 16 (whole steps, interleaved).

Where they are used, packed results are the same bit for bit whatever the number of rows
(bf16 on the Xeon, 1..300 rows, measured; fp32 on the EPYC, tested; torch's own fp32
multiply changes below 16 rows), so a sequence's logits do not depend on what else is in
the step.

``pack(model)`` swaps every linear layer of a loaded CPU model for a ``PackedLinear`` and
gives the tied output head a packed copy of the embedding (one more embedding-sized tensor
in memory: the lookup keeps the plain one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The batch size oneDNN tunes the layout for: one layout served 1..300 rows at once within
# 10 % of the best, and bit-for-bit the same results across batch sizes (measured).
BATCH_HINT = 16


def available(dtype: torch.dtype) -> bool:
    """Whether ``pack`` speeds this dtype up on this CPU (the measurements above)."""
    if not torch.backends.mkldnn.is_available():
        return False
    caps = _capabilities()
    bf16 = bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    if dtype == torch.bfloat16:
        return bf16
    # Measured on x86 with AVX2 only: elsewhere (Arm's oneDNN) fp32 stays on torch's multiply.
    return dtype == torch.float32 and not bf16 and bool(caps.get("avx2"))


def _capabilities() -> dict:
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}


def best_cpu_dtype() -> str:
    """opt-serve's default dtype on a CPU: bf16 where its packed kernels run, else fp32."""
    return "bf16" if available(torch.bfloat16) else "fp32"


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with W held in oneDNN's blocked layout (``project``: no bias, for
    row-parallel layers that add it after the all-reduce)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.out_features, self.in_features = w.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(),
                                                                   requires_grad=False)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                then: str = "none") -> torch.Tensor:
        """``then``: oneDNN's post-op on the result ("none" or "relu")."""
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, bias,
                                               then, [], "")
        return y.view(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T without the bias, for a plain or a packed linear layer."""
    if isinstance(linear, PackedLinear):
        return linear.project(x)
    return F.linear(x, linear.weight)


def linear_relu(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(x @ W.T + b), the relu fused into the multiply when the layer is packed."""
    if isinstance(linear, PackedLinear):
        return linear.project(x, linear.bias, "relu")
    return F.relu(linear(x))


def pack(model: nn.Module) -> nn.Module:
    """Swap the linear layers of a loaded CPU model for packed ones (in place); for the dtypes
    ``available`` names."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
    embed = model.decoder.embed_tokens
    head = nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False)
    head.weight = embed.weight
    model.head = PackedLinear(head)  # the tied output projection, packed
    return model
