"""`vizkit compare BASE NEW`: two real reports of two tiny models that differ in a known way
(NEW's Dense bias of one class raised, so every image's top-1 flips to it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import build_tiny, raise_a_class, write_image
from vizkit import ExitCode
from vizkit.cli import main
from vizkit.compare import CompareError, check, parse_condition

ODD_NAME = 'a<script>&"x.png'


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, obj={"plugins": []})
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """base (arrays), new (arrays; raised bias; one more image), base_bare (no arrays)."""
    root = tmp_path_factory.mktemp("compare")
    base_images, new_images = root / "base-images", root / "new-images"
    base_images.mkdir()
    new_images.mkdir()
    for folder in (base_images, new_images):  # the same files at other paths: matched by sha256
        write_image(folder / "one.png", seed=1)
        write_image(folder / ODD_NAME, seed=2)
    write_image(new_images / "extra.png", seed=3)

    model = build_tiny()
    model.save(root / "base.keras")
    common = ["-t", "gradcam", "--no-metrics", "--save-arrays", "-q"]
    _run("run", root / "base.keras", base_images, "-o", root / "base", *common)
    flips = raise_a_class(model, root / "base")
    model.save(root / "new.keras")
    _run("run", root / "new.keras", new_images, "-o", root / "new", *common)

    shutil.copytree(root / "base", root / "base_bare")
    (root / "base_bare" / "arrays.npz").unlink()
    return {"root": root, "base": root / "base", "new": root / "new", "base_bare": root / "base_bare",
            "flips": flips}


def _compare(vizkit_cli, reports, tmp_path, base, new, *extra, out="out", env=None):
    result = vizkit_cli("compare", reports[base], reports[new], "-o", tmp_path / out, *extra, env=env)
    folder = tmp_path / out
    data = json.loads((folder / "compare.json").read_text()) if (folder / "compare.json").exists() else None
    return result, data, folder


def test_flips_fail_the_condition_and_are_listed_first(vizkit_cli, reports, tmp_path):
    result, data, folder = _compare(vizkit_cli, reports, tmp_path, "base", "new", "--fail-on", "flips>0")
    assert result.exit_code == ExitCode.FAILURES, result.output
    assert "--fail-on flips>0" in result.output
    assert reports["flips"] >= 1
    predictions = data["predictions"]
    assert predictions["compared"] == 2 and predictions["flips"] == reports["flips"]
    flags = [row["flipped"] for row in predictions["images"]]
    assert flags == sorted(flags, reverse=True)  # flips first
    assert all(row["score_change"] < 0 for row in predictions["images"] if row["flipped"])
    assert [e["path"].rsplit("/", 1)[-1] for e in data["images"]["only_in_new"]] == ["extra.png"]
    assert data["images"]["only_in_base"] == []
    assert {row["what"] for row in data["differences"]} >= {"model sha256"}
    (gradcam,) = data["similarity"]
    assert gradcam["technique"] == "gradcam" and gradcam["compared"] == 2
    assert gradcam["mean_spearman"] < 0.99
    assert data["failures"] == {"new": [], "fixed": [], "still": []}
    page = (folder / "index.html").read_text()
    assert "flipped" in page and "the maps that moved most" in page
    assert page.count("data:image/png;base64,") == 6  # base | new | difference for both images


def test_flips_without_a_condition_exit_0(vizkit_cli, reports, tmp_path):
    result, data, _ = _compare(vizkit_cli, reports, tmp_path, "base", "new", "--fail-on", f"flips>{reports['flips']}")
    assert result.exit_code == ExitCode.OK, result.output
    result, _, _ = _compare(vizkit_cli, reports, tmp_path, "base", "new", out="plain")
    assert result.exit_code == ExitCode.OK, result.output
    assert f"flips: {reports['flips']} of 2" in result.output


def test_a_report_is_similar_to_itself(vizkit_cli, reports, tmp_path):
    conditions = ["--fail-on", "flips>0", "--fail-on", "failures>0", "--fail-on", "similarity<0.999",
                  "--fail-on", "gradcam.similarity<0.999"]
    result, data, _ = _compare(vizkit_cli, reports, tmp_path, "base", "base", *conditions)
    assert result.exit_code == ExitCode.OK, result.output
    (gradcam,) = data["similarity"]
    assert gradcam["mean_spearman"] == 1.0 and gradcam["mean_ssim"] == 1.0 and gradcam["compared"] == 2
    assert data["predictions"]["flips"] == 0 and data["differences"] == [] and data["notes"] == []


def test_missing_arrays_are_reported_not_a_crash(vizkit_cli, reports, tmp_path):
    result, data, folder = _compare(vizkit_cli, reports, tmp_path, "base_bare", "new")
    assert result.exit_code == ExitCode.OK, result.output
    (note,) = data["notes"]
    assert "no arrays.npz" in note and "--save-arrays" in note
    assert data["similarity"][0]["mean_spearman"] is None
    assert data["predictions"]["flips"] == reports["flips"]  # the rest is still compared
    assert {"what": "arrays saved", "base": False, "new": True} in data["differences"]
    assert "no arrays.npz" in (folder / "index.html").read_text()
    # A similarity threshold cannot pass silently without maps.
    result, _, _ = _compare(vizkit_cli, reports, tmp_path, "base_bare", "new", "--fail-on", "similarity<0.5", out="strict")
    assert result.exit_code == ExitCode.FAILURES, result.output
    assert "no maps to compare" in result.output


@pytest.mark.parametrize("expression", ["flips<3", "gradcam.flips>0", "similarity>0.5", "flops>1", "flips>1.5", "flips>", ""])
def test_bad_grammar_is_a_usage_error(vizkit_cli, reports, tmp_path, expression):
    result, data, _ = _compare(vizkit_cli, reports, tmp_path, "base", "new", "--fail-on", expression)
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "flips>N" in result.output and "TECHNIQUE.similarity<X" in result.output
    assert data is None  # nothing written


def test_unreadable_reports_are_usage_errors(vizkit_cli, reports, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "report.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    for base, fix in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "has no report.json"),
                      (tmp_path / "junk", "is not JSON"), (tmp_path / "other.json", "is not a vizkit report.json")]:
        result = vizkit_cli("compare", base, reports["new"], "-o", tmp_path / "out")
        assert result.exit_code == ExitCode.USAGE_ERROR, result.output
        assert fix in result.output and "vizkit run" in result.output
    assert not (tmp_path / "out").exists()


def test_report_json_paths_and_names_are_escaped(vizkit_cli, reports, tmp_path):
    result = vizkit_cli("compare", reports["base"] / "report.json", reports["new"] / "report.json", "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.OK, result.output
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<script" not in page
    assert "a&lt;script&gt;&amp;&#34;x.png" in page
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert any(row["path"].endswith(ODD_NAME) for row in data["predictions"]["images"])


def test_byte_identical_under_source_date_epoch(vizkit_cli, reports, tmp_path, monkeypatch):
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    first = _compare(vizkit_cli, reports, tmp_path, "base", "new", "--fail-on", "flips>0", out="one", env=env)[2]
    second = _compare(vizkit_cli, reports, tmp_path, "base", "new", "--fail-on", "flips>0", out="two", env=env)[2]
    for name in ("index.html", "compare.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert json.loads((first / "compare.json").read_text())["created"] == "2023-11-14T22:13:20+00:00"
    # The default folder is named after that time; a rerun into a comparison folder replaces it.
    monkeypatch.chdir(tmp_path)
    result = vizkit_cli("compare", reports["base"], reports["new"], "-q", env=env)
    assert result.exit_code == ExitCode.OK, result.output
    assert (tmp_path / "reports" / "compare-20231114-221320" / "index.html").is_file()
    again = vizkit_cli("compare", reports["base"], reports["new"], "-o", first, env=env)
    assert again.exit_code == ExitCode.OK, again.output


def test_compare_does_not_load_tensorflow(reports):
    code = (
        "import sys\n"
        "from vizkit.cli import main\n"
        f"try: main(['compare', {str(reports['base'])!r}, {str(reports['new'])!r}, '-o', {str(reports['root'] / 'tf-free')!r}, '-q'])\n"
        "except SystemExit as e: assert e.code == 0, e.code\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')], 'TensorFlow loaded'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_conditions_on_plain_data():
    data = {"predictions": {"flips": 2}, "failures": {"new": ["technique x failed"]}, "notes": [],
            "similarity": [{"technique": "gradcam", "mean_spearman": 0.5}, {"technique": "saliency", "mean_spearman": 0.95}]}
    held = lambda *texts: check(data, [parse_condition(t) for t in texts])  # noqa: E731
    assert held("flips>1", "flips>=2", "failures>0") == ["flips>1: 2 top-1 flip(s)", "flips>=2: 2 top-1 flip(s)", "failures>0: 1 new failure(s)"]
    assert held("flips>2", "failures>1", "saliency.similarity<0.9", "similarity<0.4") == []
    assert held("similarity<0.9") == ["similarity<0.9: gradcam mean Spearman 0.500"]
    assert held("occlusion.similarity<0.9")[0].startswith("occlusion.similarity<0.9: no maps to compare")
    assert parse_condition(" gradcam.similarity < .8 ").technique == "gradcam"
    with pytest.raises(CompareError):
        parse_condition("failures<1")


def test_new_failures_fail_the_condition_and_fixed_ones_do_not(vizkit_cli, reports, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(reports["new"], broken)
    data = json.loads((broken / "report.json").read_text())
    (gradcam,) = data["techniques"]
    first = data["images"][0]
    gradcam["status"] = "partial"
    gradcam["image_errors"] = [{"image_id": first["id"], "error": "boom", "traceback": None}]
    (broken / "report.json").write_text(json.dumps(data))
    result = vizkit_cli("compare", reports["base"], broken, "-o", tmp_path / "worse", "--fail-on", "failures>0")
    assert result.exit_code == ExitCode.FAILURES, result.output
    failures = json.loads((tmp_path / "worse" / "compare.json").read_text())["failures"]
    assert failures["new"] == [f"technique gradcam failed on image {first['path']}"] and failures["fixed"] == []
    result = vizkit_cli("compare", broken, reports["new"], "-o", tmp_path / "better", "--fail-on", "failures>0")
    assert result.exit_code == ExitCode.OK, result.output
    failures = json.loads((tmp_path / "better" / "compare.json").read_text())["failures"]
    assert failures["new"] == [] and len(failures["fixed"]) == 1
