"""What DistillTrainer runs on: per-term accounting, batches, checkpoints, distributed teachers, evaluation order and generator state, non-finite checks, pairing checks, schedules, the teacher-logit cache.

This package imports nothing on its own: import from its modules (the public API is ``hf_attn_distill``)."""
