"""Every test in this folder is a ``cuda`` test: deselected by default, run by `make test-cuda`,
skipped (see ``tests/conftest.py``) without a GPU or under Triton's interpreter."""

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects items by their markers
def pytest_collection_modifyitems(items):
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.cuda)
