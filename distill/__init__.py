"""Distillation: losses, student construction, KD recipes, quantization, the gate, the registry."""
