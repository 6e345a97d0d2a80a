import os
import pickle

import pytest
import torch

from prn.checkpoint import load_checkpoint, save_checkpoint
from prn.errors import CheckpointError


def _save(path, **kw):
    args = dict(model="prn", config={"a": 1}, state_dict={"w": torch.arange(4.0)})
    args.update(kw)
    return save_checkpoint(path, **args)


def test_checkpoint_round_trips_tensors_and_plain_data(tmp_path):
    _save(tmp_path / "c.pt", epoch=3, history=[{"loss": 0.5}])
    payload = load_checkpoint(tmp_path / "c.pt", expect_model="prn")
    assert torch.equal(payload["state_dict"]["w"], torch.arange(4.0))
    assert payload["epoch"] == 3 and payload["history"] == [{"loss": 0.5}]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_checkpoint_with_pickled_code_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    payload = {"format": "prn-checkpoint", "format_version": 1, "model": "prn", "config": {},
               "state_dict": {}, "trap": _Exploit()}
    torch.save(payload, evil)  # torch.save pickles the object with its __reduce__
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    # The same file really would run code if unpickled without weights_only: the test can fail.
    with open(evil, "rb") as fh:
        torch.load(fh, weights_only=False)
    assert (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_plain_pickle_files_are_refused(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps({"format": "prn-checkpoint"}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_checkpoint_of_another_format_version_fails_clearly(tmp_path):
    torch.save({"format": "prn-checkpoint", "format_version": 99, "prn_version": "9.9"}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "v.pt")


def test_checkpoint_of_another_model_kind_fails_clearly(tmp_path):
    _save(tmp_path / "c.pt", model="patchcore")
    with pytest.raises(CheckpointError, match="patchcore"):
        load_checkpoint(tmp_path / "c.pt", expect_model="prn")


def test_truncated_checkpoint_fails_clearly(tmp_path):
    _save(tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.pt"):
        load_checkpoint(tmp_path / "t.pt")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = _save(tmp_path / "c.pt", epoch=1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        _save(path, epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
