"""Tiny random models of every transformers causal-LM architecture, and an independent reference."""
