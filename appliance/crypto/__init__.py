"""Key material and encryption at rest."""
