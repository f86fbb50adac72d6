"""The build command says what it does: loading a cached build is not building."""

from __future__ import annotations

from neusdf.ops import build


def test_build_command_with_a_cached_build_does_not_say_building(capsys):
    build.load_library()  # built (or loaded) once: the cache holds the library now
    assert build.main() == 0
    out = capsys.readouterr().out
    assert "building" not in out and "a minute or two" not in out
    assert "loading the op" in out and "op library ready" in out
