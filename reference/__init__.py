"""The spec: every technique in plain PyTorch, fp32, one process, written to be read top to bottom."""
