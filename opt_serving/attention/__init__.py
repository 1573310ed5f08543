"""Attention kernels for the GPU path: ``paged_decode`` (every decode row of a step in one call
per layer, reading the paged KV cache in place). The CPU engine keeps the model's own
per-sequence attention (``model.attend``), which is also what the kernels are tested against."""
