"""Torch-side training tools that feed the compiler: QAT, distillation, pruning, transfer."""
