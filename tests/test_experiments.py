"""The experiments layer without a model: config base, data resolution, layer choice, report
helpers, manifests, and the structure rules (library never imports experiments, one recipe)."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alphasteer_lens.experiments import config as C
from alphasteer_lens.experiments.audit import AuditConfig
from alphasteer_lens.experiments.compare import CompareConfig
from alphasteer_lens.experiments.data import DATA_ENV, Data
from alphasteer_lens.experiments.demo import DemoConfig
from alphasteer_lens.experiments.docs import main as docs_main
from alphasteer_lens.experiments.docs import stale_blocks
from alphasteer_lens.experiments.figures import FigureSettings
from alphasteer_lens.experiments.layers import best_window, candidate_layers, default_width
from alphasteer_lens.experiments.manifest import read_manifest
from alphasteer_lens.experiments.report import check_out_dir, markdown_table
from alphasteer_lens.experiments.scans import ScansConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "alphasteer_lens"
SHARED_DATA = REPO / ".." / "shared" / "data"
PIPELINE_CONFIGS = (DemoConfig, FigureSettings, CompareConfig, ScansConfig, AuditConfig)


# --- structure ------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_library_never_imports_experiments() -> None:
    for path in PACKAGE.glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("alphasteer_lens.experiments")}
        assert not bad, f"{path.name} imports {bad}"


def test_no_config_field_defined_twice() -> None:
    base = set(C.RunConfig.__annotations__)
    seen: dict[str, str] = {}
    for cls in PIPELINE_CONFIGS:
        own = set(cls.__annotations__) - {"QUICK"}
        assert not own & base, f"{cls.__name__} redefines {own & base}"
        for name in own:
            assert name not in seen, f"{name} in {seen.get(name)} and {cls.__name__}"
            seen[name] = cls.__name__
        assert set(cls.QUICK) <= {f.name for f in dataclasses.fields(cls)}, cls.__name__


def test_direction_recipe_written_once() -> None:
    users = {
        p.name
        for p in (PACKAGE / "experiments").glob("*.py")
        if "length_matched_indices" in p.read_text("utf-8")
        or "diff_in_means(" in p.read_text("utf-8")
    }
    assert users == {"recipe.py"}


# --- config ---------------------------------------------------------------------------------


def test_build_config_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("quick = true\nmax_new_tokens = 5\nlayers = [3, 4]\nstrengths = [1, 2]\n")
    cfg = C.build_config(DemoConfig, toml=toml, overrides={"max_new_tokens": 7, "seed": None})
    assert cfg.quick and cfg.max_new_tokens == 7  # flag over TOML over quick preset
    assert cfg.n_harmful_test == DemoConfig.QUICK["n_harmful_test"]  # preset under the rest
    assert cfg.layers == (3, 4) and cfg.strengths == (1.0, 2.0) and cfg.seed == 0
    assert C.build_config(DemoConfig).max_new_tokens == DemoConfig().max_new_tokens
    (tmp_path / "table.toml").write_text("[run]\nseed = 3\n")
    assert C.build_config(DemoConfig, toml=tmp_path / "table.toml").seed == 3


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("nope = 1\n", "unknown setting(s) ['nope']"),
        ('batch_size = "x"\n', "'batch_size' must be int"),
        ("ratio = 1.5\n", "ratio must be in (0, 1)"),
        ("layers = []\n", "layers must be non-empty"),
        ('prompt_format = "weird"\n', "--prompt-format must be"),
        ("seed = \n", "malformed TOML"),
        ('gate = "cosine"\n', "'gate' must be 'probe' or 'score'"),
        ("probe_c = 0\n", "probe_c must be 'cv' or a finite number > 0"),
        ("calibrated_strengths = []\n", "calibrated_strengths must be non-empty and >= 0"),
        ("calibrated_strengths = [1, -2]\n", "calibrated_strengths must be non-empty and >= 0"),
        ('probe_reads = "mean"\n', "'probe_reads' must be 'last' or 'last+mean', got 'mean'"),
        ("probe_c = inf\n", "probe_c must be 'cv' or a finite number > 0"),
        ('probe_c = "auto"\n', "config field 'probe_c' must be float or 'cv'"),
        (
            "[hf_datasets]\nharmbench = 5\n",
            "'hf_datasets' holds strings only, got {'harmbench': 5}",
        ),
    ],
)
def test_bad_settings_are_config_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(C.ConfigError) as err:
        C.build_config(DemoConfig, toml=path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_parsers() -> None:
    assert C.parse_layers("14-16,20") == (14, 15, 16, 20)
    assert C.parse_layers("auto") is None and C.parse_layers(None) is None
    assert C.parse_max_memory("0=20GiB, cpu=64GiB") == {"0": "20GiB", "cpu": "64GiB"}
    assert C.parse_floats("0.5,1", "--strengths") == (0.5, 1.0)
    for bad in (lambda: C.parse_layers("a-b"), lambda: C.parse_max_memory("20GiB")):
        with pytest.raises(C.ConfigError):
            bad()


def test_to_dict_round_trips() -> None:
    cfg = DemoConfig(layers=(1, 2), max_memory={"0": "1GiB"})
    again = C.build_config(DemoConfig, settings=json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


# --- data -----------------------------------------------------------------------------------


def test_data_from_a_directory_and_the_environment(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "harmbench.json").write_text(json.dumps(["Do a bad thing.", "Do worse."]))
    data = Data.from_dir(tmp_path)
    assert data.prompts("harmbench").prompts == ("Do a bad thing.", "Do worse.")  # dir first
    assert data.where("harmbench") == str(tmp_path / "harmbench.json")
    assert data.where("sensitive_benign") == "builtin"
    assert data.optional("alphasteer/borderline_val") is None
    (note,) = data.notes
    assert "'alphasteer/borderline_val' not found under" in note and "--data" in note
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert Data.from_dir(None).root == tmp_path
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(C.ConfigError, match=f"\\${DATA_ENV}"):
        Data.from_dir(None)
    with pytest.raises(C.ConfigError, match="--data"):
        Data.from_dir(tmp_path / "harmbench.json")


def test_hf_dataset_specs() -> None:
    assert C.parse_hf_dataset("walledai/HarmBench@standard:test:prompt") == C.HfDataset(
        "walledai/HarmBench", "standard", "test", "prompt"
    )
    assert C.parse_hf_dataset(" org/set ") == C.HfDataset("org/set", None, "train", None)
    assert C.parse_hf_datasets(["a=org/x:validation", "b = org/y"]) == {
        "a": "org/x:validation",
        "b": "org/y",
    }
    for bad in ("", "org/set:", "org/set::col", "org set", "org/set@", "a:b:c:d"):
        with pytest.raises(C.ConfigError, match="ID\\[@CONFIG\\]"):
            C.parse_hf_dataset(bad)
    with pytest.raises(C.ConfigError, match="hf_datasets|ID\\[@CONFIG"):
        C.RunConfig(hf_datasets={"harmbench": "org/set:train:prompt:extra"})


def test_data_from_a_hugging_face_dataset(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The real ``datasets`` library on a local dataset folder (what a hub id resolves to),
    offline; a file in the data directory wins; a set that cannot be loaded is an error."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "org_set"
    folder.mkdir()
    rows = [{"id": 1, "query": "Wrapped one?", "prompt": "x"}, {"id": 2, "query": "Two?"}]
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = Data.from_dir(None, {"jailbreak_train": f"{folder}:test:query"})
    ps = data.prompts("jailbreak_train")
    assert ps.prompts == ("Wrapped one?", "Two?") and ps.name == "jailbreak_train"
    assert data.where("jailbreak_train") == f"hf:{folder}[test]" == ps.source
    assert data.prompts("harmbench").source != ps.source  # unnamed sets: wheels, built-ins
    root = tmp_path / "dir"
    root.mkdir()
    (root / "jailbreak_train.json").write_text(json.dumps(["From the folder."]))
    first = Data.from_dir(root, {"jailbreak_train": f"{folder}:test:query"})
    assert first.prompts("jailbreak_train").prompts == ("From the folder.",)
    missing = Data.from_dir(None, {"jailbreak_train": f"{tmp_path / 'absent'}:test"})
    with pytest.raises(C.ConfigError, match="for prompt set 'jailbreak_train': cannot load it"):
        missing.load_hf()  # what the pipelines run before the model loads
    with pytest.raises(C.ConfigError, match="for prompt set 'jailbreak_train': cannot load it"):
        missing.optional("jailbreak_train")  # named by the user: an error, not a note
    wrong = Data.from_dir(None, {"jailbreak_train": f"{folder}:test:text"})
    with pytest.raises(C.ConfigError, match="column 'text' not in"):
        wrong.prompts("jailbreak_train")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared/data is not beside the clone")
def test_shared_data_through_data_dir() -> None:
    data = Data.from_dir(SHARED_DATA)
    border = data.prompts("alphasteer/borderline_val", column="query")
    alpaca = data.eval_set("alphasteer/alpaca_eval", prompt="instruction", reference="output")
    assert len(border) > 10 and alpaca is not None and alpaca.references is not None
    assert data.notes == []


# --- layer choice ---------------------------------------------------------------------------


def test_candidate_layers_skip_the_top_share() -> None:
    assert candidate_layers(30) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    assert candidate_layers(30, stride=1)[-1] == 23
    assert candidate_layers(3) == [0, 1] and candidate_layers(1) == [0]
    assert default_width(30) == 5 and default_width(3) == 1


def test_best_window() -> None:
    table = pd.DataFrame({"layer": [0, 2, 4, 6, 8], "objective": [0.0, 1.0, 3.0, 2.5, -1.0]})
    assert best_window(table, 3, 10) == (3, 4, 5)  # candidates 4 and 6 inside: mean 2.75
    assert best_window(table, 1, 10) == (4,)
    assert best_window(table, 20, 4) == (0, 1, 2, 3)
    assert best_window(table[table.layer >= 2], 20, 6) == (2, 3, 4, 5)


def test_best_window_one_standard_error_rule() -> None:
    """Brute force over every window: the earliest whose mean is ≥ best − its standard error."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        layers = sorted(rng.choice(20, size=n, replace=False).tolist())
        obj, se = rng.normal(size=n), rng.uniform(0, 0.8, size=n)
        table = pd.DataFrame({"layer": layers, "objective": obj, "objective_se": se})
        width, top = int(rng.integers(1, 6)), 20
        w = min(width, top - layers[0])
        means = {}
        for s in range(layers[0], top - w + 1):
            inside = [i for i, x in enumerate(layers) if s <= x < s + w]
            if inside:
                means[s] = (obj[inside].mean(), se[inside].mean())
        best = max(means, key=lambda s: (means[s][0], -s))
        want = min(s for s in means if means[s][0] >= means[best][0] - means[best][1])
        assert best_window(table, width, top, one_se=True) == tuple(range(want, want + w))
        assert best_window(table, width, top) == tuple(range(best, best + w))
    flat = pd.DataFrame({"layer": [2, 4, 6], "objective": [0.5, 0.9, 1.0], "objective_se": 0.2})
    assert best_window(flat, 1, 8, one_se=True) == (4,)  # 0.9 ≥ 1.0 − 0.2 > 0.5
    assert best_window(flat, 1, 8) == (6,)


def test_choose_strength_on_validation() -> None:
    """Brute force on random sweeps: the λ with the most harmful refusal among those within the
    benign budget (smallest λ on ties; smallest λ overall when none fits), per method; ActAdd's
    λ is the one nearest AlphaSteer's harmful refusal."""
    from alphasteer_lens.experiments.recipe import choose_strength, choose_strengths

    rng = np.random.default_rng(1)
    grid = (0.25, 0.5, 1.0, 1.5, 2.0)
    for _ in range(300):
        rows = [{"method": "vanilla", "strength": 0.0, "harmful_refusal": 0.0,
                 "benign_refusal": float(rng.choice([0.0, 0.05]))}]  # fmt: skip
        for m in ("alphasteer", "actadd", "alphasteer_calibrated"):
            h = rng.choice([0.1, 0.5, 0.9], size=len(grid))  # ties happen
            b = rng.choice([0.0, 0.02, 0.05, 0.2], size=len(grid))
            order = rng.permutation(len(grid))  # rows in any order
            rows += [{"method": m, "strength": grid[i], "harmful_refusal": float(h[i]),
                      "benign_refusal": float(b[i])} for i in order]  # fmt: skip
        sweep = pd.DataFrame(rows)
        base = rows[0]["benign_refusal"]
        for m in ("alphasteer", "alphasteer_calibrated"):
            mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["strength"])
            ok = [r for r in mine if r["benign_refusal"] <= base + 0.03 + 1e-12] or mine[:1]
            top = max(r["harmful_refusal"] for r in ok)
            want = min(r["strength"] for r in ok if r["harmful_refusal"] == top)
            assert choose_strength(sweep, 0.03, m) == want
        lam_a, lam_act = choose_strengths(sweep, 0.03)
        target = next(r["harmful_refusal"] for r in rows
                      if r["method"] == "alphasteer" and r["strength"] == lam_a)  # fmt: skip
        act = sorted((r for r in rows if r["method"] == "actadd"), key=lambda r: r["strength"])
        gaps = [abs(r["harmful_refusal"] - target) for r in act]
        assert lam_act == act[gaps.index(min(gaps))]["strength"]  # the first: the smallest λ
    with pytest.raises(ValueError, match="no rows for 'cast'"):
        choose_strength(sweep, 0.03, "cast")


# --- report helpers and manifests -----------------------------------------------------------


def test_markdown_table() -> None:
    df = pd.DataFrame({"a": [0.12345, float("nan")], "b": ["x", "y"]}, index=["r1", "r2"])
    assert markdown_table(df).splitlines() == [
        "|  | a | b |",
        "|---|---|---|",
        "| r1 | 0.123 | x |",
        "| r2 |  | y |",
    ]
    assert markdown_table(df, index=False, digits=1).splitlines()[2] == "| 0.1 | x |"
    multi = df.set_index("b", append=True)
    assert multi.pipe(markdown_table).splitlines()[0] == "|  | b | a |"


def test_check_out_dir(tmp_path: Path) -> None:
    assert check_out_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(C.ConfigError, match="--force"):
        check_out_dir(tmp_path)
    assert check_out_dir(tmp_path, force=True) == tmp_path
    assert check_out_dir(tmp_path, resume=True) == tmp_path
    with pytest.raises(C.ConfigError, match="not a directory"):
        check_out_dir(tmp_path / "manifest.json")


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(C.ConfigError, match="not found"):
        read_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("[1]")
    with pytest.raises(C.ConfigError, match="not an alphasteer-lens manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"command": "demo", "config": {"seed": 1}}))
    assert read_manifest(tmp_path) == ("demo", {"seed": 1})


# --- generated doc tables -------------------------------------------------------------------


def test_generated_doc_tables_match_their_reports() -> None:
    docs = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
    assert [s for d in docs for s in stale_blocks(d)] == []


def test_generated_blocks_are_checked_and_rewritten(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    report = {"methods": {"vanilla": {"strength": 0.0, "harmful_refusal_rate": 0.25}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    doc = tmp_path / "README.md"
    doc.write_text(
        "intro\n<!-- generated: demo report.json -->\n| old |\n<!-- end generated -->\nend\n"
    )
    assert stale_blocks(doc) == [f"{doc}: demo report.json"]
    assert docs_main([str(doc)]) == 1 and docs_main(["--write", str(doc)]) == 0
    assert stale_blocks(doc) == [] and "| vanilla | 0.000 | 0.250 |" in doc.read_text()
    assert doc.read_text().startswith("intro\n") and doc.read_text().endswith("end\n")
