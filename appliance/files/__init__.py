"""Data intake: the OpenAI-shaped Files API, scanning, policy and encrypted storage."""
