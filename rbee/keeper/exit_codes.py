"""The exit codes of ``rbee-keeper``: 0 ok, 1 the job (or command) failed, 2 bad usage,
130 Ctrl-C.

A module of its own, with no imports, so that ``main.py`` (which must refuse a bad command
line without importing trio) and ``run_job.py`` (which runs on trio) share one copy.
"""

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130
