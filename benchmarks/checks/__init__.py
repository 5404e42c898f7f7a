"""One-off checks behind a default: does bf16 pay here, does length-grouped batching cost the teacher quality."""
