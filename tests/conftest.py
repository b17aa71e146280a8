"""Fixtures and pytest hooks shared by the test files. Plain helpers are modules the tests import:
tests/helpers.py, tests/cli_helpers.py (the end-to-end tests of the scripts), tests/reference_models.py and
tests/layouts.py (the math tests)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import cli_helpers
import helpers


def pytest_collection_modifyitems(items):
    """The tests of compare.py (local Ray instances, a two-node cluster) in one xdist group: one worker runs them,
    one after another, never two Ray clusters at once."""
    for item in items:
        if item.path.name.startswith("test_compare"):
            item.add_marker(pytest.mark.xdist_group("compare"))


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_raises_keyboard_interrupt():
    """Python's own Ctrl-C handler in the test process, whatever it inherited: a test run started in the background by
    a non-interactive shell inherits SIGINT ignored, and so would every script the Ctrl-C tests start (a handled
    signal is reset to the default in a child, an ignored one stays ignored), so those tests would test the shell."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """shared(script, name) -> the run directory of cli_helpers.SHARED_RUNS[name] made by script (made once per
    test session, on first use; tests copy it before touching it)."""
    made: dict[tuple[str, str], Path] = {}

    def get(script: str, name: str) -> Path:
        if (script, name) not in made:
            made[script, name] = cli_helpers.make_shared_run(script, name, tmp_path_factory.mktemp(f"{script}_{name}"))
        return made[script, name]

    return get


@pytest.fixture
def compiled_vs_eager():
    """check_compiled_update, for tests of each script's compiled update."""
    return helpers.check_compiled_update
