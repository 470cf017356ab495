"""``nvlm demo``: the NVLM 1.0 pipeline in miniature (synthetic data, tiny models, stage 1 and 2, held-out eval)."""
