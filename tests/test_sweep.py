"""Sweeps: runs, resume, failures, the leaderboard, the coloured hierarchy and the engines."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from runtime import sweep
from runtime.data import DataError
from runtime.sweep import SweepError, SweepRun, leaderboard_rows, run_sweep
from taxonomy.cli import main
from taxonomy.hierarchy import parse_cell
from taxonomy.render import taxonomy_diagram, taxonomy_node_id

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot program is not installed")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'dssm[ray]')")

SIZES = "size mlp = 8\nsize rnn = 8\nsize inference = 8\n"
TINY_SPECS = {
    "tiny_hmm": "z[t] <- z[t-1]\nx[t] <- z[t]\n",
    "tiny_rssm": "z[t] <- z[1:t-1]\nx[t] <- z[1:t]\n",
}
DATASET = "synthetic:specs/tiny_hmm.dssm?n=6&T=4&seed=0"
# No z[t] <- z[t-1]: outside the hierarchy, so training it fails.
STATIC_SPEC = "model static\nlatent z : normal[2]\nobserved x : bernoulli[4]\nx[t] <- z[t]\n"


def write_spec(folder: Path, name: str, dependencies: str) -> str:
    path = folder / f"{name}.dssm"
    path.write_text(f"model {name}\nlatent z : normal[2]\nobserved x : bernoulli[4]\n"
                    f"{SIZES}{dependencies}", encoding="utf-8")
    return str(path.relative_to(folder.parent))


@pytest.fixture
def specs(tmp_path, monkeypatch) -> list[str]:
    """Two tiny specs in tmp_path/specs, with tmp_path as the working directory."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "specs"
    folder.mkdir()
    return [write_spec(folder, name, text) for name, text in TINY_SPECS.items()]


def sweep_tiny(specs: list[str], output: str = "sweep", **options):
    settings = {"epochs": 1, "seeds": 2, "options": {"batch_size": 5}, **options}
    return run_sweep(specs, DATASET, output, **settings)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def run_scores(output: Path, stem: str, guide: str = "full") -> list[float]:
    summaries = sorted((output / "runs").glob(f"{stem}-{guide}-iaf0-seed*/summary.json"))
    return [json.loads(path.read_text())["test_neg_elbo_per_step"] for path in summaries]


# --- a sweep in this process ----------------------------------------------------------------


def test_sweep_trains_every_run(specs):
    result = sweep_tiny(specs)

    names = sorted(path.name for path in Path("sweep/runs").iterdir())
    assert names == ["tiny_hmm-full-iaf0-seed0", "tiny_hmm-full-iaf0-seed1",
                     "tiny_rssm-full-iaf0-seed0", "tiny_rssm-full-iaf0-seed1"]
    assert len(result.trained) == 4
    assert result.skipped == []
    assert result.failed == []


def test_leaderboard_has_mean_and_sd_per_spec(specs):
    sweep_tiny(specs)

    rows = read_csv(Path("sweep/leaderboard.csv"))
    assert len(rows) == 2
    for row in rows:
        scores = run_scores(Path("sweep"), row["model"])
        assert float(row["test_neg_elbo_per_step_mean"]) == pytest.approx(statistics.mean(scores))
        assert float(row["test_neg_elbo_per_step_sd"]) == pytest.approx(statistics.stdev(scores))
        assert row["seeds_done"] == "2"
        assert row["status"] == "done"
    means = [float(row["test_neg_elbo_per_step_mean"]) for row in rows]
    assert means == sorted(means)
    assert [row["rank"] for row in rows] == ["1", "2"]
    cells = {row["model"]: row["cell"] for row in rows}
    assert cells == {"tiny_hmm": "HMM()", "tiny_rssm": "HMM(z<-z, x<-z)"}


def test_leaderboard_markdown_lists_each_row(specs):
    sweep_tiny(specs)

    text = Path("sweep/leaderboard.md").read_text(encoding="utf-8")
    rows = read_csv(Path("sweep/leaderboard.csv"))
    for row in rows:
        mean = float(row["test_neg_elbo_per_step_mean"])
        sd = float(row["test_neg_elbo_per_step_sd"])
        assert f"| {row['cell']} | {row['model']} | full, iaf 0 | {mean:.3f} ± {sd:.3f} | 2/2 |" \
            in text


def test_guide_and_iaf_lists_multiply_runs(specs):
    result = sweep_tiny(specs[:1], guides=["partial", "full"], iafs=[0, 1], seeds=1)

    names = sorted(run.name for run in result.trained)
    assert names == ["tiny_hmm-full-iaf0-seed0", "tiny_hmm-full-iaf1-seed0",
                     "tiny_hmm-partial-iaf0-seed0", "tiny_hmm-partial-iaf1-seed0"]
    rows = read_csv(Path("sweep/leaderboard.csv"))
    assert sorted((row["guide"], row["iaf"]) for row in rows) == [
        ("full", "0"), ("full", "1"), ("partial", "0"), ("partial", "1")]
    config = json.loads(Path("sweep/runs/tiny_hmm-partial-iaf1-seed0/config.json").read_text())
    assert (config["guide"], config["iaf"], config["seed"]) == ("partial", 1, 0)


# --- resume -------------------------------------------------------------------------------------


def count_train_runs(monkeypatch) -> list[tuple[SweepRun, dict]]:
    """Wrap sweep.train_run to record each run it trains, with the outcome."""
    calls = []
    original = sweep.train_run

    def counted(run, *arguments):
        outcome = original(run, *arguments)
        calls.append((run, outcome))
        return outcome

    monkeypatch.setattr(sweep, "train_run", counted)
    return calls


def test_resumed_sweep_skips_finished_runs(specs, monkeypatch):
    sweep_tiny(specs)
    calls = count_train_runs(monkeypatch)

    result = sweep_tiny(specs)

    assert calls == []
    assert len(result.skipped) == 4
    assert len(read_csv(Path("sweep/leaderboard.csv"))) == 2


def test_interrupted_run_resumes_from_checkpoint(specs, monkeypatch):
    sweep_tiny(specs)
    # A run killed during its test evaluation: trained, but without the test figure.
    summary_path = Path("sweep/runs/tiny_rssm-full-iaf0-seed1/summary.json")
    summary = json.loads(summary_path.read_text())
    del summary["test_neg_elbo_per_step"]
    summary_path.write_text(json.dumps(summary))
    calls = count_train_runs(monkeypatch)

    sweep_tiny(specs)

    assert [run.name for run, _ in calls] == ["tiny_rssm-full-iaf0-seed1"]
    assert calls[0][1]["status"] == "done"
    assert calls[0][1]["resumed"] is True
    assert "test_neg_elbo_per_step" in json.loads(summary_path.read_text())


def test_run_without_checkpoint_restarts_cleanly(specs, monkeypatch):
    # A run killed before its first epoch ended leaves config.json but no checkpoint.
    folder = Path("sweep/runs/tiny_hmm-full-iaf0-seed0")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "leftover.txt").write_text("from the killed start")
    calls = count_train_runs(monkeypatch)

    sweep_tiny(specs[:1], seeds=1)

    assert calls[0][1]["status"] == "done"
    assert calls[0][1]["resumed"] is False
    assert not (folder / "leftover.txt").exists()
    assert "test_neg_elbo_per_step" in json.loads((folder / "summary.json").read_text())


def test_resume_rejects_changed_epochs(specs):
    sweep_tiny(specs[:1], seeds=1)

    with pytest.raises(SweepError, match="epochs 1 \\(now 2\\)"):
        sweep_tiny(specs[:1], seeds=1, epochs=2)


def test_resume_rejects_changed_dropout(specs):
    sweep_tiny(specs[:1], seeds=1, options={"batch_size": 5, "dropout": 0.2})
    config = json.loads(Path("sweep/runs/tiny_hmm-full-iaf0-seed0/config.json").read_text())
    assert config["dropout"] == 0.2

    with pytest.raises(SweepError, match="dropout 0.2 \\(now None\\)"):
        sweep_tiny(specs[:1], seeds=1)


# --- failures -----------------------------------------------------------------------------------


def test_failed_run_is_recorded_and_sweep_continues(specs):
    outside = Path("specs/static.dssm")
    outside.write_text(STATIC_SPEC, encoding="utf-8")

    result = sweep_tiny([*specs, str(outside)])

    assert sorted(run.name for run in result.failed) == ["static-full-iaf0-seed0",
                                                         "static-full-iaf0-seed1"]
    rows = {row["model"]: row for row in read_csv(Path("sweep/leaderboard.csv"))}
    assert rows["static"]["status"] == "failed"
    assert rows["static"]["cell"] == "outside the hierarchy"
    assert rows["static"]["rank"] == ""
    assert "seeds 0, 1:" in rows["static"]["error"]
    assert "the latent does not evolve" in rows["static"]["error"]
    assert rows["tiny_hmm"]["status"] == "done"
    assert rows["tiny_rssm"]["status"] == "done"
    assert list(rows)[-1] == "static"
    manifest = json.loads(Path("sweep/sweep.json").read_text())
    assert manifest["runs"]["static-full-iaf0-seed0"]["status"] == "failed"
    assert "failed: seeds 0, 1:" in Path("sweep/leaderboard.md").read_text(encoding="utf-8")


def test_run_raising_an_unexpected_error_is_recorded(specs, monkeypatch):
    def broken_train_spec(spec, *arguments, **options):
        if "rssm" in spec:
            raise FloatingPointError("loss is NaN")
        return original(spec, *arguments, **options)

    import runtime.runs

    original = runtime.runs.train_spec
    monkeypatch.setattr(runtime.runs, "train_spec", broken_train_spec)

    result = sweep_tiny(specs, seeds=1)

    assert [run.name for run in result.failed] == ["tiny_rssm-full-iaf0-seed0"]
    entry = json.loads(Path("sweep/sweep.json").read_text())["runs"][result.failed[0].name]
    assert entry["error"] == "FloatingPointError: loss is NaN"
    assert "Traceback" in entry["details"]


def test_leaderboard_rows_average_the_finished_seeds(tmp_path):
    runs = [SweepRun("specs/a.dssm", "full", 0, seed) for seed in range(4)]
    scores = [1.0, 2.0, 4.0]
    for run, score in zip(runs, scores):
        folder = tmp_path / "runs" / run.name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(
            {"test_neg_elbo_per_step": score, "wall_seconds": 10.0 * score}))
    manifest = {"runs": {runs[3].name: {"status": "failed", "error": "NaN loss"}}}

    [row] = leaderboard_rows(runs, tmp_path, manifest)

    assert row["test_neg_elbo_per_step_mean"] == pytest.approx(7 / 3)
    assert row["test_neg_elbo_per_step_sd"] == pytest.approx(statistics.stdev(scores))
    assert row["wall_seconds_mean"] == pytest.approx(70 / 3)
    assert (row["seeds_done"], row["seeds"]) == (3, 4)
    assert row["status"] == "partial"
    assert row["error"] == "seed 3: NaN loss"
    assert row["rank"] == 1


def test_leaderboard_one_seed_has_no_sd(tmp_path):
    run = SweepRun("specs/a.dssm", "partial", 3, 0)
    folder = tmp_path / "runs" / run.name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"test_neg_elbo_per_step": 5.5}))

    [row] = leaderboard_rows([run], tmp_path, {"runs": {}})

    assert row["test_neg_elbo_per_step_mean"] == 5.5
    assert row["test_neg_elbo_per_step_sd"] is None
    assert row["status"] == "done"


# --- invalid sweeps ----------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"seeds": 0}, "--seeds must be at least 1"),
    ({"workers": 0}, "--workers must be at least 1"),
    ({"guides": ["aligned"]}, "unknown guide 'aligned'"),
    ({"iafs": [-1]}, "layer counts must be 0 or more"),
    ({"address": "10.0.0.1:6379"}, "add --engine ray"),
])
def test_invalid_sweep_options_raise(specs, options, message):
    with pytest.raises(SweepError, match=message):
        sweep_tiny(specs, **options)


def test_missing_spec_raises_before_training(specs):
    with pytest.raises(SweepError, match="specs/nothing.dssm: no such spec file or folder"):
        sweep_tiny([*specs, "specs/nothing.dssm"])
    assert not Path("sweep").exists()


def test_specs_sharing_a_stem_raise(specs):
    Path("specs/copy").mkdir()
    shutil.copy("specs/tiny_hmm.dssm", "specs/copy/tiny_hmm.dssm")

    with pytest.raises(SweepError, match="would share the run names tiny_hmm"):
        sweep_tiny(["specs"])


def test_unknown_dataset_raises_before_training(specs):
    with pytest.raises(DataError, match="unknown data set 'jbs'"):
        run_sweep(specs, "jbs", "sweep", epochs=1)
    assert not Path("sweep").exists()


def test_sweep_command_prints_leaderboard(specs, capsys):
    code = main(["sweep", specs[0], "--dataset", DATASET, "--epochs", "1", "--seeds", "1",
                 "--guide", "partial,full", "--iaf", "0", "--batch-size", "5",
                 "--out", "sweep"])

    output = capsys.readouterr()
    assert code == 0
    assert output.out.startswith(f"# Leaderboard: {DATASET}")
    assert "| tiny_hmm | partial, iaf 0 |" in output.out
    assert "| tiny_hmm | full, iaf 0 |" in output.out
    assert "[2/2] tiny_hmm-" in output.err
    assert "wrote sweep/leaderboard.csv" in output.err


def test_sweep_command_fails_when_a_run_fails(specs, capsys):
    Path("specs/static.dssm").write_text(STATIC_SPEC, encoding="utf-8")

    code = main(["sweep", "specs/static.dssm", "--dataset", DATASET, "--epochs", "1",
                 "--seeds", "1", "--out", "sweep"])

    output = capsys.readouterr()
    assert code == 1
    assert "static-full-iaf0-seed0: failed: specs/static.dssm:" in output.err
    assert "Traceback" not in output.err


def test_ray_engine_without_ray_says_how_to_install(specs, monkeypatch, capsys):
    # A None entry in sys.modules makes `import ray` raise ImportError.
    monkeypatch.setitem(sys.modules, "ray", None)

    with pytest.raises(SweepError, match=re.escape("pip install 'dssm[ray]'")):
        sweep_tiny(specs, engine="ray")

    code = main(["sweep", *specs, "--dataset", DATASET, "--epochs", "1", "--engine", "ray",
                 "--out", "sweep"])
    error = capsys.readouterr().err
    assert code == 1
    assert "pip install 'dssm[ray]'" in error
    assert "Traceback" not in error


# --- the coloured hierarchy --------------------------------------------------------------------


def node_attributes(source: str, node: str) -> str:
    """Return the attribute text of `node`'s statement in DOT source."""
    match = re.search(rf"^\s*{re.escape(node)} \[(.*)\]$", source, re.MULTILINE)
    assert match is not None, f"node {node} not in the DOT source"
    return match.group(1)


def fill_of(attributes: str) -> str:
    return re.search(r"fillcolor=\"?(#?\w+)", attributes).group(1)


def luminance(colour: str) -> float:
    red, green, blue = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def test_taxonomy_colours_scored_cells():
    low, high = parse_cell("HMM()"), parse_cell("AR-HMM(z<-z, x<-z, x<-x)")
    unscored = parse_cell("F-HMM(z<-x)")

    source = taxonomy_diagram({}, {low: 6.5, high: 8.25}, "test score").source

    low_fill = fill_of(node_attributes(source, taxonomy_node_id(low)))
    high_fill = fill_of(node_attributes(source, taxonomy_node_id(high)))
    assert fill_of(node_attributes(source, taxonomy_node_id(unscored))) == "white"
    assert low_fill not in ("white", high_fill)
    assert luminance(low_fill) < luminance(high_fill)
    assert "6.500" in node_attributes(source, taxonomy_node_id(low))
    assert "8.250" in node_attributes(source, taxonomy_node_id(high))
    assert "test score:" in source
    assert source.count("BGCOLOR=") == 9


def test_scores_replace_highlight_of_specs():
    scored, found_only = parse_cell("HMM(z<-z)"), parse_cell("HMM(x<-z)")

    source = taxonomy_diagram({scored: ["a"], found_only: ["b"]}, {scored: 1.0}).source

    assert fill_of(node_attributes(source, taxonomy_node_id(found_only))) == "white"
    assert fill_of(node_attributes(source, taxonomy_node_id(scored))) != "white"


def test_scored_finite_order_cell_is_drawn():
    finite = parse_cell("HMM(z<-z:2)")

    source = taxonomy_diagram({}, {finite: 3.0}).source

    assert "dashed" in node_attributes(source, taxonomy_node_id(finite))


def test_empty_scores_leave_every_cell_white():
    source = taxonomy_diagram({parse_cell("HMM()"): ["dmm"]}, {}, "test score").source

    assert "test score: no cell has a score" in source
    assert fill_of(node_attributes(source, taxonomy_node_id(parse_cell("HMM()")))) == "white"


def test_taxonomy_without_scores_is_unchanged():
    found = {parse_cell("HMM()"): ["dmm"]}

    assert taxonomy_diagram(found).source == taxonomy_diagram(found, None).source
    assert "BGCOLOR" not in taxonomy_diagram(found).source


@needs_dot
def test_sweep_draws_coloured_hierarchy(specs):
    sweep_tiny(specs)

    svg = Path("sweep/hierarchy.svg").read_text(encoding="utf-8")
    assert Path("sweep/hierarchy.png").stat().st_size > 0
    for row in read_csv(Path("sweep/leaderboard.csv")):
        assert f"{float(row['test_neg_elbo_per_step_mean']):.3f}" in svg
    assert "test negative ELBO per step" in svg


# --- parallel engines ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_match_one_worker(specs):
    sweep_tiny(specs, output="serial")

    result = sweep_tiny(specs, output="parallel", workers=2)

    assert result.failed == []
    for stem in TINY_SPECS:
        # Other processes may round float32 sums differently in the last digits.
        assert run_scores(Path("parallel"), stem) == pytest.approx(
            run_scores(Path("serial"), stem), rel=1e-5)


@pytest.mark.slow
@needs_ray
def test_ray_engine_matches_local_engine(specs):
    sweep_tiny(specs[:1], output="serial")

    result = sweep_tiny(specs[:1], output="ray", engine="ray", workers=1)

    assert result.failed == []
    assert run_scores(Path("ray"), "tiny_hmm") == pytest.approx(
        run_scores(Path("serial"), "tiny_hmm"), rel=1e-5)
    assert len(read_csv(Path("ray/leaderboard.csv"))) == 1
