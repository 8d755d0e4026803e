"""Triton kernels for GGUF-quantized weights on the GPU: `dequant.dequantize` turns GGUF blocks into
float32/float16/bfloat16 values bit-exactly with quant/dequant.py, and `moe.moe_ffn` runs the routed experts
that the planner put on the GPU, straight from their Q4_K / Q6_K / Q8_0 blocks (other types dense), with the
signature of kernels/ref.py::moe_ffn; `linear.BlockWeight` keeps a linear layer's matrix (attention, shared
experts, dense FFN, head) in its blocks and multiplies by it. Kernels run on whatever device their input
tensors are on; without a GPU they run only under the Triton interpreter (TRITON_INTERPRET=1, set before
these modules are imported)."""
