"""agent.handlers.folders.paths, the one place a folder path is resolved: with openat2 and with the O_PATH walk used where
the kernel lacks it, a symlink anywhere in a path is ELOOP, never followed."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from onprem.agent.handlers.folders import paths
from onprem.tunnel.errors import RequestError


@pytest.fixture(params=["openat2", "walk"], autouse=True)
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "walk":
        monkeypatch.setattr(paths, "_openat2_available", False)
    elif not paths.openat2_supported():
        pytest.skip("this kernel has no openat2")
    return str(request.param)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[int]:
    """root/ holds a/b/file, a symlink `up` to the outside folder, a/inside -> b, and a/f -> b/file."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret")
    top = tmp_path / "root"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "file").write_text("inside")
    (top / "up").symlink_to(tmp_path / "outside")
    (top / "a" / "inside").symlink_to("b")
    (top / "a" / "f").symlink_to("b/file")
    fd = paths.open_root(str(top))
    yield fd
    os.close(fd)


def read(fd: int) -> bytes:
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def elooped(call: object) -> bool:
    try:
        fd = call()  # type: ignore[operator]
    except OSError as exc:
        return exc.errno == errno.ELOOP
    os.close(fd)
    return False


def test_a_plain_path_opens(root: int) -> None:
    assert read(paths.open_at(root, ("a", "b", "file"), os.O_RDONLY)) == b"inside"


@pytest.mark.parametrize("parts", [("up", "secret"), ("a", "inside", "file"), ("a", "f"), ("up",)])
def test_a_symlink_at_any_depth_is_eloop_for_a_file(root: int, parts: tuple[str, ...]) -> None:
    assert elooped(lambda: paths.open_at(root, parts, os.O_RDONLY))


@pytest.mark.parametrize("parts", [("up",), ("a", "inside"), ("up", "x")])
def test_a_symlink_at_any_depth_is_eloop_for_a_folder(root: int, parts: tuple[str, ...]) -> None:
    assert elooped(lambda: paths.open_folder(root, parts))
    assert elooped(lambda: paths.open_folder(root, parts, readable=True))


def test_a_file_on_the_way_is_enotdir(root: int) -> None:
    with pytest.raises(NotADirectoryError):
        paths.open_at(root, ("a", "b", "file", "x"), os.O_RDONLY)


def test_creating_folders_makes_the_missing_ones_and_never_goes_through_a_symlink(root: int, tmp_path: Path) -> None:
    os.close(paths.open_folder(root, ("a", "new", "deeper"), create=True))
    assert (tmp_path / "root" / "a" / "new" / "deeper").is_dir()
    assert elooped(lambda: paths.open_folder(root, ("up", "made"), create=True))
    assert not (tmp_path / "outside" / "made").exists()


def test_walk_lists_every_folder_once_and_never_enters_a_symlink(root: int) -> None:
    seen = {parts: sorted(e.name for e in entries) for parts, _fd, entries in paths.walk(root)}
    assert seen == {(): ["a", "up"], ("a",): ["b", "f", "inside"], ("a", "b"): ["file"]}


def test_remove_tree_removes_symlinks_inside_as_names_only(root: int, tmp_path: Path) -> None:
    (tmp_path / "root" / "a" / "b" / "out").symlink_to(tmp_path / "outside")
    paths.remove_tree(root, "a")
    assert sorted(os.listdir(tmp_path / "root")) == ["up"]
    assert (tmp_path / "outside" / "secret").read_text() == "secret"


def test_remove_tree_of_a_symlink_is_eloop(root: int, tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        paths.remove_tree(root, "up")
    assert info.value.errno == errno.ELOOP
    assert (tmp_path / "outside" / "secret").exists()


@pytest.mark.parametrize("text", ["..", "a/../..", "/etc", "a\\b", "a\x00", "%2e%2e", "C:x"])
def test_the_text_is_refused_before_the_disk(text: str) -> None:
    with pytest.raises(RequestError):
        paths.split(text)


def test_dot_and_empty_components_are_dropped() -> None:
    assert paths.split("./a//b/.") == ("a", "b")
    assert paths.split("") == ()
