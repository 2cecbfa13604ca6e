"""Training objectives: registry.py maps objective.name to one module each (sft.py, causal_lm.py, ...)."""
