"""Stable Diffusion fine-tuning (LoRA, DreamBooth, DreamBooth+LoRA) on in-memory image datasets."""
