"""Damaged, hand-edited or stale state files, odd output paths and concurrent runs, as a user meets them
after a crash, a copy between machines or an edit: each is one line without a traceback, and every other
file stays as it was."""

import importlib.util
import json
import shutil
import zipfile

import numpy as np
import pytest

from conftest import ROOT, TINY, run_main, run_script
from nerve import common


@pytest.fixture
def results(trained, tmp_path):
    """A copy of the tiny trained run, with the out-of-fold and ensemble files a K-fold run also has."""
    copy = tmp_path / "results"
    shutil.copytree(trained[0], copy)
    return copy


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}


def one_clear_line(result, *expected):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    for text in expected:
        assert text in line, line
    return line


def edit_json(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda r: (r / "settings.json").write_text('{"size": [32, '), ["settings.json is not valid JSON", "retrain"]),
        (lambda r: edit_json(r / "settings.json", lambda s: s.update(size="32x48")), ["size is '32x48'"]),
        (lambda r: edit_json(r / "settings.json", lambda s: s.update(format=99)), ["format 99"]),
        (
            lambda r: (r / "postprocess.json").write_text(json.dumps({"presence_threshold": "0.5"})),
            ["presence_threshold is '0.5': expected a valid number", "delete it to use the defaults"],
        ),
        (lambda r: (r / "postprocess.json").write_text("[0.5]"), ["postprocess.json holds list"]),
        (lambda r: (r / "ensemble.json").write_text(json.dumps({"models": ["fold7"]})), ["fold7", "delete it"]),
    ],
)
def test_a_damaged_file_stops_submission_with_one_line_and_touches_nothing(results, tiny_input, damage, expected):
    damage(results)
    before = snapshot(results)
    one_clear_line(run_main("submission", "--input", tiny_input, "--results", results), *expected)
    assert snapshot(results) == before


def test_damaged_out_of_fold_predictions_are_one_line(results, tiny_input):
    oof = results / common.OOF_FILE
    oof.unlink()
    one_clear_line(run_main("evaluate", "--data", tiny_input, "--results", results), "oof.npz not found")
    np.savez(oof, probs=np.zeros((3, 2, 2)))
    one_clear_line(run_main("evaluate", "--data", tiny_input, "--results", results), "missing: probs_flip")
    with zipfile.ZipFile(oof, "w") as z:
        z.writestr("probs.npy", b"not an array")
    one_clear_line(run_main("evaluate", "--data", tiny_input, "--results", results), "does not hold")
    oof.write_bytes(b"PK\x03\x04 truncated")
    one_clear_line(run_main("evaluate", "--data", tiny_input, "--results", results), "cannot be read")


def test_a_damaged_run_record_or_resume_state_is_one_line_before_resume(results):
    run = results / common.RUN_FILE
    edit_json(run, lambda r: r.update(complete=False))
    state = {
        "run": json.loads(run.read_text())["settings"]["run"],
        "epoch": 1,
        "best": 0.5,
        "plateau": None,
        "random": [[0, 0]],
    }
    (results / common.STATE_FILE).write_text(json.dumps({**state, "epoch": "one"}))
    before = snapshot(results)
    one_clear_line(run_main("train", "--results", results, "--resume"), "epoch is 'one'", "afresh")
    edit_json(run, lambda r: r.pop("complete"))
    one_clear_line(run_main("train", "--results", results, "--resume"), "complete is missing", "--force")
    edit_json(run, lambda r: r.update(complete=False, settings={**r["settings"], "epochs": "ten"}))
    one_clear_line(run_main("train", "--results", results, "--resume"), "wrong kind for epochs")
    run.write_text("{")
    one_clear_line(run_main("train", "--results", results, "--resume"), "run.json is not valid JSON")
    assert snapshot(results) == {**before, run: b"{"}


def test_a_damaged_arrays_manifest_is_one_line_and_data_py_rebuilds_it(tiny_input, tmp_path):
    arrays = tmp_path / "input"
    shutil.copytree(tiny_input, arrays)
    (arrays / common.MANIFEST).write_text("not json")
    one_clear_line(
        run_main("train", "--input", arrays, "--results", tmp_path / "r", *TINY, "--logs", tmp_path / "logs"),
        "arrays.json is not valid JSON",
        f"data.py --dataset {arrays} --force",
    )
    assert not (tmp_path / "r" / common.RUN_FILE).exists()
    rebuilt = run_main("data", "--input", arrays)
    assert rebuilt.returncode == 0 and "wrote 48 train pairs" in rebuilt.stdout
    assert json.loads((arrays / common.MANIFEST).read_text())["train"] == 48


def test_an_output_path_under_a_file_is_one_line_from_every_script(results, tiny_input, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for script, flags in (
        ("submission", ["--results", results, "--output", blocker / "s.csv"]),
        ("train", ["--results", blocker / "r", "--logs", tmp_path / "logs", *TINY]),
        ("evaluate", ["--results", blocker / "r"]),
        ("duplicates", ["--results", blocker / "r"]),
    ):
        result = run_main(script, "--input", tiny_input, *flags)
        one_clear_line(result, f"{blocker} is a file", "choose another")


def test_the_atomic_writer_reports_the_real_error_when_its_folder_cannot_be_made(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(common.UserError, match="could not write .*a-file/out.json .*nothing was written"):
        common.write_json(tmp_path / "a-file" / "out.json", {})


def test_an_unknown_keras_backend_is_one_line_naming_the_installed_ones():
    cases = [("tensorflw", "is not a Keras backend")]
    if importlib.util.find_spec("torch") is None:
        cases.append(("torch", "is not installed here"))
    for backend, says in cases:
        result = run_script(ROOT / "train.py", env={"KERAS_BACKEND": backend})
        one_clear_line(result, f"KERAS_BACKEND={backend} {says}", "installed: tensorflow")


def test_a_second_process_on_the_same_results_is_refused(results, tiny_input):
    before = snapshot(results)
    with common.exclusive(results):
        second = run_script(ROOT / "submission.py", "--input", tiny_input, "--results", results)
        one_clear_line(second, f"{results}/ is in use by pid", "wait for it to finish")
        again = run_script(
            ROOT / "train.py",
            "--input",
            tiny_input,
            "--results",
            results,
            "--force",
            *TINY,
            "--logs",
            results.parent / "logs",
        )
        one_clear_line(again, "is in use by")
    assert snapshot(results) == before
    assert run_script(ROOT / "submission.py", "--input", tiny_input, "--results", results).returncode == 0
