"""The one check of every path savpack reads or writes: file types, size bounds, inputs never overwritten."""

from __future__ import annotations

import os
import re

import pytest

from savpack_runtime import files
from savpack_runtime.errors import BundleError, InputError, OutputPathError, PackReadError


@pytest.fixture
def odd(tmp_path):
    """A FIFO, a symbolic link loop, a broken link, a folder, a regular file and a link to it."""
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    os.symlink(tmp_path / "nothing", tmp_path / "broken")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"12345")
    os.symlink(tmp_path / "file", tmp_path / "link")
    return tmp_path


@pytest.mark.parametrize("name, message", [
    ("fifo", "is a FIFO (named pipe), not a regular file"),
    ("loop-a", "is a symbolic link loop"),
    ("broken", "is a symbolic link to nothing"),
    ("folder", "is a folder, expected a file"),
    ("missing", "does not exist"),
])
def test_check_file_names_what_the_path_is_without_opening_it(odd, name, message):
    with pytest.raises(InputError, match=re.escape(message)):
        files.check_file(odd / name)  # a FIFO opened for reading would block this test forever


def test_devices_are_refused_and_errors_keep_their_type():
    with pytest.raises(PackReadError, match="/dev/zero: file is a character device") as caught:
        files.check_file("/dev/zero", PackReadError)
    assert str(caught.value.path) == "/dev/zero"
    with pytest.raises(BundleError, match="/dev/urandom: bundle folder is a character device, expected a folder"):
        files.check_folder("/dev/urandom", BundleError, "bundle folder")


def test_regular_files_pass_through_links_and_sizes_are_bounded(odd):
    assert files.check_file(odd / "link") == 5
    with pytest.raises(InputError, match="is 5 bytes, more than the limit of 4"):
        files.check_file(odd / "file", max_bytes=4)
    assert files.read_file(odd / "file", 5) == b"12345"
    with pytest.raises(InputError, match="more than the limit of 4"):
        files.read_file(odd / "file", 4)
    with pytest.raises(InputError, match="FIFO"):
        files.file_sha256(odd / "fifo")


def test_outputs_are_never_inputs_devices_fifos_or_links(odd):
    with pytest.raises(OutputPathError, match="the output is the input"):
        files.check_output_path(odd / "file", force=True, inputs=[odd / "file"])
    with pytest.raises(OutputPathError, match="the output is the input"):  # the same file reached through a link
        files.check_output_path(odd / "file", force=True, inputs=[odd / "link"])
    with pytest.raises(OutputPathError, match="lies inside the input"):
        files.check_output_path(odd / "folder" / "out", force=True, inputs=[odd / "folder"])
    with pytest.raises(OutputPathError, match="is a FIFO"):
        files.check_output_path(odd / "fifo", force=True)
    with pytest.raises(OutputPathError, match="is a character device"):
        files.check_output_path("/dev/null", force=True)
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        files.check_output_path(odd / "link", force=True)
    with pytest.raises(OutputPathError, match="exists; pass --force"):
        files.check_output_path(odd / "file")
    assert files.check_output_path(odd / "file", force=True) == odd / "file"
    assert (odd / "file").read_bytes() == b"12345"
    assert sorted(p.name for p in odd.iterdir()) == ["broken", "fifo", "file", "folder", "link", "loop-a", "loop-b"]  # no probe left


def test_output_folders_are_replaced_only_when_savpack_wrote_them(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(OutputPathError, match="the output is the input"):
        files.check_output_folder(model, True, marker="bundle.json", inputs=[model])
    with pytest.raises(OutputPathError, match="the output holds the input"):
        files.check_output_folder(tmp_path, True, marker="bundle.json", inputs=[model])
    with pytest.raises(OutputPathError, match="holds no bundle.json, so savpack did not write it"):
        files.check_output_folder(model, True, marker="bundle.json")
    with pytest.raises(OutputPathError, match="exists; pass --force"):
        files.check_output_folder(model, False, marker="bundle.json")
    (model / "bundle.json").write_text("{}")
    assert files.check_output_folder(model, True, marker="bundle.json") == model
    with pytest.raises(OutputPathError, match="folder /sys is not writable"):
        files.check_output_folder("/sys/savpack-bundle", False, marker="bundle.json")
