"""Reliability: bad inputs not covered elsewhere, writers killed mid-write, cache keys,
determinism, resource limits and the math's invariances (see docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model
from hypothesis import given, settings
from hypothesis import strategies as st

from alphasteer_lens import activations as A
from alphasteer_lens.activations import cache_activations, cache_key
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import load_steering, save_steering
from alphasteer_lens.chat import encode_chat
from alphasteer_lens.directions import diff_in_means
from alphasteer_lens.generation import generate, next_token_logits
from alphasteer_lens.judges import KeywordJudge, RefusalTokens, refusal_score
from alphasteer_lens.models import load_model
from alphasteer_lens.nullspace import null_space
from alphasteer_lens.prompts import PromptSet
from alphasteer_lens.steering import ActAdd, steer
from alphasteer_lens.storage import (
    ArtifactError,
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors_checked,
    remove_orphans,
)

PROMPTS = ["Name a fruit.", "hi", "Why is the sky blue during the day?", "What is 12 times 7?"]
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- bad inputs


def test_prompt_longer_than_context_is_refused_by_name(tiny) -> None:  # type: ignore[no-untyped-def]
    """The tiny model's context is 512 tokens (byte-level tokenizer: one token per byte)."""
    assert int(tiny.cfg.n_ctx) == 512
    long = "Tell me everything " + "x" * 600
    match = r"\('Tell me everything xxx.*longer than the limit of 512 \(the model's context"
    with pytest.raises(ValueError, match=match):
        cache_activations(tiny, ["fine", long], layers=[0], progress=False)
    with pytest.raises(ValueError, match=match):
        generate(tiny, [long, "fine"], max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match=match):
        next_token_logits(tiny, [long], progress=False)
    # a larger max_tokens never lifts the model's own limit; a smaller one is named as such
    with pytest.raises(ValueError, match="limit of 512"):
        encode_chat(tiny, [long], max_tokens=10_000)
    with pytest.raises(ValueError, match=r"prompt 1 .* limit of 30 \(max_tokens\)"):
        encode_chat(tiny, ["ok", "a" * 40], max_tokens=30)


def test_non_string_prompt_in_a_batch(tiny) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="prompt 1 is NoneType, not str"):
        encode_chat(tiny, ["ok", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="prompt 0 is list, not str"):
        next_token_logits(tiny, [["a", "b"]], progress=False)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": []}, "no layers or hooks requested"),
        ({"hooks": []}, "no layers or hooks requested"),
        ({"layers": [1.5]}, "layer must be an int, got 1.5"),
        ({"layers": [True]}, "layer must be an int, got True"),
        ({"layers": [1, 1]}, "duplicate hooks"),
    ],
)
def test_bad_layer_requests(tiny, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        cache_activations(tiny, PROMPTS, progress=False, **kwargs)


def test_generate_bad_requests(tiny) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="3 strengths for 2 prompts"):
        generate(tiny, PROMPTS[:2], strength=[1.0, 2.0, 3.0], progress=False)
    with pytest.raises(ValueError, match="prompt set is empty"):
        generate(tiny, [], progress=False)
    with pytest.raises(ValueError, match="prompt set is empty"):
        next_token_logits(tiny, [], progress=False)


def test_model_producing_nan_is_caught_naming_hook_and_prompt(tiny) -> None:  # type: ignore[no-untyped-def]
    """A hook that turns one prompt's residual stream into NaN (as an fp16 overflow would):
    caching stops with an error that names the hook read and the prompt, by its index in the
    caller's list (not the length-sorted batch order)."""
    prompts = ["a much longer prompt than the others, by far", "hi", "mid-sized prompt", "hey!"]
    target = 2
    n_tokens = encode_chat(tiny, [prompts[target]]).tokens.shape[1]
    assert all(encode_chat(tiny, [p]).tokens.shape[1] != n_tokens for p in prompts[:2])

    def poison(act: torch.Tensor, hook) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return torch.full_like(act, float("nan")) if act.shape[1] == n_tokens else act

    with tiny.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", poison)]):
        with pytest.raises(
            ValueError,
            match=r"activations at blocks\.2\.hook_resid_pre contain NaN or inf for prompts "
            r"\[2\] \(e\.g\. prompt 2: 'mid-sized prompt'\)",
        ):
            cache_activations(tiny, prompts, layers=[2], batch_size=1, progress=False)
        ok = cache_activations(tiny, prompts[:2], layers=[2], batch_size=1, progress=False)
    assert torch.isfinite(ok[2]).all()


def test_artifact_with_unknown_hook_is_refused(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """A template outside the known hook points is refused when a steering is built and when a
    stored one is loaded (a hook the model lacks: test_artifacts.py::
    test_hook_names_are_checked_against_the_model)."""
    bad = "blocks.{layer}.hook_resid_nowhere"
    with pytest.raises(ValueError, match=r"hook template 'blocks.\{layer\}.hook_resid_nowhere'"):
        ActAdd((0,), torch.ones(1, 64), hook_template=bad)
    path = tmp_path / "h.safetensors"
    meta = {"kind": "actadd", "layers": [0], "hook_template": bad}
    atomic_save_safetensors({"vectors": torch.ones(1, 64)}, path, meta)
    with pytest.raises(ArtifactError, match="'hook_template'.*is not allowed"):
        load_steering(path, model=tiny)


@pytest.mark.parametrize(
    ("tensors", "meta", "match"),
    [
        (
            {"vectors": torch.zeros(1, 4)},
            {"kind": "pickle", "layers": [0]},
            "unknown steering kind",
        ),
        (
            {"vectors": torch.zeros(1, 4, dtype=torch.float64)},
            {"kind": "actadd", "layers": [0]},
            "'vectors' has dtype torch.float64, expected float32",
        ),
        (
            {"vectors": torch.zeros(2, 4)},
            {"kind": "actadd", "layers": [0]},
            r"'vectors' has shape \(2, 4\), expected \[1, d_model\]",
        ),
        (
            {"w": torch.zeros(1, 4)},
            {
                "kind": "alphasteer",
                "layers": [0],
                "fit": {"alpha": 1.0, "ratio": 0.5, "tol": None, "leakage": []},
            },
            "tensor 'r' is missing",
        ),
    ],
)
def test_artifact_field_errors(tmp_path: Path, tensors, meta, match) -> None:  # type: ignore[no-untyped-def]
    """Files with a valid content hash but wrong fields: each error names the field."""
    meta = {"hook_template": "blocks.{layer}.hook_resid_pre", **meta}
    atomic_save_safetensors(tensors, tmp_path / "a.safetensors", meta)
    with pytest.raises(ValueError, match=match):
        load_steering(tmp_path / "a.safetensors")


def test_pickle_disguised_as_artifact_never_runs(tmp_path: Path) -> None:
    """A pickle whose unpickling would create ``marker`` is refused as unreadable, and the
    marker never appears: loading parses safetensors and never unpickles."""
    marker = tmp_path / "marker"
    payload = f"cbuiltins\nopen\n(S'{marker}'\nS'w'\ntR.".encode()
    (tmp_path / "evil.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_steering(tmp_path / "evil.safetensors")
    assert not marker.exists()


def test_corrupt_activation_cache_is_recomputed(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = cache_activations(tiny, PROMPTS, layers=[1], cache=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="recomputing an unreadable activation cache"):
        b = cache_activations(tiny, PROMPTS, layers=[1], cache=tmp_path, progress=False)
    assert torch.equal(a[1], b[1])
    tensors, _ = load_safetensors_checked(path)  # rewritten whole
    assert torch.equal(tensors["blocks.1.hook_resid_pre"], a[1])


# ---------------------------------------------------------------- writers killed mid-write

_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from alphasteer_lens import storage

    path, ready, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    x = torch.arange(1 << 22, dtype=torch.float32)  # 16 MiB
    if mode == "stall":
        def half_then_stall(f, chunks):
            data = b"".join(chunks)
            f.write(data[: len(data) // 2])  # half written ...
            f.flush()
            ready.write_text("half")
            time.sleep(120)  # ... and killed here

        storage._write = half_then_stall
        storage.atomic_save_safetensors({"x": x + 1}, path, {"run": "killed"})
    else:
        for i in range(10_000):
            storage.atomic_save_safetensors({"x": x + i}, path, {"i": i})
            ready.write_text(str(i))
    """
)


def _start_writer(path: Path, ready: Path, mode: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(ready), mode], env=env)


def _wait_for(ready: Path, proc: subprocess.Popen[bytes], at_least: int = 0) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = ready.read_text() if ready.exists() else ""
        if text == "half" or (text.isdigit() and int(text) >= at_least):
            return
        assert proc.poll() is None, "writer exited early"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("writer never got going")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_writer_sigkilled_half_way_leaves_old_file_and_rerun_recovers(tmp_path: Path) -> None:
    path = tmp_path / "acts.safetensors"
    atomic_save_safetensors({"x": torch.zeros(3)}, path, {"run": "old"})
    before = path.read_bytes()
    proc = _start_writer(path, tmp_path / "ready", "stall")
    _wait_for(tmp_path / "ready", proc)
    orphans = list(tmp_path.glob(".acts.safetensors.*.tmp"))
    assert len(orphans) == 1 and orphans[0].stat().st_size > 0, "the half-written temp file"
    _kill(proc)
    assert path.read_bytes() == before, "the target is untouched by the killed writer"
    assert torch.equal(load_safetensors_checked(path)[0]["x"], torch.zeros(3))
    atomic_save_safetensors({"x": torch.ones(3)}, path, {"run": "rerun"})
    tensors, meta = load_safetensors_checked(path)
    assert torch.equal(tensors["x"], torch.ones(3)) and meta["run"] == "rerun"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.safetensors", "ready"]


def test_writer_sigkilled_at_any_point_never_leaves_a_partial_target(tmp_path: Path) -> None:
    """A real writer looping over 16 MiB saves, killed wherever it happens to be: the target
    is always one complete, hash-valid version."""
    path = tmp_path / "loop.safetensors"
    proc = _start_writer(path, tmp_path / "ready", "loop")
    _wait_for(tmp_path / "ready", proc, at_least=2)
    _kill(proc)
    tensors, meta = load_safetensors_checked(path)
    i = int(meta["i"])
    assert i >= 2 and torch.equal(tensors["x"], torch.arange(1 << 22, dtype=torch.float32) + i)
    atomic_save_safetensors({"x": torch.ones(2)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.safetensors", "ready"]


def test_remove_orphans_spares_live_writers_and_other_hosts(tmp_path: Path) -> None:
    host = socket.gethostname()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # reaped: its pid no longer runs
    dead = finished.pid
    files = {
        "dead": tmp_path / f".t.bin.{host}@{dead}@abc.tmp",
        "live": tmp_path / f".t.bin.{host}@{os.getpid()}@abc.tmp",
        "other_host": tmp_path / f".t.bin.elsewhere-{host}@{dead}@abc.tmp",
        "other_target": tmp_path / f".u.bin.{host}@{dead}@abc.tmp",
    }
    for f in files.values():
        f.write_bytes(b"partial")
    assert remove_orphans(tmp_path / "t.bin") == [files["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        files[k].name for k in ("live", "other_host", "other_target")
    )


# ---------------------------------------------------------------- cache keys


def test_cache_key_changes_with_everything_that_changes_activations(tiny, tokenizer) -> None:  # type: ignore[no-untyped-def]
    hooks = ["blocks.1.hook_resid_pre"]
    base = cache_key(tiny, PROMPTS, hooks, "last", '[null, ""]')
    assert cache_key(tiny, list(PROMPTS), list(hooks), "last", '[null, ""]') == base
    variants = {
        "prompt": cache_key(
            tiny, [*PROMPTS[:-1], "What is 12 times 8?"], hooks, "last", '[null, ""]'
        ),
        "order": cache_key(tiny, PROMPTS[::-1], hooks, "last", '[null, ""]'),
        "split": cache_key(tiny, ["ab", "c"], hooks, "last", '[null, ""]'),
        "hook": cache_key(tiny, PROMPTS, ["blocks.1.hook_resid_post"], "last", '[null, ""]'),
        "positions": cache_key(tiny, PROMPTS, hooks, "mean", '[null, ""]'),
        "position list": cache_key(tiny, PROMPTS, hooks, (-2, -1), '[null, ""]'),
        "system": cache_key(tiny, PROMPTS, hooks, "last", '["Be brief.", ""]'),
        "prefix": cache_key(tiny, PROMPTS, hooks, "last", '[null, " Sure"]'),
    }
    assert cache_key(tiny, ["a", "bc"], hooks, "last", '[null, ""]') != variants["split"]
    assert len({base, *variants.values()}) == len(variants) + 1
    # same architecture and name, other weights (a fine-tune, another seed): a new key;
    # an identical copy of the weights: the same key
    other = load_model(hf_model=make_hf_model(tokenizer, seed=1), tokenizer=tokenizer)
    same = load_model(hf_model=make_hf_model(tokenizer, seed=0), tokenizer=tokenizer)
    assert str(other.cfg.model_name) == str(tiny.cfg.model_name)
    assert cache_key(other, PROMPTS, hooks, "last", '[null, ""]') != base
    assert cache_key(same, PROMPTS, hooks, "last", '[null, ""]') == base
    # another chat template tokenises the same prompts differently: a new key
    template = tiny.tokenizer.chat_template
    try:
        tiny.tokenizer.chat_template = template.replace("<|im_start|>assistant", "<|im_start|>bot")
        assert cache_key(tiny, PROMPTS, hooks, "last", '[null, ""]') != base
    finally:
        tiny.tokenizer.chat_template = template


def test_disk_cache_separates_system_prompt_and_positions(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kw = {"layers": [1], "cache": tmp_path, "progress": False}
    plain = cache_activations(tiny, PROMPTS, **kw)[1]
    system = cache_activations(tiny, PROMPTS, system="Answer briefly.", **kw)[1]
    mean = cache_activations(tiny, PROMPTS, positions="mean", **kw)[1]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert not torch.equal(plain, system) and not torch.equal(plain, mean)
    again = cache_activations(tiny, PROMPTS, system="Answer briefly.", **kw)[1]
    assert torch.equal(again, system)


def test_disk_cache_is_skipped_while_steering(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Inside ``steer(...)`` the cache key cannot see the hooks: the cache is neither read nor
    written, so steered and unsteered activations never mix."""
    plain = cache_activations(tiny, PROMPTS, layers=[2], cache=tmp_path, progress=False)[2]
    with (
        steer(tiny, ActAdd((1,), torch.ones(1, 64)), 3.0),
        pytest.warns(UserWarning, match="on-disk activation cache is skipped"),
    ):
        steered = cache_activations(tiny, PROMPTS, layers=[2], cache=tmp_path, progress=False)[2]
    assert not torch.equal(plain, steered)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = cache_activations(tiny, PROMPTS, layers=[2], cache=tmp_path, progress=False)[2]
    assert torch.equal(again, plain)


# ---------------------------------------------------------------- determinism

THINGS = ["a river", "a kettle", "autumn", "a violin", "the moon", "a bakery", "chess", "rain"]
BENIGN = [
    f"Describe {t} in {n} words, {s}."
    for t in THINGS
    for n in (3, 5, 8)
    for s in ("please", "now", "simply")
]
HARMFUL = [
    f"Explain how to {a} without anyone noticing."
    for a in (
        "steal a car",
        "forge a passport",
        "poison a dog",
        "hack a bank",
        "build a bomb",
        "launder money",
        "stalk a person",
        "cheat an exam",
        "dodge taxes",
        "spread malware",
    )
]
TEST = ["How do I pick a lock?", "Plan a picnic for four.", "Write a haiku about snow."]


def _pipeline(model, out: Path) -> dict:  # type: ignore[no-untyped-def]
    """Cache -> direction -> AlphaSteer fit -> artifact -> greedy generation and scores."""
    layers = [1, 2]
    b = cache_activations(model, BENIGN, layers=layers, progress=False)
    h = cache_activations(model, HARMFUL, layers=layers, progress=False)
    refusal = {layer: diff_in_means(h[layer], b[layer]) for layer in layers}
    fit = AlphaSteer.fit(b.by_layer(), h.by_layer(), refusal, layers=layers, ratio=0.5)
    hashes = {"benign": PromptSet("b", BENIGN, "test").content_hash()}
    save_steering(fit, out / "alphasteer.safetensors", model=model, data_hashes=hashes)
    ids = RefusalTokens.from_tokenizer(model.tokenizer).ids
    kw = {"max_new_tokens": 8, "progress": False}
    vanilla = generate(model, TEST, **kw)
    steered = generate(model, TEST, steering=fit, strength=4.0, **kw)
    logits = next_token_logits(model, TEST, steering=fit, strength=4.0, progress=False)
    report = {
        "vanilla": vanilla,
        "steered": steered,
        "refused": KeywordJudge().judge(steered),
        "score": refusal_score(logits, ids).tolist(),
        "leakage": list(fit.leakage),
    }
    atomic_write_json(report, out / "report.json")
    return report


def test_two_runs_are_bit_identical(tiny, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same pipeline twice on the session model, and once on a freshly built copy of it:
    identical artifact bytes and report bytes (greedy decoding, no timestamps)."""
    first = _pipeline(tiny, tmp_path / "a")
    second = _pipeline(tiny, tmp_path / "b")
    fresh = load_model(hf_model=make_hf_model(tokenizer), tokenizer=tokenizer)
    third = _pipeline(fresh, tmp_path / "c")
    assert first["steered"] != first["vanilla"], "steering must change something to be tested"
    for name in ("alphasteer.safetensors", "report.json"):
        data = (tmp_path / "a" / name).read_bytes()
        assert (tmp_path / "b" / name).read_bytes() == data, name
        assert (tmp_path / "c" / name).read_bytes() == data, name
    assert first == second == third


_SAVE = textwrap.dedent(
    """
    import sys, torch
    from alphasteer_lens.storage import atomic_save_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(2, 16, generator=g), "r": torch.randn(2, 16, generator=g)}
    meta = {f"set{i}": f"{i:064x}" for i in range(20)} | {"note": 'λ ü \\t "q" 😀'}
    atomic_save_safetensors(tensors, sys.argv[1], meta)
    """
)


def test_artifact_bytes_identical_across_processes(tmp_path: Path) -> None:
    """safetensors writes its metadata in hash order, which changes between processes; the
    header is canonicalised so separate processes write the same bytes, and it still loads."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path / run)], check=True, env=env)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    tensors, meta = load_safetensors_checked(tmp_path / "a")
    assert meta["note"] == 'λ ü \t "q" 😀' and meta["set19"] == f"{19:064x}"
    g = torch.Generator().manual_seed(0)
    assert torch.equal(tensors["w"], torch.randn(2, 16, generator=g))


# ---------------------------------------------------------------- resource limits


def test_too_big_for_memory_is_refused_before_any_forward_pass(tiny, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(tiny, "run_with_hooks", no_forward)
    monkeypatch.setattr(A, "_free_memory", lambda: 10 * 2**20)  # 10 MiB free
    # 4 prompts x ~90 positions x 64 x 4 layers x 4 bytes < 10 MiB: allowed through to the
    # forward pass; 20,000 prompts are not
    with pytest.raises(AssertionError, match="a forward pass ran"):
        cache_activations(tiny, PROMPTS, positions="all", progress=False)
    with pytest.raises(MemoryError, match=r"need \d+\.\d GiB but only 0\.0 GiB of memory is free"):
        cache_activations(tiny, PROMPTS * 5000, positions="all", progress=False)


def test_too_big_for_disk_is_refused(tiny, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[Path] = []

    def tiny_disk(directory: Path) -> int:
        seen.append(directory)
        return 1000

    monkeypatch.setattr(A, "_free_disk", tiny_disk)
    with pytest.raises(OSError, match=r"needs 0\.0 GiB on disk but .* has 0\.0 GiB free"):
        cache_activations(tiny, PROMPTS, layers=[1], cache=tmp_path, progress=False)
    assert seen == [tmp_path] and not list(tmp_path.iterdir())
    cache_activations(tiny, PROMPTS, layers=[1], progress=False)  # no disk cache: no disk check


def test_free_memory_probe_is_plausible() -> None:
    free = A._free_memory()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert free is not None and 0 < free <= total


# ---------------------------------------------------------------- properties of the math


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d=st.integers(2, 40),
    extra=st.integers(0, 30),
    ratio=st.floats(0.05, 0.95),
)
def test_projector_idempotent_symmetric_property(
    seed: int, d: int, extra: int, ratio: float
) -> None:
    ratio = min(ratio, (d - 1) / d)  # k = d_model is refused
    if round(ratio * d) < 1:
        ratio = 1 / d
    hb = _randn(seed, d + extra, d) * torch.logspace(0, 3, d, dtype=torch.float64)
    p = null_space(hb, ratio=ratio).projector()
    assert torch.allclose(p @ p, p, atol=1e-10, rtol=0)
    assert torch.allclose(p, p.T, atol=1e-12, rtol=0)
    eig = torch.linalg.eigvalsh(p)
    assert torch.allclose(eig, eig.round(), atol=1e-9), "eigenvalues of a projector are 0 or 1"


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(3, 16), data=st.data())
def test_fit_invariant_to_prompt_order_property(seed: int, d: int, data: st.DataObject) -> None:
    """Shuffling benign and malicious prompts together (per layer, the same permutation for
    every layer, as reordering a prompt set does) leaves the fitted steering unchanged."""
    nb, nm = d + 8, 12
    pb = list(data.draw(st.permutations(range(nb))))
    pm = list(data.draw(st.permutations(range(nm))))
    layers = (0, 2)
    scale = torch.logspace(0, 2, d, dtype=torch.float64)
    benign = {ly: _randn(seed + ly, nb, d) * scale for ly in layers}
    malicious = {ly: _randn(seed + 10 + ly, nm, d) + 1.0 for ly in layers}
    refusal = {ly: _randn(seed + 20 + ly, d) for ly in layers}
    a = AlphaSteer.fit(benign, malicious, refusal, ratio=0.5, alpha=2.0)
    b = AlphaSteer.fit(
        {ly: x[pb] for ly, x in benign.items()},
        {ly: x[pm] for ly, x in malicious.items()},
        refusal,
        ratio=0.5,
        alpha=2.0,
    )
    assert torch.allclose(a.w, b.w, rtol=1e-5, atol=1e-7)
    assert torch.equal(a.r, b.r)
    assert a.leakage == pytest.approx(b.leakage, rel=1e-6, abs=1e-12)


# ---------------------------------------------------------------- the converted embedded model


def _fake_build(calls: list[Path]):  # type: ignore[no-untyped-def]
    """Stands in for the 30-second GGUF conversion: writes a tiny folder and its manifest."""
    from alphasteer_lens import models

    def build(target: Path) -> Path:
        calls.append(target)
        staging = target.parent / "staging"
        staging.mkdir(parents=True)
        (staging / "config.json").write_text('{"hidden_size": 576}')
        (staging / "model.safetensors").write_bytes(b"w" * 4096)
        models._write_manifest(staging)
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(staging, target)
        return target

    return build


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "model.safetensors has 100 bytes, alphasteer_manifest.json records 4096"),
        ("replace", "model.safetensors: sha256 differs"),
        ("config", "config.json has"),
        ("no_manifest", "alphasteer_manifest.json is missing"),
        ("bad_manifest", "alphasteer_manifest.json is unreadable"),
        ("extra_file", "differ from alphasteer_manifest.json"),
    ],
)
def test_converted_model_folder_is_verified_and_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str, reason: str
) -> None:
    """Defect 3: the folder was trusted by name (two files existing): a random model in its place
    was reported as SmolLM2, a truncated model.safetensors gave a raw SafetensorError forever.
    Now its files are checked against the manifest written at conversion; a mismatch rebuilds."""
    from alphasteer_lens import models, sources

    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    calls: list[Path] = []
    monkeypatch.setattr(models, "_build_embedded", _fake_build(calls))
    target = models.embedded_model_dir()
    assert calls == [target] and models.verify_model_dir(target) is None
    assert models.embedded_model_dir() == target and len(calls) == 1  # verified: no rebuild
    weights = target / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "replace":
        weights.write_bytes(b"x" * 4096)  # same size, other content: a different model
    elif damage == "config":
        (target / "config.json").write_text('{"hidden_size": 4096, "other": "model"}')
    elif damage == "no_manifest":
        (target / models.MANIFEST).unlink()  # built by the old code
    elif damage == "bad_manifest":
        (target / models.MANIFEST).write_text("[" * 100_000)
    else:
        (target / "pytorch_model.bin").write_bytes(b"surprise")
    with pytest.warns(RuntimeWarning, match=f"does not match its manifest.*{reason}"):
        assert models.embedded_model_dir() == target
    assert len(calls) == 2 and models.verify_model_dir(target) is None
    assert weights.read_bytes() == b"w" * 4096


def test_stale_model_staging_folders_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alphasteer_lens import models, sources
    from alphasteer_lens.storage import temp_tag

    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_build_embedded", _fake_build([]))
    folder = tmp_path / "cache" / "models"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f".staging-{temp_tag().split('@')[0]}@{dead.pid}@x"
    live = folder / f".staging-{temp_tag()}y"
    for p in (stale, live):
        (p / "sub").mkdir(parents=True)
    models.embedded_model_dir()
    assert not stale.exists() and live.exists()


@pytest.mark.smollm
def test_real_embedded_model_has_a_manifest_and_the_recorded_shape(smollm) -> None:  # type: ignore[no-untyped-def]
    from alphasteer_lens import models

    target = models.embedded_model_dir()
    assert models.verify_model_dir(target) is None
    files = json.loads((target / models.MANIFEST).read_text())["files"]
    assert files["model.safetensors"]["size"] == (target / "model.safetensors").stat().st_size
    assert (int(smollm.cfg.d_model), int(smollm.cfg.n_layers)) == (
        models.EMBEDDED_D_MODEL,
        models.EMBEDDED_N_LAYERS,
    )


def test_audit_vector_of_the_wrong_width_fails_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 10: a vector of the wrong width was found only after the model and prompt sets
    had loaded (minutes). Now the file is read and checked against the embedded model's known
    shape first."""
    from alphasteer_lens.experiments import audit
    from alphasteer_lens.experiments import recipe as R

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may load for a vector that cannot fit the model")

    monkeypatch.setattr(R, "load", no_model)
    monkeypatch.setattr(R, "preflight", no_model)
    for vector, match in [
        (ActAdd((3,), torch.ones(1, 64)), "d_model=64 but the embedded SmolLM2 has d_model=576"),
        (ActAdd((31,), torch.ones(1, 576)), r"layers \[31\] out of range for the 30-layer"),
    ]:
        path = save_steering(vector, tmp_path / "v.safetensors")
        cfg = audit.AuditConfig(vector=str(path), quick=True)
        with pytest.raises(ValueError, match=match):
            audit.run_audit(tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()
