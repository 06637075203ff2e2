"""Writers replace files atomically: killing one midway leaves the old file as it was."""

import signal
import subprocess
import sys
import textwrap

import numpy as np

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

    try:
        files.atomic_write(target, broken)
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_named_error(tmp_path):
    import pytest

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


def test_staging_folders_get_umask_permissions(tmp_path):
    """Bundles and converted models are assembled in a staging folder renamed into place: it must not stay 0700."""
    import os

    previous = os.umask(0o022)
    try:
        folder = files.staging_folder(tmp_path / "bundle")
    finally:
        os.umask(previous)
    assert folder.parent == tmp_path and folder.name.startswith(".bundle.") and folder.stat().st_mode & 0o777 == 0o755
