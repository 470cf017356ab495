"""Benchmarks: ``nvlm bench train`` measures the training throughput of NVLM-D, -X and -H at equal shapes
(the paper's Table 3, §4.3–4.4 efficiency claims) and counts their analytic FLOPs (``nvlm.training.flops``)."""
