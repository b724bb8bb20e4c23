import os

# Triton kernels run in the interpreter here (no GPU); it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
