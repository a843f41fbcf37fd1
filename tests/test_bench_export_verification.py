"""nearl_rt.bench.export_verification: a correct export is kept, the wrong one refused; figures in the JSON."""
import json

from nearl_rt.bench import export_verification as ev
from nearl_rt.core.cli import run_cli


def test_one_run_keeps_the_correct_file_and_catches_the_wrong_one(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert run_cli(ev.main, ["--presets", "tiny", "--modes", "text_cacheable", "--seeds", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["runs"] == 1 and doc["summary"]["correct_refused"] == 0
    assert doc["summary"]["wrong_caught"] == {"0.01": 1, "0.1": 1}
    run = doc["runs"][0]["correct"]
    assert run["rms_error"]["onnxruntime"] <= run["bound"]["rms"] and run["images"] == 8
    assert "1 correct exports: 0 refused; wrong files caught: 1 of 1 at 0.01, 1 of 1 at 0.1" in capsys.readouterr().out


def test_bad_options_are_one_line(tmp_path, capsys):
    assert run_cli(ev.main, ["--seeds", "0"], prog="x") == 2
    assert run_cli(ev.main, ["--out", str(tmp_path / "no" / "v.json")], prog="x") == 2
    assert run_cli(ev.main, ["--bumps", "0.01,big"], prog="x") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "--seeds 0" in err[0] and "does not exist" in err[1] and "comma-separated" in err[2]
