"""Trainer -> generator weight sync over a dedicated process group (gloo on CPU, NCCL on GPU)."""
