"""Test modes.

    pytest            default: compares every stage with stored reference outputs (tests/fixtures/), no
                      `transformers` needed.
    pytest --live     also runs the live reference tests (marked `live`): they build fresh random models with
                      `transformers` (tests/reference/requirements.txt) and compare on the spot.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "reference"))  # lets live tests import the reference builders


def pytest_addoption(parser):
    parser.addoption("--live", action="store_true", help="run the live reference tests (needs transformers)")


def pytest_configure(config):
    config.addinivalue_line("markers", "live: compares against a live `transformers` reference (run with --live)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--live"):
        return
    skip = pytest.mark.skip(reason="live reference test: run with --live (needs tests/reference/requirements.txt)")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)
