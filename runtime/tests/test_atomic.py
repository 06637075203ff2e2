"""Writers replace files atomically: killing one midway leaves the old file as it was."""

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from savpack_runtime import files

WRITER = textwrap.dedent(
    """
    import sys, time
    from savpack_runtime import files

    def slow(handle):
        for _ in range(1000):
            handle.write(b"new" * 1000)
            handle.flush()
            print("writing", flush=True)
            time.sleep(0.01)

    files.atomic_write(sys.argv[1], slow, force=True)
    """
)


@pytest.mark.slow
def test_killed_writer_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "pack.safetensors"
    old = files.dumps({"x": np.arange(10, dtype=np.float32)}, {"savpack.format": "savpack"})
    target.write_bytes(old)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    for _ in range(5):  # let it write a few chunks into its temporary file
        assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    assert target.read_bytes() == old
    tensors, _ = files.read(target)
    assert tensors["x"].tolist() == list(range(10))
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert all(name.startswith(".pack.safetensors.") and name.endswith(".tmp") for name in leftovers)


def test_failed_write_removes_its_temporary_file(tmp_path):
    target = tmp_path / "out.bin"

    def broken(handle):
        handle.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):  # the writer's own error, not swallowed
        files.atomic_write(target, broken)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_named_error(tmp_path):
    from savpack_runtime.errors import OutputPathError

    with pytest.raises(OutputPathError, match="folder /proc is not writable"):
        files.atomic_write("/proc/savpack-test.bin", lambda handle: handle.write(b"x"))
    file_as_folder = tmp_path / "file"
    file_as_folder.write_text("x")
    with pytest.raises(OutputPathError, match="does not exist"):
        files.atomic_write(file_as_folder / "out.bin", lambda handle: handle.write(b"x"))


def test_written_files_get_umask_permissions(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        path = files.atomic_write(tmp_path / "out.bin", lambda handle: handle.write(b"x"))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_staged_folder_appears_whole_or_not_at_all(tmp_path):
    import os

    from savpack_runtime.errors import OutputPathError

    target = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="midway"):
        with files.staged_folder(target, marker="a.bin") as work:
            (work / "half.bin").write_bytes(b"x")
            raise RuntimeError("midway")
    assert list(tmp_path.iterdir()) == []  # nothing at the target, no staging folder left behind

    previous = os.umask(0o022)
    try:
        with files.staged_folder(target, marker="a.bin") as work:
            (work / "a.bin").write_bytes(b"first")
    finally:
        os.umask(previous)
    assert [p.name for p in target.iterdir()] == ["a.bin"] and target.stat().st_mode & 0o777 == 0o755
    with pytest.raises(OutputPathError, match="exists; pass --force"):
        with files.staged_folder(target, marker="a.bin"):
            pass
    with pytest.raises(RuntimeError):
        with files.staged_folder(target, force=True, marker="a.bin") as work:
            raise RuntimeError("replacement fails")
    assert (target / "a.bin").read_bytes() == b"first"  # the old folder stays when its replacement fails
    with files.staged_folder(target, force=True, marker="a.bin") as work:
        (work / "b.bin").write_bytes(b"second")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"] and [p.name for p in target.iterdir()] == ["b.bin"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="exists and is not a folder"):
        with files.staged_folder(tmp_path / "file", force=True, marker="a.bin"):
            pass
    with pytest.raises(OutputPathError, match="holds no a.bin, so savpack did not write it"):
        with files.staged_folder(target, force=True, marker="a.bin"):  # b.bin replaced a.bin: not ours to replace
            pass
    assert [p.name for p in target.iterdir()] == ["b.bin"]
