import argparse
import json

import pytest

from nerve import common


def test_parse_size():
    assert common.parse_size("96x128") == (96, 128)
    for bad, why in (("96", "is not HxW"), ("ax5", "is not HxW"), ("0x16", "must be positive")):
        with pytest.raises(common.UserError, match=f"^size '{bad}' {why}"):
            common.parse_size(bad)


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with common.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_turns_a_failed_write_into_one_message(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(common.UserError, match="could not write .*out.txt .*earlier out.txt is unchanged"):
        with common.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_shared_flags_take_a_scripts_own_default_and_help():
    parser = common.arg_parser("doc")
    common.add_flags(parser, "tta", "results", tta=dict(default="hflip"))
    args = parser.parse_args([])
    assert args.tta == "hflip" and args.results == common.RESULTS_DIR
    assert "(default: results)" in " ".join(parser.format_help().split())


def test_settings_of_older_releases_keep_their_meaning(tmp_path):
    model = {
        "size": [32, 48],
        "base_filters": 4,
        "depth": 2,
        "dropout": 0.3,
        "mean": 90.0,
        "std": 40.0,
        "val_ids": ["1_1"],
    }
    (tmp_path / common.SETTINGS_FILE).write_text(json.dumps({**model, "baseline": True, "presence_weight": 0.1}))
    old_baseline = common.read_settings(tmp_path)
    assert old_baseline["presence_weight"] == 0.0 and old_baseline["tta"] == "none"
    assert old_baseline["postprocess"] == "fixed" and old_baseline["schedule"] == "plateau"
    (tmp_path / common.SETTINGS_FILE).write_text(
        json.dumps({**model, "baseline": False, "schedule": "cosine", "presence_weight": 0.1})
    )
    old = common.read_settings(tmp_path)
    assert (old["tta"], old["postprocess"], old["schedule"], old["presence_weight"]) == (
        "hflip",
        "tuned",
        "cosine",
        0.1,
    )
    assert old["crops"] == 0.0  # trained on whole frames, as it was: a resumed run goes on without crop views


class FIELDS(common.StateFile):
    threshold: common.Fraction
    count: common.Count
    name: str
    size: common.Size = (1, 1)


def test_a_state_file_is_read_back_only_as_its_writer_wrote_it(tmp_path):
    path = tmp_path / "state.json"
    common.write_state(path, {"threshold": 0.5, "count": 3, "name": "a"})
    assert json.loads(path.read_text())["format"] == common.FORMAT
    assert common.read_state(path, FIELDS, "rebuild it") == {"threshold": 0.5, "count": 3, "name": "a"}
    path.write_text(json.dumps({"threshold": 0.5, "count": 3, "name": "a"}))  # release 1: no format key
    assert common.read_state(path, FIELDS, "rebuild it")["count"] == 3
    for content, problem in (
        ('{"threshold": 0.5', "is not valid JSON"),
        ("[1, 2]", "holds list"),
        (json.dumps({"format": 9, "threshold": 0.5, "count": 3, "name": "a"}), "has format 9"),
        (
            json.dumps({"threshold": "0.5", "count": 3}),
            "threshold is '0.5': expected a valid number; name is missing",
        ),
        (json.dumps({"threshold": 1.5, "count": True, "name": "a"}), "threshold is 1.5.*count is True"),
        ('{"threshold": NaN, "count": 3, "name": "a"}', "threshold is nan: expected a finite number"),
        (json.dumps({"threshold": 0.5, "count": 3, "name": "a", "size": [2, 0]}), "size.1 is 0"),
    ):
        path.write_text(content)
        with pytest.raises(common.UserError, match=f"{path}.*{problem}.*: rebuild it"):
            common.read_state(path, FIELDS, "rebuild it")
    with pytest.raises(common.UserError, match="not found: rebuild it"):
        common.read_state(tmp_path / "none.json", FIELDS, "rebuild it")


def test_an_output_folder_under_a_file_is_one_clear_message(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(common.UserError, match=f"cannot write into {tmp_path}/f/r/ \\({tmp_path}/f is a file\\)"):
        common.output_folder(tmp_path / "f" / "r", "--results")
    assert common.output_folder(tmp_path / "a" / "b", "--results").is_dir()


def test_a_held_folder_is_refused_to_a_second_holder(tmp_path):
    import subprocess
    import sys

    with common.exclusive(tmp_path):
        other = subprocess.run(
            [sys.executable, "-c", f"from nerve import common; common.exclusive({str(tmp_path)!r}).__enter__()"],
            capture_output=True,
            text=True,
            cwd=common.Path(__file__).parent.parent,
        )
        assert "is in use by pid" in other.stderr
    with common.exclusive(tmp_path):  # released: free again
        pass


def test_comma_choice_keeps_known_names_and_refuses_others():
    parse = common.comma_choice(("kaggle", "usgra"))
    assert parse("usgra") == ["usgra"] and parse("kaggle,usgra,") == ["kaggle", "usgra"]
    for bad in ("", ",", "kaggle,foo"):
        with pytest.raises(argparse.ArgumentTypeError, match="a comma-separated choice of kaggle, usgra"):
            parse(bad)


def test_an_earlier_releases_spelling_of_a_renamed_flag_works_with_a_one_line_note(capsys):
    parser = common.arg_parser("doc")
    common.add_flags(parser, "arrays")
    assert parser.parse_args(["--arrays", "a"]).arrays == common.Path("a") and capsys.readouterr().err == ""
    assert parser.parse_args(["--input", "b"]).arrays == common.Path("b")
    assert capsys.readouterr().err == "note: --input is now --arrays; --input works for this release\n"
    assert parser.parse_args([]).arrays == common.INPUT_DIR
