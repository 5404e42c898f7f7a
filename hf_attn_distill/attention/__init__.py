"""Attention: where it is in a model (site discovery), capture, masks, layer maps, and the streamed and fused attention-transfer kernels.

This package imports nothing on its own: import from its modules (the public API is ``hf_attn_distill``)."""
