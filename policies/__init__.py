"""Shipped data policies (``default.yaml``); packaged so installs find them."""
