"""What a student is published with: the model card and its figures.

This package imports nothing on its own: import from its modules (the public API is ``hf_attn_distill``)."""
