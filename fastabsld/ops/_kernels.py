"""Finds the Triton kernels, ``fastabsld.kernels``: installed from the repository's ``kernels/`` folder.

An install (editable or not) maps ``kernels/`` to ``fastabsld.kernels``. A source checkout used
without installing (the repository root on ``sys.path``) has no such package, so the folder next
to ``fastabsld/`` is loaded under that name instead. ``HAS_TRITON`` says whether the kernels can run;
``kd_kl_div_checks`` (torch only) is importable either way.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

_SOURCE = Path(__file__).resolve().parents[2] / "kernels"


def _load_from_checkout():
    init = _SOURCE / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location("fastabsld.kernels", init, submodule_search_locations=[str(_SOURCE)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastabsld.kernels"] = module
    spec.loader.exec_module(module)
    # As the import system does for a found submodule: ``fastabsld.kernels`` resolves as an attribute too.
    setattr(sys.modules["fastabsld"], "kernels", module)
    return module


try:
    kernels = importlib.import_module("fastabsld.kernels")
except ModuleNotFoundError as error:
    if error.name != "fastabsld.kernels":
        raise
    kernels = _load_from_checkout()

HAS_TRITON = bool(kernels is not None and kernels.HAS_TRITON)

# Torch-only modules of the kernels folder, which the op layer uses with or without triton (imported
# here, once ``fastabsld.kernels`` is found).
from fastabsld.kernels import kd_kl_div_checks  # noqa: E402
