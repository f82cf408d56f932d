"""leakaudit installs and runs outside this repository, and its CI example installs it the way a user can.

The wheel is built from a copy of the sources (``python -m build --wheel --no-isolation``:
offline, with the build backend of this environment), its file list is checked against the
source tree, and it is installed with ``pip install --no-deps`` into a fresh virtual
environment whose third-party packages come from this one (a ``.pth`` line: torch cannot be
installed again offline). The commands then run from a folder outside the repository, with
no ``PYTHONPATH``, and every leakaudit module they load must come from that environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
# package-dir maps each top package onto its folder (leakaudit.attacks -> attacks/).
PACKAGE_DIRS: dict[str, str] = SETUPTOOLS["package-dir"]
SKIP_DIRS = {"__pycache__"}
SKIP_WALK = {".git", ".venv", "venv", "node_modules", "build", "dist", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


def _top_roots() -> dict[str, Path]:
    """The mapped folders that are not inside another mapped folder: they hold everything."""
    roots = {name: ROOT / folder for name, folder in PACKAGE_DIRS.items()}
    return {
        name: path
        for name, path in roots.items()
        if not any(other != name and path.is_relative_to(p) and path != p for other, p in roots.items())
    }


def _source_files() -> dict[str, Path]:
    """Every file the wheel must hold, as its path in the wheel → its path in the checkout."""
    files: dict[str, Path] = {}
    for package, folder in _top_roots().items():
        prefix = package.replace(".", "/")
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_dir() or SKIP_DIRS & set(rel.parts) or path.suffix == ".pyc":
                continue
            files[f"{prefix}/{rel.as_posix()}"] = path
    return files


def _source_packages() -> set[str]:
    """Every folder of the source tree with an ``__init__.py``, under its import name."""
    packages = set()
    for package, folder in _top_roots().items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            if SKIP_DIRS & set(rel.parts):
                continue
            packages.add(".".join([package, *rel.parts]))
    return packages


def test_pyproject_lists_every_package_of_the_source_tree():
    # setuptools installs only the listed packages: a new subpackage missing here would be
    # missing from every installed copy, while the editable checkout still imports it.
    assert sorted(SETUPTOOLS["packages"]) == sorted(_source_packages())
    for package, folder in _top_roots().items():
        for path in folder.rglob("*.py"):
            if not SKIP_DIRS & set(path.relative_to(folder).parts):
                assert (path.parent / "__init__.py").exists(), f"{path.parent} holds Python code but no __init__.py"


def test_package_data_the_code_reads_is_declared():
    # Non-Python files under a package ship only through package-data.
    declared = SETUPTOOLS.get("package-data", {})
    for wheel_path in _source_files():
        if wheel_path.endswith(".py"):
            continue
        package = wheel_path.rsplit("/", 1)[0].replace("/", ".")
        patterns = declared.get(package, []) + declared.get("*", [])
        name = wheel_path.rsplit("/", 1)[1]
        assert any(Path(name).match(p) for p in patterns), f"{wheel_path} is not in [tool.setuptools.package-data]"


def _missing_build_requirements() -> list[str]:
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    for text in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(text)
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{text} (not installed)")
            continue
        # The version of the copy this interpreter imports, the one a build without isolation uses.
        module = __import__(requirement.name)
        if not requirement.specifier.contains(getattr(module, "__version__", version), prereleases=True):
            missing.append(f"{text} (found {getattr(module, '__version__', version)})")
    return missing


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    missing = _missing_build_requirements()
    if missing:
        pytest.fail(
            "the build backend of pyproject.toml is not importable here: " + ", ".join(missing) + ". pip install -e '.[dev]'"
        )
    src = tmp_path_factory.mktemp("src")
    # A copy, so that the build's build/ and *.egg-info never land in the checkout.
    shutil.copy2(ROOT / "pyproject.toml", src)
    shutil.copy2(ROOT / PYPROJECT["project"]["readme"], src)
    for folder in _top_roots().values():
        shutil.copytree(folder, src / folder.relative_to(ROOT), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True, text=True, cwd=src, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob("leakaudit-*.whl")
    return path


def test_wheel_holds_every_package_module_and_data_file(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata_text = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    content = {n for n in names if not n.startswith(dist_info + "/")}
    expected = set(_source_files())
    assert sorted(expected - content) == [], "missing from the wheel"
    assert sorted(content - expected) == [], "in the wheel but not in the source tree"
    assert {"leakaudit/py.typed", "leakaudit/attacks/__init__.py", "leakaudit/metrics/_dcor/__init__.py"} <= content
    assert "leakaudit = leakaudit.cli:main" in entry_points
    for extra, package in (("hf", "transformers"), ("onnx", "onnxruntime"), ("onnx", "onnxscript")):
        assert f"Provides-Extra: {extra}" in metadata_text
        assert any(
            line.startswith(f"Requires-Dist: {package}") and f'extra == "{extra}"' in line for line in metadata_text.splitlines()
        ), (extra, package)


def _third_party_paths() -> list[str]:
    """The site-packages folders this interpreter imports torch and the rest from."""
    paths = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    purelib = sysconfig.get_paths()["purelib"]
    return list(dict.fromkeys([purelib, *paths]))


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "env"
    # Without pip: the wheel is installed by this interpreter's pip (`--python`), so no
    # bundled setuptools of the new environment shadows the dependencies of this one.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "_deps.pth").write_text("".join(f"{p}\n" for p in _third_party_paths()))
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def _run_outside(venv: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", LEAKAUDIT_CACHE=str(tmp_path / "cache"), PYTHONNOUSERSITE="1"
    )
    return subprocess.run(list(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_installed_wheel_runs_outside_the_repository(fresh_venv, tmp_path):
    from leakaudit.registry import FAMILIES

    assert not tmp_path.is_relative_to(ROOT)
    leakaudit = str(fresh_venv / "bin" / "leakaudit")
    site = next((fresh_venv / "lib").glob("python3*/site-packages"))

    # Every package of the source tree imports, and from the new environment only.
    packages = sorted(_source_packages())
    probe = _run_outside(
        fresh_venv, tmp_path, str(fresh_venv / "bin" / "python"), "-c",
        "import importlib, json, sys; from importlib import metadata; "
        f"[importlib.import_module(p) for p in {packages!r}]; "
        "from leakaudit.registry import FAMILIES; "
        "print(json.dumps({'plugins': {f: r.names() for f, r in FAMILIES.items()}, "
        "'files': {n: m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'leakaudit'}, "
        "'dist': str(metadata.distribution('leakaudit').locate_file(''))}))",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout)
    assert Path(found["dist"]).resolve() == site.resolve()
    assert set(packages) <= set(found["files"])
    for name, file in found["files"].items():
        assert Path(file).resolve().is_relative_to(site.resolve()), f"{name} imported from {file}"
    # The built-in plugins (from the attacks/, metrics/ and recipes/ packages) all register.
    for family, registry in FAMILIES.items():
        builtin = {p.name for p in registry if p.target.__module__.startswith(registry._builtin_module)}
        assert builtin and builtin <= set(found["plugins"][family]), (family, sorted(builtin - set(found["plugins"][family])))

    shown = _run_outside(fresh_venv, tmp_path, leakaudit, "--help")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "dump" in shown.stdout and "audit" in shown.stdout
    listed = _run_outside(fresh_venv, tmp_path, leakaudit, "list", "recipes", "--json")
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert {p["name"] for p in json.loads(listed.stdout)["plugins"]} == set(found["plugins"]["recipes"])

    dumped = _run_outside(
        fresh_venv, tmp_path, leakaudit, "--quiet", "dump", "lenet5", "--data", "digits", "--limit", "64",
        "--layer", "conv3", "-o", "x.h5",
    )  # fmt: skip
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    info = _run_outside(fresh_venv, tmp_path, leakaudit, "info", "x.h5", "--verify", "--json")
    assert info.returncode == 0, info.stderr[-3000:]
    summary = json.loads(info.stdout)
    assert summary["rows"] == 64
    assert summary["integrity"]["status"] == "verified"
    assert summary["provenance"]["layer"] == "conv3"


# --- the GitHub Actions example --------------------------------------------------------------


def _workflow_files() -> list[Path]:
    """Every GitHub workflow in the repository: YAML with top-level ``on`` and ``jobs``."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_WALK)  # pruned: a .venv holds tens of thousands of files
        found += [Path(folder, f) for f in sorted(files) if f.endswith((".yml", ".yaml"))]
    workflows = []
    for path in found:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        # YAML 1.1 reads the key `on` as True.
        if isinstance(data, dict) and "jobs" in data and ("on" in data or True in data):
            workflows.append(path)
    return workflows


def _check_workflow(path: Path) -> subprocess.CompletedProcess:
    # The vendored schema ships inside check-jsonschema: no download.
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_every_workflow_file_is_found():
    assert ROOT / "examples" / "ci" / "leakaudit.yml" in _workflow_files()


@pytest.mark.parametrize("path", _workflow_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_workflow_validates_against_the_github_workflow_schema(path):
    checked = _check_workflow(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_schema_check_rejects_a_broken_workflow(tmp_path):
    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "leakaudit.yml").read_text())
    workflow["jobs"]["audit"]["steps"][0]["uses"] = 42  # `uses` must be a string
    del workflow["jobs"]["audit"]["runs-on"]  # and a job needs runs-on
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(workflow))
    checked = _check_workflow(broken)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "runs-on" in checked.stdout


def _pip_installs(workflow: dict) -> list[list[str]]:
    """The arguments of every ``pip install`` in the workflow, with its env values put in."""
    env = dict(workflow.get("env") or {})
    installs = []
    for job in workflow["jobs"].values():
        job_env = {**env, **(job.get("env") or {})}
        for step in job["steps"]:
            step_env = {**job_env, **(step.get("env") or {})}
            for line in step.get("run", "").splitlines():
                words = line.split()
                if "pip" in words and "install" in words:
                    args = words[words.index("install") + 1 :]
                    installs.append([_substitute(a, step_env) for a in args])
    return installs


def _substitute(word: str, env: dict) -> str:
    for key, value in env.items():
        word = word.replace(f"${{{key}}}", str(value)).replace(f"${key}", str(value))
    return word.strip("'\"")


def test_workflow_installs_leakaudit_from_the_repository_not_an_index():
    # leakaudit is not published on an index: `pip install leakaudit` would fail (or install
    # someone else's package of that name).
    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "leakaudit.yml").read_text())
    installs = _pip_installs(workflow)
    targets = [a for args in installs for a in args if not a.startswith("-")]
    assert targets, "the workflow installs nothing"
    assert not any(t.split("[")[0].lower() == "leakaudit" for t in targets), targets
    sources = [t for t in targets if t.startswith((".", "/", "git+")) or "@ git+" in t]
    assert sources, targets
    # The path form installs this checkout: what it names must be the project itself.
    for source in sources:
        if source.startswith((".", "/")):
            assert (ROOT / source.split("[")[0] / "pyproject.toml").resolve() == (ROOT / "pyproject.toml").resolve()
