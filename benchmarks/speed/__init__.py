"""Speed and memory: a distillation step against its limit, the naive way and TextBrewer; evaluation cost; step times for planning; token-level KD memory."""
