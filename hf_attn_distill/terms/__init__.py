"""The loss terms: the objective protocol, the term registry, hard labels and logit KD, attention, hidden-state and relation transfer, and their loss functions.

This package imports nothing on its own: import from its modules (the public API is ``hf_attn_distill``)."""
