"""Inference: OpenAI-compatible chat and completions over base models and adapters."""
