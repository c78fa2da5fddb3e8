"""Test-set evaluation and comparison of LLM models (issue 24)."""
