"""Benchmark 4: size of a saved AlphaSteer artifact (factored ``w``, ``r`` per layer) vs the
dense ``[L, d, d]`` float32 steering-matrix layout of the reference code.

At the SmolLM2 shape the dense file is written too (same safetensors writer), so its size is
measured, not computed; at the Llama-8B shape (2.1 GB) it is computed as ``L·d²·4`` bytes plus
the measured header of the small one.

    python benchmarks/bench_artifact.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from _common import machine, parser, setup

from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import save_steering
from alphasteer_lens.storage import atomic_save_safetensors

SHAPES = {"SmolLM2-135M": (30, 576), "Llama-3.1-8B": (32, 4096)}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args.threads)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        header = None
        for name, (n_layers, d) in SHAPES.items():
            g = torch.Generator().manual_seed(0)
            steering = AlphaSteer(
                tuple(range(n_layers)),
                w=torch.randn(n_layers, d, generator=g),
                r=torch.randn(n_layers, d, generator=g),
                leakage=(0.02,) * n_layers,
            )
            path = save_steering(steering, Path(tmp) / f"{name}.safetensors")
            ours = path.stat().st_size
            dense_bytes = n_layers * d * d * 4
            if header is None:
                dense_path = Path(tmp) / "dense.safetensors"
                atomic_save_safetensors(
                    {"M": torch.zeros(n_layers, d, d)}, dense_path, {"layers": list(range(30))}
                )
                dense = dense_path.stat().st_size
                header = dense - dense_bytes
                how = "written"
            else:
                dense = dense_bytes + header
                how = "computed"
            print(
                f"{name:13s} L={n_layers:2d} d={d:4d}: factored {ours / 1024:8.1f} KiB, dense "
                f"[L, d, d] float32 {dense / 2**20:8.1f} MiB ({how}), ratio {dense / ours:7.0f}x"
            )


if __name__ == "__main__":
    main()
