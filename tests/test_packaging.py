"""What the wheel ships: every Python package of the checkout, and data/ as rlaif.data (pyproject.toml)."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from rlaif.prompts import PROMPT_SETS

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_in_the_checkout_is_listed():
    """The package list is explicit (discovery cannot map data/ to rlaif.data): a new subpackage must be added."""
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "rlaif").rglob("__init__.py")}
    assert set(SETUPTOOLS["packages"]) == found | {"rlaif.data", "rlaif.scorers"}


def test_the_wheel_installs_only_rlaif_into_site_packages(tmp_path):
    """Built-in scorers install as rlaif.scorers (no generic top-level `scorers` module to shadow or be
    shadowed), their entry points name that module, and the wheel holds the licence."""
    import subprocess
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("rlaif-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(meta).decode().split() == ["rlaif"]
        points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {name.split("/")[0] for name in names if not name.startswith("rlaif-")} == {"rlaif"}
    assert "rlaif/scorers/jpeg.py" in names and "rlaif/data/PartiPrompts.tsv" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "compressibility = rlaif.scorers.jpeg:compressibility" in points and " scorers." not in points


def test_data_is_installed_as_rlaif_data_with_every_prompt_set():
    assert SETUPTOOLS["package-dir"]["rlaif.data"] == "data"
    patterns = SETUPTOOLS["package-data"]["rlaif.data"]
    for name in [*PROMPT_SETS.values(), "LICENSE.parti", "README.md"]:
        assert any(Path(name).match(pattern) for pattern in patterns), name
