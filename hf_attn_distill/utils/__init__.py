"""The machine and the weights: hardware (bf16), timing and machine description, the packaged pretrained MiniLM.

This package imports nothing on its own: import from its modules (the public API is ``hf_attn_distill``)."""
