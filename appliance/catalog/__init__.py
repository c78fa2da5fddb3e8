"""The catalogue of base models and fine-tuned adapters (``/v1/models``)."""
