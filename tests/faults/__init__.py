"""Fault tests: real processes, real SIGKILL, a disk that fills up; nothing under test is mocked.

- SIGKILL of the server during a streamed upload: ``test_crash_upload.py``.
- SIGKILL during training: ``tests/integration/test_jobs.py::test_sigkill_of_the_whole_server_leaves_the_job_resumable``
  (the whole server) and ``::test_killed_worker_leaves_job_failed_resumable_and_resume_finishes`` (the worker).
- SIGKILL during audit appends (a library writer and ``appliance serve``): ``test_crash_audit.py``.
- SIGKILL during ``appliance keys rotate``: ``test_crash_key_rotation.py``.
- Disk full while a blob is written: ``test_disk_full.py``.
"""
