"""pytest plugin of the GPU check (``-p pytest_timings``): one JSON line per test phase as soon as it ends, into
the file ``$GPU_CHECK_TIMINGS`` names, so that a run stopped at its deadline still says which tests passed and how
long each took."""

import json
import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("GPU_CHECK_TIMINGS")
    if not path:
        return
    line = {"test": report.nodeid, "when": report.when, "outcome": report.outcome, "seconds": report.duration}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
