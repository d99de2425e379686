"""Training: byte corpora, run folders and checkpoints, the loop (one process or torchrun)."""
