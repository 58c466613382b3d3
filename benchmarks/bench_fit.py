"""Benchmark 3: AlphaSteer fit time vs the dense reference formulation, and vs its floor.

Per layer, on the same synthetic activations: ``AlphaSteer.fit`` (the Gram matrix's lower triangle
by BLAS syrk, its eigh, then a k×k Cholesky solve, leakage from the eigenvalues, stored factored as
w rᵀ) against ``dense_reference_fit`` (SVD of the Gram
matrix, dense P, d×d pinv, as the reference code does), at d = 576 (SmolLM2) and d = 4096
(Llama-8B). The floor is one ``torch.linalg.eigh`` of the d×d Gram matrix. The fit's own steps
are timed too, to say where its time goes. Results must agree to 1e-6 relative.

Synthetic activations: benign rows span a (d − k)-dimensional signal subspace plus small noise,
so the k-dimensional null space is well separated; malicious rows add a component inside it.

    python benchmarks/bench_fit.py [--repeats 11] [--threads 1] [--dims 576,4096]

At d = 4096 every variant runs once (a few minutes on one core).
"""

from __future__ import annotations

import torch
from _common import interleaved, machine, median, parser, setup, spread, timed

from alphasteer_lens.alphasteer import AlphaSteer, dense_reference_fit, fit_steering_weights
from alphasteer_lens.nullspace import gram_lower, null_space


def activations(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = d // 2
    nb, nm = d + d // 4, max(256, d // 4)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    signal, null = basis[:, : d - k], basis[:, d - k :]
    scale = torch.linspace(3.0, 0.5, d - k, dtype=torch.float64)
    hb = (torch.randn(nb, d - k, generator=g, dtype=torch.float64) * scale) @ signal.T
    hb += 1e-3 * torch.randn(nb, d, generator=g, dtype=torch.float64)
    hm = (torch.randn(nm, d - k, generator=g, dtype=torch.float64) * scale) @ signal.T
    hm += 0.5 * torch.randn(nm, k, generator=g, dtype=torch.float64) @ null.T + null[:, 0]
    r = torch.randn(d, generator=g, dtype=torch.float64)
    return hb, hm, r


def bench(d: int, repeats: int, ref_repeats: int) -> None:
    hb, hm, r = activations(d)
    gram = hb.T @ hb

    last: list[AlphaSteer] = []

    def ours() -> AlphaSteer:
        last[:] = [AlphaSteer.fit({0: hb}, {0: hm}, {0: r}, ratio=0.5, alpha=10.0)]
        return last[0]

    times = interleaved(
        {"alphasteer_fit": ours, "eigh_floor": lambda: torch.linalg.eigh(gram)},
        repeats,
        warmup=d < 2048,
    )
    ref_times, dense = [], None
    for _ in range(ref_repeats):
        t, dense = timed(lambda: dense_reference_fit(hb, hm, r, ratio=0.5, alpha=10.0))
        ref_times.append(t)
    assert dense is not None
    # the fit's other steps (its eigh is the floor, timed above)
    ns = null_space(hb, ratio=0.5)
    steps: dict[str, list[float]] = {"gram": [], "k x k solve": [], "leakage": []}
    for _ in range(repeats):
        steps["gram"].append(timed(lambda: gram_lower(hb))[0])
        steps["k x k solve"].append(timed(lambda: fit_steering_weights(ns, hm, alpha=10.0))[0])
        steps["leakage"].append(timed(lambda: ns.leakage)[0])
    w64 = fit_steering_weights(ns, hm, alpha=10.0)
    stored = last[0]
    norm = torch.linalg.matrix_norm(dense)
    rel64 = (torch.linalg.matrix_norm(dense - torch.outer(w64, r)) / norm).item()
    w32 = stored.w[0].double()
    rel32 = (torch.linalg.matrix_norm(dense - torch.outer(w32, stored.r[0].double())) / norm).item()
    fit_t, floor_t, ref_t = (
        median(times["alphasteer_fit"]),
        median(times["eigh_floor"]),
        median(ref_times),
    )
    print(f"--- d = {d}: {hb.shape[0]} benign, {hm.shape[0]} malicious rows, k = {d // 2}")
    print(f"alphasteer_fit     {spread(times['alphasteer_fit'])}")
    print(f"eigh_floor         {spread(times['eigh_floor'])}")
    print(f"dense_reference    {spread(ref_times)}")
    print(f"speed-up vs dense reference: {ref_t / fit_t:.1f}x")
    print(f"fit time / eigh floor: {fit_t / floor_t:.2f}x")
    parts = {"eigh": floor_t, **{name: median(ts) for name, ts in steps.items()}}
    parts["validation, copies"] = max(0.0, fit_t - sum(parts.values()))
    print(
        "where the fit's time goes: "
        + ", ".join(f"{name} {t:.3f} s ({100 * t / fit_t:.0f}%)" for name, t in parts.items())
    )
    print(
        f"relative difference ||M_dense - w r^T||_F / ||M_dense||_F: float64 w {rel64:.1e}, "
        f"stored float32 w, r {rel32:.1e} (target <= 1e-6)"
    )


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=11)
    p.add_argument("--dims", default="576,4096")
    p.add_argument("--ref-repeats", type=int, default=0, help="0: 3 below d=2048, 1 above")
    args = p.parse_args()
    setup(args.threads)
    print(f"machine: {machine()}")
    for d in (int(x) for x in args.dims.split(",")):
        ref_repeats = args.ref_repeats or (3 if d < 2048 else 1)
        bench(d, args.repeats if d < 2048 else 1, ref_repeats)


if __name__ == "__main__":
    main()
