"""Export additive steering as a llama.cpp control vector (GGUF, the format repeng writes).

A control vector file has ``general.architecture = "controlvector"``, the keys
``controlvector.model_hint`` (llama.cpp's name of the target architecture, informational) and
``controlvector.layer_count`` (how many direction tensors), and one f32 tensor ``direction.{il}``
of shape ``[n_embd]`` per steered layer. llama.cpp adds ``direction.{il}`` (times the scale given
at load time) to the **output** of layer ``il``, at every position, prompt and generated tokens
alike; it never steers the output of layer 0 (its loader refuses ``direction.0``). So:

- ``blocks.{l}.hook_resid_post`` → ``direction.{l}`` (``l ≥ 1``);
- ``blocks.{l}.hook_resid_pre`` = output of layer ``l − 1`` → ``direction.{l − 1}`` (``l ≥ 2``);
- ``hook_resid_mid``, ``hook_attn_out``, ``hook_mlp_out`` have no counterpart and are refused.

The strength is baked in: the file holds ``λ v`` (float32, the product the steering runtime
adds), so llama.cpp applies it with scale 1. Only "every position" can be expressed; a steering
meant for prompt positions only changes meaning in llama.cpp, and is refused unless the caller
says ``positions="all"``. :func:`~alphasteer_lens.benign_vectors.load_vector` reads the file
back as an :class:`~alphasteer_lens.steering.ActAdd` at ``hook_resid_post``, bit for bit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alphasteer_lens.hookpoints import layer_of
from alphasteer_lens.steering import ActAdd, Composition, check_strength

ARCH = "controlvector"
MODEL_HINT_KEY = f"{ARCH}.model_hint"
LAYER_COUNT_KEY = f"{ARCH}.layer_count"
_EXPRESSIBLE = {"hook_resid_pre": -1, "hook_resid_post": 0}  # direction index = layer + offset


def direction_index(name: str) -> int:
    """The llama.cpp control-vector layer ``il`` (tensor ``direction.{il}``) that steers hook
    ``name``; a ValueError for a hook llama.cpp cannot steer."""
    layer = layer_of(name)
    suffix = name.split(".", 2)[2]
    if suffix not in _EXPRESSIBLE:
        raise ValueError(
            f"cannot export {name}: llama.cpp control vectors are added to the output of a layer "
            "(blocks.{l}.hook_resid_post = blocks.{l+1}.hook_resid_pre) only"
        )
    il = layer + _EXPRESSIBLE[suffix]
    if il < 1:
        raise ValueError(
            f"cannot export {name}: it is the output of layer {il}, and llama.cpp never steers "
            "the output of layer 0 (control vectors start at direction.1 = "
            "blocks.1.hook_resid_post = blocks.2.hook_resid_pre)"
        )
    return il


def _parts(steering: Any, strength: float) -> Iterator[tuple[ActAdd, float]]:
    """Each additive part with its total strength; anything else is refused."""
    to_actadd = getattr(steering, "steering", None)  # SCANS: its vectors as an ActAdd
    if not isinstance(steering, (ActAdd, Composition)) and callable(to_actadd):
        steering = to_actadd()
    if isinstance(steering, ActAdd):
        yield steering, strength
    elif isinstance(steering, Composition):
        for part, lam in steering.parts:
            yield from _parts(part, strength * lam)
    else:
        raise ValueError(
            f"cannot export a {type(steering).__name__}: a control vector is one fixed vector per "
            "layer, so only additive steerings (ActAdd, SCANS for a fixed sign, benign vectors, "
            "Compositions of them) can be exported; AlphaSteer's and ablation's updates depend "
            "on the activation"
        )


def control_directions(
    steering: Any,
    strength: float,
    *,
    positions: str = "all",
    n_layers: int | None = None,
) -> dict[int, Tensor]:
    """``{il: λ v}`` as llama.cpp will add them (float32, summed where parts share a layer)."""
    lam = check_strength(strength)
    if positions != "all":
        raise ValueError(
            f"cannot export steering at positions={positions!r}: llama.cpp adds a control vector "
            "at every position, prompt and generated tokens alike; pass positions='all' to "
            "export it with that meaning"
        )
    out: dict[int, Tensor] = {}
    for part, part_lam in _parts(steering, lam):
        scale = torch.tensor(part_lam, dtype=torch.float32)
        for i, layer in enumerate(part.layers):
            name = part.hook_name(layer)
            il = direction_index(name)
            if n_layers is not None and not layer < n_layers:
                raise ValueError(f"cannot export {name}: the model has {n_layers} layers")
            term = scale * part.vectors[i].detach().to("cpu", torch.float32)
            out[il] = term if il not in out else out[il] + term
    if not out:
        raise ValueError("nothing to export: the steering has no layers")
    for il, v in out.items():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"direction.{il}: strength × vector overflows float32")
    return dict(sorted(out.items()))


def to_control_vector(
    steering: Any,
    strength: float,
    path: str | Path,
    *,
    model_hint: str = "llama",
    positions: str = "all",
    n_layers: int | None = None,
) -> Path:
    """Write ``steering`` at ``strength`` as a llama.cpp control-vector GGUF at ``path``
    (atomically) and return the path. ``model_hint`` is llama.cpp's architecture name of the
    target model (``general.architecture`` of its GGUF: "llama" for Llama, Mistral, SmolLM2);
    ``n_layers`` checks the layers against the model. Load it in llama.cpp with
    ``--control-vector FILE`` (scale 1: the strength is already in the file)."""
    import gguf

    from alphasteer_lens.storage import atomic_write_bytes

    directions = control_directions(steering, strength, positions=positions, n_layers=n_layers)
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "control_vector.gguf"
        writer = gguf.GGUFWriter(str(staged), ARCH)
        writer.add_string(MODEL_HINT_KEY, model_hint)
        writer.add_uint32(LAYER_COUNT_KEY, len(directions))
        for il, v in directions.items():
            writer.add_tensor(f"direction.{il}", np.ascontiguousarray(v.numpy(), dtype="<f4"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        atomic_write_bytes(staged.read_bytes(), path)
    return path


def cvec_buffer(directions: dict[int, Tensor], n_layers: int) -> Tensor:
    """The flat float32 buffer ``llama_set_adapter_cvec`` takes: ``n_embd`` values per layer
    from layer 1 to ``n_layers − 1`` (row ``il − 1`` holds ``direction.{il}``, zeros elsewhere),
    as llama.cpp's own control-vector loader builds it."""
    if not directions:
        raise ValueError("no directions")
    width = {int(v.shape[-1]) for v in directions.values()}
    if len(width) != 1:
        raise ValueError(f"directions have different widths {sorted(width)}")
    bad = [il for il in directions if not 1 <= il < n_layers]
    if bad:
        raise ValueError(f"directions {bad} are outside layers 1..{n_layers - 1}")
    buf = torch.zeros(n_layers - 1, width.pop(), dtype=torch.float32)
    for il, v in directions.items():
        buf[il - 1] = v.float()
    return buf.reshape(-1)


def apply_control_vector(llm: Any, path: str | Path | None, scale: float = 1.0) -> None:
    """Set the control vector of a ``llama_cpp.Llama`` from a control-vector GGUF (``None``
    clears it), as llama.cpp's ``--control-vector-scaled FILE SCALE`` does: llama-cpp-python
    has the low-level call (``llama_set_adapter_cvec``) but no file loader."""
    import ctypes

    import llama_cpp

    apply: Any = getattr(llama_cpp, "llama_set_adapter_cvec", None)
    apply = apply or getattr(llama_cpp, "llama_apply_adapter_cvec")  # noqa: B009 (older releases)
    n_embd = int(llm.n_embd())
    if path is None:
        if apply(llm.ctx, None, 0, n_embd, -1, -1) != 0:
            raise RuntimeError("llama.cpp refused to clear the control vector")
        return
    from alphasteer_lens.benign_vectors import load_vector

    vector = load_vector(path)
    n_layers = int(llama_cpp.llama_model_n_layer(llm.model))
    if int(vector.vectors.shape[1]) != n_embd:
        raise ValueError(
            f"{path}: vectors have {vector.vectors.shape[1]} values, the model {n_embd}"
        )
    directions = control_directions(vector, scale, n_layers=n_layers)
    buf = np.ascontiguousarray(cvec_buffer(directions, n_layers).numpy(), dtype=np.float32)
    data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if apply(llm.ctx, data, buf.size, n_embd, 1, n_layers - 1) != 0:
        raise RuntimeError(
            f"llama.cpp refused the control vector {path} (n_embd {n_embd}, {n_layers} layers)"
        )


def export_command(
    vector: Path,
    out: Path,
    strength: float = 1.0,
    model_hint: str = "llama",
    positions: str = "all",
) -> None:
    """Write a steering vector file (a saved ActAdd artifact, a safetensors vector or a GGUF
    control vector) at ``strength`` as a llama.cpp control vector ``out``. llama.cpp steers
    every position, prompt and generated; AlphaSteer artifacts cannot be exported."""
    from alphasteer_lens.benign_vectors import load_vector

    steering = load_vector(vector)
    written = to_control_vector(steering, strength, out, model_hint=model_hint, positions=positions)
    layers = sorted(control_directions(steering, strength, positions=positions))
    print(f"wrote {written}: direction.{{{','.join(map(str, layers))}}} (strength {strength})")
