"""Post-training compression: pruning, quantization, distillation, one evaluation harness, a
report."""
