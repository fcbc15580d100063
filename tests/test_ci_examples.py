"""The example CI workflows (examples/ci/), run end to end without GitHub or GitLab.

Both workflows hand all of vizkit's work to one script, examples/ci/vizkit-ci.sh (vizkit
run, then vizkit compare when a base report was downloaded), so these tests run that very
script, as the workflows do (``bash "$VIZKIT_CI"`` with MODEL, IMAGES, FAIL_ON in the
environment), on two tiny models that differ in a known way: NEW is BASE with the Dense
bias of one class raised, so every image whose top-1 was another class flips to it.

- the main branch's run writes the base report and compares nothing (exit 0);
- a pull request with NEW: the comparison lists the flips, and the exit status is 1;
- a pull request with BASE itself: nothing flipped, maps identical, exit 0;
- a run that exits 1 (an undecodable image) still compares, and its 1 fails the job;
- a run that writes no report (exit 2): its status passes through, nothing compared.

What only GitHub or GitLab can run is not tested here: the base report's download (gh run
list / gh run download, curl on the job artifacts API), the pip install and cache, the
uploads. test_workflows_hand_the_work_to_the_script checks that the workflows call the
script with the settings it reads. Offline; each script run loads TensorFlow once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tiny, raise_a_class, write_image

CI = Path(__file__).resolve().parents[1] / "examples" / "ci"
SCRIPT = CI / "vizkit-ci.sh"
WORKFLOWS = [CI / "github-actions.yml", CI / "gitlab-ci.yml"]


def _ci(workdir: Path, model: str, **settings) -> subprocess.CompletedProcess:
    """``bash vizkit-ci.sh`` in ``workdir``, as a workflow's step runs it; the ``vizkit``
    command is this interpreter's (its bin folder first on PATH)."""
    env = dict(os.environ, MODEL=model, IMAGES="images", **settings)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=workdir, env=env, capture_output=True, text=True, timeout=180)


def _pull_request(pipeline, name: str) -> Path:
    """A fresh checkout of a pull request: the images, both models, and the main branch's
    report downloaded as base-report (what the workflows' download step leaves)."""
    workdir = pipeline["root"] / name
    workdir.mkdir()
    shutil.copytree(pipeline["main"] / "images", workdir / "images")
    shutil.copytree(pipeline["main"] / "report", workdir / "base-report")
    for model in ("base.keras", "new.keras"):
        shutil.copy(pipeline["root"] / model, workdir / model)
    return workdir


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The main branch's pipeline (its report), and NEW, whose top-1 flips on ``flips`` images."""
    root = tmp_path_factory.mktemp("ci")
    main = root / "main"
    (main / "images").mkdir(parents=True)
    write_image(main / "images" / "one.png", seed=1)
    write_image(main / "images" / "two.png", seed=2)
    model = build_tiny()
    model.save(root / "base.keras")
    shutil.copy(root / "base.keras", main / "model.keras")

    done = _ci(main, "model.keras")
    assert done.returncode == 0, done.stdout + done.stderr

    flips = raise_a_class(model, main / "report")
    model.save(root / "new.keras")
    return {"root": root, "main": main, "main_run": done, "flips": flips}


def test_the_main_branch_run_writes_the_base_report_and_compares_nothing(pipeline):
    main, done = pipeline["main"], pipeline["main_run"]
    assert {p.name for p in (main / "report").iterdir()} == {"index.html", "report.json", "arrays.npz"}
    report = json.loads((main / "report" / "report.json").read_text())
    assert [t["name"] for t in report["techniques"]] == ["gradcam"] and report["techniques"][0]["status"] == "ok"
    assert "no base report in base-report: nothing compared" in done.stdout
    assert not (main / "comparison").exists()


def test_a_pull_request_whose_predictions_flip_fails(pipeline):
    workdir = _pull_request(pipeline, "pr-flips")
    done = _ci(workdir, "new.keras")
    assert done.returncode == 1, done.stdout + done.stderr
    assert pipeline["flips"] >= 1
    assert f"--fail-on flips>0: {pipeline['flips']} top-1 flip(s)" in done.stderr
    data = json.loads((workdir / "comparison" / "compare.json").read_text())
    assert data["predictions"]["compared"] == 2 and data["predictions"]["flips"] == pipeline["flips"]
    (gradcam,) = data["similarity"]
    assert gradcam["technique"] == "gradcam" and gradcam["compared"] == 2  # both runs saved their arrays
    assert (workdir / "comparison" / "index.html").is_file()
    assert (workdir / "report" / "report.json").is_file()  # the PR's report, to archive


def test_a_pull_request_with_the_same_model_passes(pipeline):
    workdir = _pull_request(pipeline, "pr-same")
    done = _ci(workdir, "base.keras")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((workdir / "comparison" / "compare.json").read_text())
    assert data["predictions"]["flips"] == 0 and data["failures"]["new"] == []
    (gradcam,) = data["similarity"]
    assert gradcam["mean_spearman"] == 1.0 and gradcam["compared"] == 2
    assert "flips: 0 of 2" in done.stdout


def test_a_run_that_exits_1_still_compares_and_fails_the_job(pipeline):
    workdir = _pull_request(pipeline, "pr-broken-image")
    (workdir / "images" / "zz-broken.png").write_bytes(b"not a png")
    done = _ci(workdir, "base.keras", FAIL_ON="")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "vizkit run exited 1: the report was written" in done.stderr
    assert json.loads((workdir / "comparison" / "compare.json").read_text())["predictions"]["flips"] == 0
    report = json.loads((workdir / "report" / "report.json").read_text())
    assert [image["status"] for image in report["images"]].count("error") == 1


def test_a_run_that_writes_no_report_passes_its_status_through(pipeline):
    workdir = _pull_request(pipeline, "pr-no-model")
    done = _ci(workdir, "missing.keras")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "vizkit run exited 2: no report was written, nothing to compare" in done.stderr
    assert not (workdir / "report").exists() and not (workdir / "comparison").exists()


def test_workflows_hand_the_work_to_the_script():
    """Text checks, no YAML parser (PyYAML is not a dependency): each workflow sets the
    settings the script reads, calls it, and keeps the report whatever the status."""
    script = SCRIPT.read_text()
    default = re.search(r'^FAIL_ON=\$\{FAIL_ON-(.*)\}$', script, re.M).group(1)
    for workflow in WORKFLOWS:
        text = workflow.read_text()
        assert "\t" not in text, f"{workflow.name}: YAML takes no tabs"
        settings = dict(re.findall(r"^  (MODEL|IMAGES|FAIL_ON|VIZKIT_CI): (.+?)\s*(?:#.*)?$", text, re.M))
        assert set(settings) == {"MODEL", "IMAGES", "FAIL_ON", "VIZKIT_CI"}, workflow.name
        assert settings["VIZKIT_CI"] == "examples/ci/vizkit-ci.sh"
        assert settings["FAIL_ON"] == f'"{default}"'  # the README's and the script's thresholds
        assert re.search(r'^\s+(?:- )?(?:run: )?bash "\$VIZKIT_CI"$', text, re.M), workflow.name
        assert "python -m pip install vizkit" in text
    github, gitlab = (w.read_text() for w in WORKFLOWS)
    assert github.count("if: ${{ !cancelled()") == 2 and github.count("actions/upload-artifact@v4") == 2
    assert "continue-on-error" not in github  # the script's status is the job's
    assert "cache: pip" in github
    assert re.search(r"^  artifacts:\n    when: always\b", gitlab, re.M)
    assert "- report/" in gitlab and "- comparison/" in gitlab


def test_workflows_are_valid_yaml():
    """With PyYAML where it is installed (not a dependency of vizkit), the structure."""
    yaml = pytest.importorskip("yaml")
    github, gitlab = (yaml.safe_load(w.read_text()) for w in WORKFLOWS)
    assert set(github[True]) == {"push", "pull_request"}  # YAML 1.1 reads the key `on` as True
    steps = github["jobs"]["vizkit"]["steps"]
    uploads = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert [s["with"]["path"] for s in uploads] == ["report/", "comparison/"]
    assert all("!cancelled()" in s["if"] for s in uploads)
    names = [s.get("name") for s in steps]
    assert names.index("Download the base report") < names.index("Run vizkit (and compare on pull requests)") < names.index("Upload the report")
    job = gitlab["vizkit"]
    assert job["artifacts"]["when"] == "always" and job["artifacts"]["paths"] == ["report/", "comparison/"]
    assert job["script"][-1] == 'bash "$VIZKIT_CI"'


def test_the_readme_shows_the_same_workflow():
    """README's `## CI` (before `## Plugins`) has the script's commands and the workflow's settings."""
    readme = (CI.parents[1] / "README.md").read_text()
    section = readme[readme.index("\n## CI\n") : readme.index("\n## Plugins\n")]
    assert "vizkit run \"$MODEL\" $IMAGES -t gradcam --save-arrays -o report" in section
    assert "vizkit run \"$MODEL\" \"${images[@]}\" -t gradcam --save-arrays -o \"$REPORT\"" in SCRIPT.read_text()
    github = WORKFLOWS[0].read_text()
    for line in ('FAIL_ON: "flips>0 gradcam.similarity<0.8"', "VIZKIT_CI: examples/ci/vizkit-ci.sh",
                 "--branch \"$BASE_BRANCH\" --event push --status success --limit 1", "if: ${{ !cancelled() }}"):
        assert line in section and line in github, line
