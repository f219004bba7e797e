"""durable.write_new: what lands in the file, whole, however the kernel splits the writes."""

import os

import pytest

from mailerd import durable


@pytest.mark.parametrize("short", [None, 0, 3, 5, 9])
def test_head_and_body_land_whole_after_short_writes(tmp_path, monkeypatch, short):
    real = os.writev

    def writev(fd, buffers):  # the first call writes only `short` bytes, as a full disk may
        monkeypatch.setattr(os, "writev", real)
        if short is None:
            return real(fd, buffers)
        return os.write(fd, b"".join(buffers)[:short])

    monkeypatch.setattr(os, "writev", writev)
    directory = os.open(tmp_path, os.O_RDONLY)
    os.close(durable.write_new("m", b"Head:\r\n", b"body\r\n", dir_fd=directory))
    os.close(directory)
    assert (tmp_path / "m").read_bytes() == b"Head:\r\nbody\r\n"


def test_an_empty_body_or_head(tmp_path):
    directory = os.open(tmp_path, os.O_RDONLY)
    for name, head, body in (("a", b"\\Recent\n", b""), ("b", b"", b"only body\r\n")):
        os.close(durable.write_new(name, head, body, dir_fd=directory))
        assert (tmp_path / name).read_bytes() == head + body
    os.close(directory)
