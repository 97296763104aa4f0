"""The model layer (families, loading, conditioning, LoRA files) and generation. Never imports trainer/."""
