"""Issue 14, items F and G: damaged checkpoints are named and refused (a SHA-256 over the saved
bytes catches what torch.load does not); a save killed with SIGKILL at any moment leaves the last
good checkpoint, and `omniattn recsys train --resume` continues from it."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from omniattn import cli
from omniattn.recsys import TrainConfig, Trainer, load
from omniattn.recsys.train import CheckpointError, load_checkpoint, partial_path

# The CLI flags that build the same model as TRAIN_CONFIG, so the CLI can resume its checkpoints.
# dim 128 makes the checkpoint ~5 MB with Adam's state: a save takes long enough for kills to land in it.
# One thread: on a shared 2-core machine it keeps the one training epoch below (the resume) quick.
CLI_MODEL = ["--dataset", "synthetic", "--model", "hstu", "--dim", "128", "--max-len", "32", "--batch-size", "128",
             "--negatives", "32", "--no-progress", "--threads", "1"]
TRAIN_CONFIG = dict(model="hstu", dim=128, max_len=32, batch_size=128, negatives=32)


@pytest.fixture(scope="module")
def trainer():
    t = Trainer(TrainConfig(**TRAIN_CONFIG), load("synthetic"), "synthetic")
    seqs, times = next(t._batches())
    t.train_step(seqs, times)  # one step: Adam's moments exist and are saved too
    return t


@pytest.fixture
def good(tmp_path, trainer):
    path = str(tmp_path / "good.pt")
    trainer.save(path)
    return path


def _damaged(good: str, tmp_path, how: str) -> str:
    data = open(good, "rb").read()
    bad = {
        "empty": b"",
        "truncated": data[: len(data) // 3],
        "text": b"epoch 3 loss 4.2\nthis is a log file, not a checkpoint\n",
        "flipped": data[:4096] + bytes(b ^ 0x5A for b in data[4096:4160]) + data[4160:],  # 64 bytes in the payload
    }[how]
    path = tmp_path / f"{how}.pt"
    path.write_bytes(bad)
    return str(path)


EXPECTED = {"empty": "empty file", "truncated": "truncated", "text": "found text starting 'epoch 3 loss 4.2'",
            "flipped": "corrupted checkpoint: the SHA-256"}


@pytest.mark.parametrize("how", list(EXPECTED))
def test_damaged_checkpoint_is_refused_by_name(good, tmp_path, capsys, how):
    bad = _damaged(good, tmp_path, how)
    with pytest.raises(CheckpointError, match=EXPECTED[how]):
        load_checkpoint(bad)
    for argv in (["recsys", "eval", "--checkpoint", bad],
                 ["recsys", "train", *CLI_MODEL, "--epochs", "1", "--checkpoint", bad, "--resume"]):
        assert cli.main(argv) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "Traceback" not in captured.err and "\n" not in err, captured.err
        assert err.startswith(f"omniattn: error: {bad}: ") and EXPECTED[how] in err, err


def test_a_checkpoint_of_another_model_says_which_settings_fit(good, capsys):
    assert cli.main(["recsys", "train", *CLI_MODEL, "--dim", "64", "--checkpoint", good, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{good}: does not fit this model" in err and "--dim 128" in err, err


def test_save_replaces_atomically_and_leaves_no_partial_file(good, trainer):
    before = os.stat(good).st_ino
    trainer.save(good)
    assert os.stat(good).st_ino != before  # a new file renamed over the old one, not rewritten in place
    assert not os.path.exists(partial_path(good))
    assert load_checkpoint(good)["num_items"] == trainer.data.num_items


def _save_until_killed(trainer, path: str) -> None:
    """The child: save over and over (never returns; SIGKILL ends it)."""
    try:
        while True:
            trainer.save(path)
    finally:
        os._exit(1)


def test_kill_9_during_save_keeps_the_last_good_checkpoint_and_resume_works(good, trainer, capsys):
    rng = random.Random(14)
    killed_mid_save = 0
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            _save_until_killed(trainer, good)
        time.sleep(rng.uniform(0.005, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        killed_mid_save += os.path.exists(partial_path(good))  # the kill interrupted a write
        ckpt = load_checkpoint(good)  # always the last complete save, verified by its checksum
        assert ckpt["num_items"] == trainer.data.num_items and ckpt["state"]["epoch"] == 0
    assert killed_mid_save >= 3, f"only {killed_mid_save} of 20 kills landed during a write: the test proves little"
    assert cli.main(["recsys", "train", *CLI_MODEL, "--epochs", "1", "--checkpoint", good, "--resume"]) == 0
    assert "epoch 1/1" in capsys.readouterr().out
    assert load_checkpoint(good)["state"]["epoch"] == 1 and not os.path.exists(partial_path(good))


def test_a_leftover_partial_file_is_harmless(good, capsys):
    """A kill during a save can leave a .partial file: the real command still reads the checkpoint,
    and the partial file itself is refused by name (in one line, exit code 2)."""
    with open(partial_path(good), "wb") as f:
        f.write(b"omniattn-checkpoint 1 sha256=")
    done = subprocess.run([sys.executable, "-m", "omniattn.cli", "recsys", "eval", "--checkpoint", good, "--split",
                           "valid", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "hstu" in done.stdout, done.stderr
    assert cli.main(["recsys", "eval", "--checkpoint", partial_path(good)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("truncated checkpoint: 29 bytes, the header is cut off") and "Traceback" not in err
