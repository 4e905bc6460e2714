"""pyproject.toml's requires-python and the pinned requirements agree: every pin installs on every Python
the project accepts, and the lowest accepted one is the lowest the pins allow.

The installed packages' own metadata (Requires-Python) is the evidence, so the environment must be
the pinned one (``make install``).
"""

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# The Python minor versions judged: every one that has been released or is in its beta (3.x, x <= 15).
MINORS = range(0, 16)


def pinned_requirements():
    """The ``name==version`` lines of requirements.txt as (name, version); unpinned lines are skipped."""
    pins = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        versions = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if versions:
            pins.append((requirement.name, versions[0]))
    return pins


def requires_python():
    """pyproject.toml's requires-python as a SpecifierSet."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return SpecifierSet(project["requires-python"])


def pinned_python_ranges():
    """Each pin's Requires-Python, read from the installed distribution's metadata.

    Returns:
        dict: name -> SpecifierSet (empty when the package declares none).
    """
    ranges = {}
    for name, version in pinned_requirements():
        installed = importlib.metadata.distribution(name)
        assert installed.version == version, (
            f"{name} {installed.version} is installed, requirements.txt pins {version}: run `make install`")
        ranges[name] = SpecifierSet(installed.metadata.get("Requires-Python") or "")
    return ranges


def accepted_minors(specifiers):
    """The Python 3 minor versions whose first release a SpecifierSet accepts."""
    return [minor for minor in MINORS if Version(f"3.{minor}.0") in specifiers]


def test_the_requirements_are_pinned():
    pinned = dict(pinned_requirements())
    for name in ("torch", "triton", "numpy", "scikit-learn", "matplotlib", "pytest", "hypothesis"):
        assert name in pinned, f"requirements.txt does not pin {name}"


def test_every_pin_installs_on_every_accepted_python():
    accepted = accepted_minors(requires_python())
    assert accepted, "requires-python accepts no Python 3 release"
    refusals = [f"{name} ({specifiers}) refuses 3.{minor}" for name, specifiers in pinned_python_ranges().items()
                for minor in accepted if Version(f"3.{minor}.0") not in specifiers]
    assert not refusals, f"pyproject.toml accepts Python {requires_python()}, but: {'; '.join(refusals)}"


def test_requires_python_is_not_narrower_than_the_pins():
    """Both ends of the accepted range are the pins' own: the version below and the one above are refused by a pin."""
    accepted = accepted_minors(requires_python())
    ranges = pinned_python_ranges()
    below, above = accepted[0] - 1, accepted[-1] + 1
    assert any(Version(f"3.{below}.0") not in specifiers for specifiers in ranges.values()), (
        f"every pin installs on 3.{below}: requires-python could accept it")
    if above in MINORS:
        assert any(Version(f"3.{above}.0") not in specifiers for specifiers in ranges.values()), (
            f"every pin installs on 3.{above}: requires-python could accept it")


def test_the_gpu_check_reads_the_same_range():
    """benchmarks.gpu_check's preflight judges the Python it runs on by the same requires-python."""
    from benchmarks import gpu_check

    (low, high), accepted = gpu_check.required_python(), accepted_minors(requires_python())
    assert low == (3, accepted[0]) and high == (3, accepted[-1] + 1)


def test_the_readme_states_the_same_python():
    low, high = accepted_minors(requires_python())[0], accepted_minors(requires_python())[-1]
    text = (ROOT / "README.md").read_text()
    assert re.search(rf"Python 3\.{low} to 3\.{high}\b", text), f"the README does not state Python 3.{low} to 3.{high}"
    stale = [m for m in re.findall(r"Python\s*(?:>=|≥)\s*3\.(\d+)", text) if int(m) != low]
    assert not stale, f"the README still states Python >= 3.{stale[0]}"
