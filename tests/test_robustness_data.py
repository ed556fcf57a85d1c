"""Issue 14, item E: malformed recommendation data files end in one line, `path:line: expected ...,
found ...`, and exit code 2 -- tested through the CLI."""

import io
import re
import subprocess
import sys
import zipfile

import pytest

from omniattn import cli
from omniattn.recsys import data as data_mod
from omniattn.recsys.data import ML100K_MEMBER, DataError, find_recbole_wheel, load

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"

# (dataset kind, file name, contents, line named in the message, words the message must hold)
CASES = [
    ("ml-1m", "ratings.dat", "1::10::5::978300760\n1::11::3\n", 2, ["4 '::'-separated fields", "found 3"]),
    ("ml-1m", "ratings.dat", "1::10::5::978300760\n1::11::3::yesterday\n", 2, ["integer Timestamp", "'yesterday'"]),
    ("ml-1m", "ratings.dat", "1,10,5,978300760\n", 1, ["'::'-separated", "separated by commas?"]),
    ("ml-1m", "ratings.dat", "", 1, ["found an empty file"]),
    ("ml-20m", "ratings.csv", "userId\tmovieId\trating\ttimestamp\n1\t2\t3\t4\n", 1, ["comma-separated header",
                                                                                    "separated by tabs?"]),
    ("ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,10\n1,3,4.0,1.5e9x\n", 3,
     ["integer timestamp", "'1.5e9x'"]),
    ("ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n1,2\n", 2, ["4 comma-separated fields"]),
    ("ml-20m", "ratings.csv", "\n\n", 1, ["found an empty file"]),
    ("ml-100k", "ml-100k.inter", INTER_HEADER + "1\t2\t3\n", 2, ["4 tab-separated fields", "found 3"]),
    ("ml-100k", "ml-100k.inter", INTER_HEADER + "1\t2\t3\tnoon\n", 2, ["a number timestamp", "'noon'"]),
    ("ml-100k", "ml-100k.inter", INTER_HEADER.replace("\t", ",") + "1,2,3,4\n", 1, ["tab-separated header",
                                                                                   "separated by commas?"]),
    ("ml-100k", "ml-100k.inter", INTER_HEADER + "1,2,3,4\n", 2, ["tab-separated fields", "separated by commas?"]),
    ("ml-100k", "ml-100k.inter", "", 1, ["found an empty file"]),
]


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and "\n" not in err, captured.err
    assert err.startswith("omniattn: error: "), err
    return err.removeprefix("omniattn: error: ")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[4][0]}")
def test_malformed_file_names_path_and_line(tmp_path, capsys, case):
    kind, name, text, line, words = case
    path = tmp_path / name
    path.write_text(text)
    code = cli.main(["recsys", "train", "--dataset", f"{kind}:{path}", "--epochs", "1", "--no-progress"])
    assert code == 2
    msg = _one_line_error(capsys)
    assert re.match(rf"{re.escape(str(path))}:{line}: expected .+, found .+", msg), msg
    for w in words:
        assert w in msg, msg


def test_malformed_inter_inside_the_wheel_names_the_member(tmp_path):
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(ML100K_MEMBER, INTER_HEADER + "1\t2\t3\t4\n1\tx\t3\t5\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(wheel))}\[{ML100K_MEMBER}\]:3: expected an integer item_id"):
        load(f"ml-100k:{wheel}")
    wheel.write_text("not a zip")
    with pytest.raises(DataError, match="expected the recbole wheel"):
        load(f"ml-100k:{wheel}")


def test_missing_and_unknown_datasets_are_one_line(tmp_path, capsys):
    for spec, words in ((f"ml-1m:{tmp_path / 'none'}", "no such file"), ("netflix", "expected synthetic"),
                        ("ml-20m", "ml-20m:PATH"), (f"ml-100k:{tmp_path / 'none'}", "no such file or folder")):
        assert cli.main(["recsys", "train", "--dataset", spec, "--no-progress"]) == 2
        assert words in _one_line_error(capsys)


def test_the_command_exits_2_without_a_traceback(tmp_path):
    """The real process: exit status 2 and one line on stderr."""
    bad = tmp_path / "ratings.dat"
    bad.write_text("1::10::5::978300760\n2::11\n")
    done = subprocess.run([sys.executable, "-m", "omniattn.cli", "recsys", "train", "--dataset", f"ml-1m:{bad}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"omniattn: error: {bad}:2: expected 4 '::'-separated fields (UserID, MovieID, "
                                   "Rating, Timestamp), found 2: '2::11'")


def test_download_says_what_it_fetches_before_fetching(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    log, seen = io.StringIO(), []

    def fake_pip(cmd, **kw):
        seen.append(log.getvalue())  # what the user had been told when pip started
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(data_mod.subprocess, "run", fake_pip)
    with pytest.raises(DataError, match="pip download recbole==1.2.1 failed .* --dataset ml-100k:DIR"):
        find_recbole_wheel(None, log=log)
    assert seen and "recbole==1.2.1" in seen[0] and "2.1 MB" in seen[0] and str(tmp_path) in seen[0]
