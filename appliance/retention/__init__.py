"""Retention: crypto-shred the datasets and adapters that outlived their project's policy.

* :class:`RetentionSweeper` (a server thread, and ``appliance retention sweep``) -> :class:`SweepResult`
* :func:`find_expired` -> :class:`Expired`
"""

from appliance.retention.sweeper import SYSTEM, Expired, RetentionSweeper, SweepResult, find_expired

__all__ = ["SYSTEM", "Expired", "RetentionSweeper", "SweepResult", "find_expired"]
