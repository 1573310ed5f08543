"""The GPU catalogue the capacity planner reads: memory, bandwidth and peak throughput.

Figures are NVIDIA's data-sheet numbers (dense, i.e. without 2:4 sparsity). Memory is the
nominal capacity taken as GiB, which is what ``nvidia-smi`` reports to within a few percent
(an A100-80GB shows 81920 MiB); the planner's utilisation cap and reserve absorb the rest
(ECC, the CUDA context). Bandwidth is in decimal GB/s, as data sheets give it.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass

GIB = 1024 ** 3
GB = 1000 ** 3


@dataclass(frozen=True)
class GPU:
    name: str
    description: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    fp16_tflops: float  # dense tensor-core peak (also used for bf16 and int8-weight matmuls)
    fp32_tflops: float  # what an fp32 model runs at (TF32 is not assumed)

    def __post_init__(self):
        if self.memory_bytes <= 0 or self.bandwidth_bytes_per_s <= 0 or self.fp16_tflops <= 0:
            raise ValueError(f"GPU {self.name}: memory, bandwidth and TFLOPS must be positive")

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    @property
    def bandwidth_gbs(self) -> float:
        return self.bandwidth_bytes_per_s / GB

    def tflops(self, dtype_name: str) -> float:
        return self.fp32_tflops if dtype_name == "fp32" else self.fp16_tflops


def _gpu(name, description, gib, gbs, fp16, fp32) -> GPU:
    return GPU(name=name, description=description, memory_bytes=int(gib * GIB),
               bandwidth_bytes_per_s=gbs * GB, fp16_tflops=fp16, fp32_tflops=fp32)


CATALOGUE: types.MappingProxyType[str, GPU] = types.MappingProxyType({g.name: g for g in (
    _gpu("v100-16g", "V100 16GB SXM2", 16, 900, 125, 15.7),
    _gpu("v100-32g", "V100 32GB SXM2", 32, 900, 125, 15.7),
    _gpu("t4", "T4 16GB", 16, 320, 65, 8.1),
    # AWS's A10G runs at lower clocks than the data-sheet A10 (125 TFLOPS fp16).
    _gpu("a10g", "A10G 24GB", 24, 600, 70, 31.2),
    _gpu("l4", "L4 24GB", 24, 300, 121, 30.3),
    _gpu("a100-40g", "A100 40GB SXM", 40, 1555, 312, 19.5),
    _gpu("a100-80g", "A100 80GB SXM", 80, 2039, 312, 19.5),
    _gpu("h100-sxm", "H100 80GB SXM", 80, 3350, 989, 67),
    _gpu("h100-pcie", "H100 80GB PCIe", 80, 2000, 756, 51),
    _gpu("h200", "H200 141GB SXM", 141, 4800, 989, 67),
)})

# Other spellings people type: "A100-80GB", "a100_40gb", "h100".
ALIASES: types.MappingProxyType[str, str] = types.MappingProxyType({
    "v100": "v100-32g", "v100-16": "v100-16g", "v100-32": "v100-32g",
    "t4-16g": "t4", "a10g-24g": "a10g", "l4-24g": "l4",
    "a100-40": "a100-40g", "a100-80": "a100-80g", "a100": "a100-80g",
    "h100": "h100-sxm", "h100-80g": "h100-sxm", "h100-sxm-80g": "h100-sxm",
    "h100-pcie-80g": "h100-pcie", "h200-141g": "h200",
})


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-").replace("gb", "g")


def get_gpu(name: str) -> GPU:
    """A catalogue GPU by name or common alias; an unknown name lists the valid ones."""
    key = _normalise(name)
    key = ALIASES.get(key, key)
    try:
        return CATALOGUE[key]
    except KeyError:
        raise KeyError(f"unknown GPU {name!r}; known GPUs: {', '.join(CATALOGUE)} (or give "
                       f"--gpu-memory-gib, --gpu-bandwidth-gbs and --gpu-tflops)") from None


def custom_gpu(memory_gib: float, bandwidth_gbs: float, tflops: float,
               base: GPU | None = None) -> GPU:
    """A GPU from the operator's own figures; any figure left as None comes from ``base``."""
    if base is None and None in (memory_gib, bandwidth_gbs, tflops):
        raise ValueError("a custom GPU needs --gpu-memory-gib, --gpu-bandwidth-gbs and "
                         "--gpu-tflops (or --gpu NAME to start from)")
    if base is None:
        # One throughput figure: the operator's, for whatever dtype they plan with.
        return _gpu("custom", f"custom {memory_gib:g} GiB, {bandwidth_gbs:g} GB/s, "
                    f"{tflops:g} TFLOPS", memory_gib, bandwidth_gbs, tflops, tflops)
    changes = {}
    if memory_gib is not None:
        changes["memory_bytes"] = int(memory_gib * GIB)
    if bandwidth_gbs is not None:
        changes["bandwidth_bytes_per_s"] = bandwidth_gbs * GB
    if tflops is not None:
        changes["fp16_tflops"] = changes["fp32_tflops"] = tflops
    if not changes:
        return base
    return dataclasses.replace(base, name=base.name + "-custom",
                               description=base.description + " (custom figures)", **changes)
