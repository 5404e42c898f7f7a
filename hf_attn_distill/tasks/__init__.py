"""Task support: extractive QA (features, post-processing), metrics (SQuAD, BLEU/chrF, accuracy), sequence-level KD.

This package imports nothing on its own: import from its modules (the public API is ``hf_attn_distill``)."""
