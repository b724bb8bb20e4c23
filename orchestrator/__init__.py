"""Execution backends for the CPU workers (layer 2: imports the core and the kernels, never
the reverse). Each backend implements ``hetero.backend.CPUBackend`` and registers itself in
``pyproject.toml`` as an entry point of the group ``hetero.backends`` (``local``: a thread
pool in this process; ``ray``: Ray actors, the only module that imports Ray), which the
facade looks up by name."""
