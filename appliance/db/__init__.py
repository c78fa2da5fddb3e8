"""Database access: engine and transactions (the schema's migrations live in :mod:`appliance.migrations`)."""

from appliance.db.base import Base, Database

__all__ = ["Base", "Database"]
