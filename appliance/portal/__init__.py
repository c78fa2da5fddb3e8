"""The internal portal: server-rendered pages for data owners, trainers, consumers, auditors and admins."""
