"""The wheel, installed (not editable) in a fresh virtualenv, finds its plugins and templates."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from conftest import write_image

ROOT = Path(__file__).resolve().parents[1]


def _can_build_here() -> bool:
    """Whether this environment has what pyproject.toml's [build-system] requires: then the
    wheel is built with it (--no-isolation), and nothing is downloaded."""
    from packaging.requirements import Requirement  # a dependency of build

    for line in tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]:
        requirement = Requirement(line)
        try:
            if not requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
                return False
        except metadata.PackageNotFoundError:
            return False
    return True


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("dist")
    isolation = ["--no-isolation"] if _can_build_here() else []
    # An sdist, then the wheel from it (build's default), not --wheel: a wheel built in the
    # source tree packs whatever an earlier build left in build/lib, so a packaging
    # mistake (a package left out of pyproject.toml) would not show.
    process = subprocess.run(
        [sys.executable, "-m", "build", *isolation, "--outdir", str(outdir), str(ROOT)],
        capture_output=True, text=True,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    (built,) = outdir.glob("vizkit-*.whl")
    return built


def test_wheel_holds_only_the_vizkit_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"vizkit"}
    for needed in ("vizkit/plugins/gradcam.py", "vizkit/templates/report.html", "vizkit/templates/report.css"):
        assert needed in names


def _site_directories() -> list[str]:
    """This interpreter's site-packages folders (a virtualenv's own, the system's where the
    virtualenv sees them, the user's where enabled), in this interpreter's sys.path order."""
    paths = sysconfig.get_paths()
    found = {paths["purelib"], paths["platlib"], *site.getsitepackages()}
    if site.ENABLE_USER_SITE:
        found.add(site.getusersitepackages())
    return [path for path in dict.fromkeys(sys.path) if path in found]


def test_installed_wheel_writes_a_report(wheel, tmp_path, tiny_model_file):
    # A venv of its own, not --system-site-packages: inside a virtualenv that would see the
    # base interpreter's packages, not this environment's TensorFlow.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # This pip (22.3+ for --python) installs into the new venv, from the wheel alone
    # (--no-index); --without-pip above saves the venv its own pip (about 5 s).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install",
         "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    # The dependencies (TensorFlow, Keras, ...) come from this interpreter's site-packages,
    # appended to the venv's sys.path by a .pth file. Folders named in a .pth file are only
    # appended: their own .pth files are not run, so the editable install of vizkit there
    # (an __editable__ finder started by a .pth file) stays off, and only the wheel can
    # supply vizkit. Written after pip ran, so pip saw nothing installed but the wheel.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(purelib) / "outer_site_packages.pth").write_text("\n".join(_site_directories()) + "\n")

    work = tmp_path / "work"  # not the source tree, so nothing is imported from it
    work.mkdir()
    # Where each module would be imported from (find_spec: without running TensorFlow's
    # start-up here), and which import finders are active.
    probe = """
import importlib.util, json, sys
print(json.dumps({
    "vizkit": [importlib.util.find_spec(name).origin for name in (
        "vizkit", "vizkit.plugins.gradcam", "vizkit.templates")],
    "finders": [getattr(finder, "__module__", "") for finder in sys.meta_path],
}))
"""
    probed = subprocess.run([str(python), "-c", probe], cwd=work, capture_output=True, text=True)
    assert probed.returncode == 0, probed.stderr
    where = json.loads(probed.stdout)
    assert all(path.startswith(purelib) for path in where["vizkit"]), where
    assert not any("__editable__" in finder for finder in where["finders"]), where

    image = write_image(work / "photo.png")
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0"}
    result = subprocess.run(
        [
            str(venv / "bin" / "vizkit"), "run", str(tiny_model_file), str(image), "-o", "out",
            "-s", "filters.count=2", "-s", "filters.steps=2", "-s", "filters.size=16",
        ],
        cwd=work, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    html = (work / "out" / "index.html").read_text(encoding="utf-8")
    for technique in ("activations", "filters", "gradcam"):
        assert f'id="technique-{technique}"' in html
    assert "data:image/png;base64," in html
