"""pyproject lists packages by hand (kernels/ installs as mhc_kernels); keep the list complete."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for init in ROOT.glob("mhc_train/**/__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    found |= {"mhc_kernels", "data_recipes"}
    assert found - listed == set(), f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"
    assert (ROOT / "kernels" / "__init__.py").is_file()


def test_torch_is_pinned():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines
