"""What a user installs: environment.yml asks for what pyproject.toml declares, and the wheel that
`python -m build` makes carries everything the package needs at run time (corpus, sanitiser,
checks), so that `pip install minimoe-*.whl` outside this repository works."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the package supports 3.10: there this file skips)

ROOT = Path(__file__).resolve().parents[1]
# PyPI names whose conda-forge package has another name (matplotlib-base: matplotlib without a GUI toolkit)
CONDA_NAME = {"matplotlib": "matplotlib-base", "build": "python-build"}
FROM_PIP = {"torch", "triton"}  # pip picks the CPU or CUDA build that fits the machine


def _requirement(line: str) -> tuple[str, str]:
    """'numpy>=1.24' -> ('numpy', '>=1.24'); an environment marker is kept out of the bound."""
    spec = line.split(";")[0].strip()
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
    return name.lower(), spec[len(name):].strip()


def _environment_lists() -> tuple[dict, dict]:
    """environment.yml's conda dependencies and pip dependencies, as {name: bound}."""
    conda, pip, in_pip = {}, {}, False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        item = re.match(r"^(\s*)- (.+)$", line)
        if not item or line.lstrip().startswith("#"):
            continue
        indent, value = len(item.group(1)), item.group(2).strip()
        if value == "pip:":
            in_pip = True
        elif in_pip and indent > 2:
            if not value.startswith("-e"):
                pip.update([_requirement(value)])
        elif indent == 2:
            in_pip = False
            conda.update([_requirement(value)])
    return conda, pip


def _declared() -> dict:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return dict(_requirement(r) for r in project["dependencies"] + extras["course"] + extras["dev"] + extras["triton"])


def _pinned_within(spec: str | None, bound: str) -> bool:
    """'==2.13.0' within '>=2.10': an exact pin that the declared bound allows."""
    return spec is not None and spec.startswith("==") and spec[2:] in SpecifierSet(bound)


def test_environment_yml_names_every_declared_dependency_with_its_lower_bound():
    conda, pip = _environment_lists()
    for name, bound in _declared().items():
        if name in FROM_PIP:  # the bound, or the exact version the course is tested with (README pins torch)
            assert pip.get(name) == bound or _pinned_within(pip.get(name), bound), (
                f"environment.yml: pip should install {name}{bound} or a version it allows, has {pip.get(name)}")
        else:
            conda_name = CONDA_NAME.get(name, name)
            assert conda.get(conda_name) == bound, (
                f"environment.yml: conda-forge should provide {conda_name}{bound} (pyproject: {name}{bound}), "
                f"has {conda.get(conda_name)}")
    assert "-e .[course,dev,triton]" in (ROOT / "environment.yml").read_text()


@pytest.mark.parametrize(("line", "doctored"), [
    ("  - seaborn>=0.13\n", ""),  # a dependency left out
    ("  - transformers>=4.57\n", ""),  # the course extra's
    ("  - hypothesis>=6.90\n", "  - hypothesis>=6.0\n"),  # another bound than pyproject's
    ("      - torch==2.13.0\n", "      - torch==2.9.0\n"),  # a pin the bound excludes
])
def test_environment_check_catches_a_wrong_environment_yml(tmp_path, monkeypatch, line, doctored):
    """The check above can fail: a dependency missing from environment.yml, or with another bound, is named."""
    text = (ROOT / "environment.yml").read_text()
    assert line in text
    (tmp_path / "environment.yml").write_text(text.replace(line, doctored))
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    name = re.match(r"\s*- ([a-z]+)", line).group(1)
    with pytest.raises(AssertionError, match=name):
        test_environment_yml_names_every_declared_dependency_with_its_lower_bound()


def _checkout_files() -> list[str]:
    """The files a clone of this checkout has: tracked or new, not ignored, still on disk."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.splitlines()
    return [path for path in listed if (ROOT / path).is_file()]


def _build(tmp: Path, pyproject: str | None = None) -> tuple[Path, Path]:
    """(wheel, sdist) that `python -m build` makes of a copy of this checkout (with another pyproject.toml)."""
    # a copy: a stale build/ or *.egg-info/ left in the repository would hide a file missing from package-data
    # (and pip, run from the repository, would take that egg-info for an installed minimoe)
    source, out = tmp / "source", tmp / "dist"
    for path in _checkout_files():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, source / path)
    if pyproject is not None:
        (source / "pyproject.toml").write_text(pyproject)
    # --no-isolation: build with this environment's setuptools instead of downloading one
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--sdist", "--no-isolation", "--outdir", str(out)],
                   cwd=source, check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("minimoe-*.whl")
    (sdist,) = out.glob("minimoe-*.tar.gz")
    return wheel, sdist


def _missing(wheel: Path, sdist: Path) -> dict[str, list[str]]:
    """The package's files (minimoe/...) that the wheel and the sdist lack."""
    package = [path for path in _checkout_files() if path.startswith("minimoe/")]
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as archive:  # sdist members are prefixed by minimoe-0.1.0/
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    return {kind: [path for path in package if path not in names] for kind, names in
            (("wheel", in_wheel), ("sdist", in_sdist))}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[Path, Path]:
    return _build(tmp_path_factory.mktemp("build"))


def test_wheel_and_sdist_carry_every_file_of_the_package(dist):
    assert {"minimoe/nbval_sanitize.cfg", "minimoe/corpus/prose.txt", "minimoe/checks/ch01.py"} <= set(
        _checkout_files())
    assert _missing(*dist) == {"wheel": [], "sdist": []}


def test_file_check_catches_a_file_left_out_of_package_data(tmp_path):
    """The check above can fail: without "corpus/*.txt" in package-data the corpus is reported missing."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"corpus/*.txt", ' in pyproject
    missing = _missing(*_build(tmp_path, pyproject.replace('"corpus/*.txt", ', "")))
    assert "minimoe/corpus/prose.txt" in missing["wheel"] and "minimoe/corpus/prose.txt" in missing["sdist"]


@pytest.fixture
def wheel(dist) -> Path:
    return dist[0]


def test_wheel_installs_and_runs_outside_the_repository(wheel, tmp_path):
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 300}
    # pip must not see the repository: from its root (or through PYTHONPATH) the minimoe.egg-info that
    # the build leaves there reads as "minimoe 0.1.0 already installed" and pip installs nothing
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, **run)
    # the dependencies (torch, numpy, ...) come from this environment; minimoe only from the wheel
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "dependencies.pth").write_text("\n".join(ours) + "\n")
    where = subprocess.run([python, "-c", "import minimoe; print(minimoe.__file__)"], check=True, **run).stdout
    assert where.startswith(str(env_dir)), f"imported {where.strip()}, not the installed wheel"
    doctor = subprocess.run([env_dir / "bin" / "minimoe", "doctor"], **run)
    assert doctor.returncode == 0 and "torch" in doctor.stdout, doctor.stdout + doctor.stderr
    check = subprocess.run([python, "-c", "from minimoe import numpy_ref; from minimoe.checks import ch01; "
                            "ch01.check_softmax_gate(numpy_ref.softmax); "
                            "from minimoe.data import load_corpus; print(len(load_corpus().tokens['train']))"], **run)
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines()[0] == "task 1.1: PASS (3 random cases)"
    assert int(check.stdout.splitlines()[1]) > 100_000  # the shipped corpus came with the wheel
