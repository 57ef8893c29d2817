"""Atomic writes (surge_nlp.atomic): a failed or killed writer never leaves a half target that looks whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from surge_nlp.atomic import atomic_write, commit, temporary_sibling, write_json_atomically, write_text_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomically(path, {"accuracy": 0.5})
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_write(path) as temporary:
            temporary.write_text('{"accuracy": 0.')  # half written
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_directory_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "student"
    with atomic_write(target) as temporary:
        temporary.mkdir()
        (temporary / "old.bin").write_text("old")
    with atomic_write(target) as temporary:
        temporary.mkdir()
        (temporary / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # no file of the old folder survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_temporaries_are_hidden_keep_the_suffix_and_are_unique_unless_asked(tmp_path):
    first, second = temporary_sibling(tmp_path / "loss.png"), temporary_sibling(tmp_path / "loss.png")
    assert first != second and first.name.startswith(".loss.png.") and first.suffix == ".png"
    fixed = temporary_sibling(tmp_path / "step_10", unique=False)
    assert fixed == temporary_sibling(tmp_path / "step_10", unique=False) == tmp_path / ".step_10.tmp"


def test_text_keeps_newlines_as_given_and_the_file_mode_follows_the_umask(tmp_path):
    path = write_text_atomically(tmp_path / "RTE.tsv", "index\tprediction\r\n0\tentailment\n")
    assert path.read_bytes() == b"index\tprediction\r\n0\tentailment\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_killed_writer_leaves_the_old_target(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomically(path, {"step": 1})
    script = (f"import os, pathlib\nfrom surge_nlp.atomic import atomic_write\n"
              f"with atomic_write(pathlib.Path({str(path)!r})) as t:\n"
              f"    t.write_text('half')\n    os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert json.loads(path.read_text()) == {"step": 1}  # the temporary is left, hidden; the target is whole
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p != path)


def test_commit_of_a_file_over_a_file(tmp_path):
    temporary, path = tmp_path / ".a.tmp", tmp_path / "a"
    path.write_text("old")
    temporary.write_text("new")
    commit(temporary, path)
    assert path.read_text() == "new" and not temporary.exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names file descriptors through Linux's /proc")
def test_the_data_reaches_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    # Atomic is not durable without fsync: after a power loss the renamed name could hold empty files.
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    target = tmp_path / "student"
    with atomic_write(target) as temporary:
        (temporary / "nested").mkdir(parents=True)
        (temporary / "config.json").write_text("{}")
        (temporary / "nested" / "model.safetensors").write_bytes(b"\0" * 8)
    first_replace = events.index(("replace", str(target)))
    synced_before = {os.path.relpath(path, temporary) for kind, path in events[:first_replace] if kind == "fsync"}
    assert synced_before == {".", "config.json", "nested", os.path.join("nested", "model.safetensors")}
    assert events[-1] == ("fsync", str(tmp_path))  # the parent's entry for the new name
    events.clear()
    write_json_atomically(tmp_path / "results.json", {"accuracy": 0.5})
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"] and events[-1][1] == str(tmp_path)


def test_a_filesystem_that_cannot_flush_a_folder_still_gets_the_write(tmp_path, monkeypatch):
    # Some network and FUSE mounts answer fsync on a directory with EINVAL; the rename is done by then.
    import errno

    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names file descriptors through Linux's /proc")
    monkeypatch.setattr(os, "fsync", fsync)
    write_json_atomically(tmp_path / "results.json", {"accuracy": 0.5})
    assert json.loads((tmp_path / "results.json").read_text()) == {"accuracy": 0.5}
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):  # a real failure to write is not hidden
        write_json_atomically(tmp_path / "results.json", {"accuracy": 0.6})
    assert json.loads((tmp_path / "results.json").read_text()) == {"accuracy": 0.5}
