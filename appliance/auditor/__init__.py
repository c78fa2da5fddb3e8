"""What auditors read: the audit API (events, chain verification, Merkle proofs) and reports over the log.

Above the feature packages: the log itself (:mod:`appliance.audit`) sits below every package that
writes to it, while a report joins the log with projects, files and models.
"""
