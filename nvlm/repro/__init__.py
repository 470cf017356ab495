"""``nvlm repro``: NVLM 1.0's six design findings (Tables 1–3, 5, 8, 9, Appendix C) re-run at laptop scale.

A script-level package like ``nvlm.demo`` (it builds on the demo's data, backbones and recipe): only the
command line imports it, the library never does.
"""
