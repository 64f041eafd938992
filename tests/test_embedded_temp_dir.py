"""The embedded runtime's temp dir: under RAY_TMPDIR when Ray's socket paths fit, else /tmp."""

import os
import shutil

from nlbench.execution import MAX_TEMP_BASE, embedded_temp_dir

# Ray's longest socket path below the temp dir: /session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
SOCKET_TAIL = len("/session_2026-12-04_15-31-22_123456_4194304/sockets/plasma_store")


def test_temp_dir_under_a_short_ray_tmpdir(tmp_path, monkeypatch):
    base = "/tmp/rt" + os.urandom(3).hex()
    os.makedirs(base)
    try:
        monkeypatch.setenv("RAY_TMPDIR", base)
        d = embedded_temp_dir()
        assert os.path.dirname(d) == base and os.path.basename(d).startswith("nlbench-ray-")
        assert len(d) + SOCKET_TAIL <= 107
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_long_ray_tmpdir_falls_back_to_tmp(tmp_path, monkeypatch):
    # pytest's tmp_path is long enough that Ray's Unix sockets under it would pass 107 bytes
    long_base = tmp_path / ("x" * 40)
    long_base.mkdir()
    assert len(str(long_base)) > MAX_TEMP_BASE
    monkeypatch.setenv("RAY_TMPDIR", str(long_base))
    d = embedded_temp_dir()
    try:
        assert os.path.dirname(d) == "/tmp"
        assert len(d) + SOCKET_TAIL <= 107
    finally:
        shutil.rmtree(d, ignore_errors=True)
