"""The build command says what it does (loading a cached build is not building), and a wait
on another build's lock says what it waits for."""

from __future__ import annotations

import threading

from neusdf.ops import build


def test_build_command_with_a_cached_build_does_not_say_building(capsys):
    build.load_library()  # built (or loaded) once: the cache holds the library now
    assert build.main() == 0
    out = capsys.readouterr().out
    assert "building" not in out and "a minute or two" not in out
    assert "loading the op" in out and "op library ready" in out


def test_a_left_behind_build_lock_is_named_while_waiting(tmp_path, capsys):
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.5, lock.unlink).start()  # the other builder finishes
    build._wait_for_build_lock(lock, notice_after=0.1, poll=0.02)
    assert not lock.exists()  # returned only once the lock was gone
    err = capsys.readouterr().err
    assert str(lock) in err and "delete the file" in err


def test_no_build_lock_no_wait_no_notice(tmp_path, capsys):
    build._wait_for_build_lock(tmp_path / "lock", notice_after=0.0)
    assert capsys.readouterr().err == ""
