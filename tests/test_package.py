"""Packaging: the declared dependencies are what is installed and imported, the API is importable from
``cem_jax``, only ``cem_jax`` installs (with py.typed and the console scripts)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PYPROJECT = tomllib.load(_f)
PROJECT = PYPROJECT["project"]

# import name -> distribution name, for the third-party imports of the package
DISTRIBUTION = {
    "jax": "jax",
    "flax": "flax",
    "optax": "optax",
    "orbax": "orbax-checkpoint",
    "absl": "absl-py",
    "dm_pix": "dm-pix",
    "PIL": "pillow",
    "numpy": "numpy",
    "matplotlib": "matplotlib",
    "etils": "etils",
    "fsspec": "fsspec",  # gs:// only (cem_jax.storage imports it on first use of a gs:// path)
    "gcsfs": "gcsfs",
    "scipy": "scipy",  # the results page's statistics (plots extra; jax requires it too)
    "tensorflow_datasets": "tensorflow-datasets",  # --dataset=tfds:NAME only (tfds extra)
}


def _requirements(lines: list[str]) -> dict[str, str]:
    """``{distribution: specifier}`` of requirement strings (extras and markers dropped)."""
    out = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*([^;]*)", line)
        out[m.group(1).lower()] = m.group(3).strip()
    return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def _third_party_imports() -> set[str]:
    """Top-level names imported anywhere in cem_jax/ (module level or inside functions)."""
    names = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "cem_jax")):
        for fn in files:
            if not fn.endswith(".py"):
                continue
            with open(os.path.join(dirpath, fn)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "cem_jax"}


def test_every_third_party_import_is_declared():
    deps = _requirements(PROJECT["dependencies"])
    extras = _requirements(PROJECT["optional-dependencies"]["plots"])
    extras |= _requirements(PROJECT["optional-dependencies"]["gcs"])
    extras |= _requirements(PROJECT["optional-dependencies"]["tfds"])
    for name in sorted(_third_party_imports()):
        assert name in DISTRIBUTION, f"cem_jax imports {name}: map it to its distribution here"
        dist = DISTRIBUTION[name]
        assert dist in deps or dist in extras, f"{dist} (imported as {name}) is not declared"
    assert "tensorflow-datasets" not in deps  # CIFAR downloads without TensorFlow


def test_installed_versions_satisfy_the_declared_bounds():
    """Declare what is tested: each lower bound is met by what is installed (CI installs the
    declared dependencies in a fresh venv), and each upper bound too."""
    reqs = _requirements(PROJECT["dependencies"])
    reqs |= _requirements(PROJECT["optional-dependencies"]["test"])
    for dist, spec in reqs.items():
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{dist} is declared but not installed: pip install -e .[test]")
        for op, bound in re.findall(r"(>=|<|==)\s*([\w.]+)", spec):
            have, want = _version(installed), _version(bound)
            ok = {">=": have >= want, "<": have < want, "==": installed == bound}[op]
            assert ok, f"{dist} {installed} does not satisfy {op}{bound}"
    # the code needs these at least, whatever the bounds say
    assert _version(reqs["jax"].split(",")[0].lstrip(">=")) >= (0, 7, 1)  # jax.set_mesh
    assert _version(reqs["flax"].split(",")[0].lstrip(">=")) >= (0, 12)  # nnx.List


def test_extras_and_console_scripts_are_declared():
    extras = PROJECT["optional-dependencies"]
    assert {"cuda12", "tpu", "test", "plots", "gcs"} <= set(extras)
    assert any(r.startswith("jax[cuda12]") for r in extras["cuda12"])
    assert any(r.startswith("jax[tpu]") for r in extras["tpu"])
    assert "ruff==0.17.6" in extras["test"]
    scripts = PROJECT["scripts"]
    assert set(scripts) == {"cem-run", "cem-sweep", "cem-attack"}
    for target in scripts.values():
        module, func = target.split(":")
        assert module.startswith("cem_jax.cli.")
        assert callable(getattr(importlib.import_module(module), func))
    assert not os.path.exists(os.path.join(ROOT, "setup.cfg"))  # one place for the metadata


def test_main_api_is_importable_from_the_package():
    code = (
        "import sys, cem_jax\n"
        "assert 'jax' not in sys.modules, 'import cem_jax must stay cheap'\n"
        "from cem_jax import (MixtureState, cem_loss, fit_mixture, leakage_upper_bound,\n"
        "                     load_client, mse_lower_bound)\n"
        "from cem_jax import client, entropy\n"
        "assert cem_loss is entropy.cem_loss and fit_mixture is entropy.fit_mixture\n"
        "assert MixtureState is entropy.MixtureState and load_client is client.load_client\n"
        "assert leakage_upper_bound is entropy.leakage_upper_bound\n"
        "assert mse_lower_bound is entropy.mse_lower_bound\n"
        "assert set(cem_jax.__all__) == set(cem_jax._API) and set(cem_jax.__all__) <= set(dir(cem_jax))\n"
        "try:\n"
        "    cem_jax.not_there\n"
        "except AttributeError as e:\n"
        "    assert 'not_there' in str(e)\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_version_is_the_installed_one():
    import cem_jax

    assert importlib.metadata.version("cem_jax") == cem_jax.__version__


def test_deprecation_warnings_are_not_filtered_wholesale():
    filters = PYPROJECT["tool"]["pytest"]["ini_options"].get("filterwarnings", [])
    assert "ignore::DeprecationWarning" not in filters
    for f in filters:
        if f.startswith("ignore") and "DeprecationWarning" in f:
            assert f.count(":") >= 2 and f.split(":")[1], f"name what {f!r} filters"


def test_wheel_holds_only_cem_jax_with_py_typed_and_the_scripts(tmp_path):
    # built as pip builds it for a user (isolated build environment, setuptools from pyproject.toml)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            ROOT,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("cem_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"cem_jax"}, top  # no experiments/, benchmarks/, tests/ in site-packages
    assert "cem_jax/py.typed" in names
    assert "cem_jax/cli/run.py" in names and "cem_jax/models/vgg.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("cem-run = cem_jax.cli.run:main", "cem-sweep", "cem-attack"):
        assert script in text
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    )
    assert (
        b"Requires-Dist: jax<0.11,>=0.10.2" in metadata or b"Requires-Dist: jax>=0.10.2" in metadata
    )
