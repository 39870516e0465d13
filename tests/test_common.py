import argparse
import json

import pytest

import common


def test_parse_size():
    assert common.parse_size("96x128") == (96, 128)
    for bad in ("96", "ax5", "0x16"):
        with pytest.raises(common.UserError):
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


def test_given_flags_counts_a_flag_given_with_its_default_value():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--force", action="store_true")
    assert common.given_flags(parser, ["--epochs", "30", "--force"]) == {"epochs", "force"}
    assert common.given_flags(parser, []) == set()


def test_shared_flags_take_a_scripts_own_default_and_help():
    parser = common.arg_parser("doc")
    common.add_flags(parser, "tta", "results", tta=dict(default="hflip"))
    args = parser.parse_args([])
    assert args.tta == "hflip" and args.results == common.RESULTS_DIR
    assert "(default: results)" in " ".join(parser.format_help().split())


def test_run_record_is_json_and_leaves_out_what_is_asked(tmp_path):
    args = argparse.Namespace(size=(96, 128), input=tmp_path, resume=True, lr=0.001)
    record = common.run_record(args, {"resume"}, backend="jax")
    assert record == {"size": [96, 128], "input": str(tmp_path), "lr": 0.001, "backend": "jax"}
    assert json.loads(json.dumps(record)) == record


def test_settings_of_older_releases_keep_their_meaning(tmp_path):
    (tmp_path / common.SETTINGS_FILE).write_text(json.dumps({"baseline": True, "presence_weight": 0.1}))
    old_baseline = common.read_settings(tmp_path)
    assert old_baseline["presence_weight"] == 0.0 and old_baseline["tta"] == "none"
    assert old_baseline["postprocess"] == "fixed" and old_baseline["schedule"] == "plateau"
    (tmp_path / common.SETTINGS_FILE).write_text(json.dumps({"baseline": False, "schedule": "cosine"}))
    assert common.read_settings(tmp_path) == {
        "baseline": False,
        "schedule": "cosine",
        "tta": "hflip",
        "postprocess": "tuned",
    }
