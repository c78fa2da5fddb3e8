"""Encrypted blob storage: every stored object sealed under its own wrapped data key."""
