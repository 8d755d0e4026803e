"""CPU kernels (Numba): MoE layers computed straight from GGUF blocks. Nothing compiles at import time.

Numba's disk cache (cache=True) is keyed by the source file of each compiled entry point, and a cached
entry point holds the code of everything it calls: after editing blocks.py or rows.py, delete
kernels/cpu/__pycache__ (or touch moe.py), or moe_ffn keeps running the old code. NOTES.md has the
measurements behind the kernels' shape.
"""
