"""pytest plugin: how much disk the test suite holds in pytest's temporary folder.

    PYTHONPATH=bench python -m pytest -p pytest_disk_use Testing

After each test (before its tmp_path is removed) it records the size of the run's basetemp
(`du -sm`), and at the end prints the largest three and the size left after the whole run.
"""

from __future__ import annotations

import subprocess

import pytest

_SIZES: list = []


def _megabytes(path) -> int:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    _SIZES.append((_megabytes(item.config._tmp_path_factory.getbasetemp()), item.nodeid))
    yield


def pytest_terminal_summary(terminalreporter, config):
    largest = sorted(_SIZES, reverse=True)[:3]
    terminalreporter.write_line("disk held in pytest's basetemp, largest after a test: "
                                + "; ".join(f"{mb} MB ({node})" for mb, node in largest))
    terminalreporter.write_line(f"left after the whole run: {_megabytes(config._tmp_path_factory.getbasetemp())} MB")
