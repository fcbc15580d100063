"""The wheel, installed (not editable) in a fresh virtualenv, finds its plugins and templates."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import write_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = outdir.glob("vizkit-*.whl")
    return built


def test_wheel_holds_only_the_vizkit_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"vizkit"}
    for needed in ("vizkit/plugins/gradcam.py", "vizkit/templates/report.html", "vizkit/templates/report.css"):
        assert needed in names


def test_installed_wheel_writes_a_report(wheel, tmp_path, tiny_model_file):
    venv = tmp_path / "venv"
    # System site-packages provide TensorFlow and the other dependencies, so no download.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
    )
    work = tmp_path / "work"  # not the source tree, so nothing is imported from it
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import vizkit.plugins.gradcam as g, vizkit.templates as t; print(g.__file__); print(t.__file__)"],
        cwd=work, check=True, capture_output=True, text=True,
    ).stdout.split()
    assert all(str(venv) in path for path in where), where

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
