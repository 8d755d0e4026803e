"""The model: config from GGUF metadata, the torch definition, tokenizer, generation."""
