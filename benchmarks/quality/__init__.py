"""Quality benchmarks: does distillation (and attention transfer) make better students? SST-2, SQuAD, Multi30k, their shared run loop, teachers, the founding claims, and the GPU plan."""
