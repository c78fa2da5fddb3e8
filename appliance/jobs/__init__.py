"""Fine-tuning jobs: API, queue, isolated workers."""
