"""GGUF files and GGML block formats: reading (memory-mapped), dequantizing, quantizing, writing."""
