"""Model-hosting actors: the DeepSpeed policy trainer and the frozen reference."""
