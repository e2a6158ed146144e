r"""The scripts under ``experiments/`` are not a package: they import their
shared helpers as ``_study`` (Python puts the script's folder first on the
path). Tests load them by file name the same way."""
import importlib.util
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _load(name: str):
    if name in sys.modules and getattr(sys.modules[name], "__file__", "").startswith(
            str(EXPERIMENTS)):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the scripts' own `from _study import ...` finds it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script():
    r"""``script("summarize_runs")``: the module of ``experiments/summarize_runs.py``."""
    _load("_study")
    return _load
