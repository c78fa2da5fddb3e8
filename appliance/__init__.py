"""The appliance control plane: API, portal, intake, jobs and audit."""

__version__ = "0.1.0"
