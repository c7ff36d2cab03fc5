"""Model adapters for Hugging Face transformers models."""
