"""The test suite. `REPO_ROOT`: the checkout the tests run in (its examples, chart, models)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
