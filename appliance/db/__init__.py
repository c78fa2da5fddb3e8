"""Database access: engine, transactions and migrations."""

from appliance.db.base import Base, Database
from appliance.db.migrate import upgrade_to_head

__all__ = ["Base", "Database", "upgrade_to_head"]
