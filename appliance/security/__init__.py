"""Checks on the appliance's own installation (not on the data it handles)."""
