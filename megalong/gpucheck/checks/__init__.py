"""The checks, one module per area; each public ``check_*`` takes a WorkerContext and returns a CheckResult."""
