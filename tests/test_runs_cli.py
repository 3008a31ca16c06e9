"""The run commands end to end: train, eval, sample and report on a tiny model."""

import json
import shutil
import os
from pathlib import Path

import mido
import pytest

from taxonomy.cli import main

MUSIC = Path(os.environ.get("DSSM_DATA_DIR", "/nonexistent"))
needs_music = pytest.mark.skipif(not (MUSIC / "jsb_chorales.pickle").is_file()
                                 and not (MUSIC / "JSB_Chorales.mat").is_file(),
                                 reason="JSB Chorales not found under DSSM_DATA_DIR")

TINY_ARSSM = """\
model TinyArSSM
latent   z : normal[2]
observed x : bernoulli[88]
deterministic h1[t] = gru[4](z[t])
deterministic h2[t] = gru[4](x[t])
z[t] <- h1[t-1]
x[t] <- h1[t], h2[t-1]
size mlp = 4
size inference = 4
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    spec = folder / "tiny.dssm"
    spec.write_text(TINY_ARSSM)
    run = folder / "tiny-jsb"
    status = main(["train", str(spec), "--dataset", "jsb", "--out", str(run), "--epochs", "1",
                   "--batch-size", "64", "--weight-decay", "0.01", "--dropout", "0.1",
                   "--threads", "1"])
    assert status == 0
    return run


@needs_music
def test_train_writes_run_and_test_figure(trained_run, capsys):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert summary["test_neg_elbo_per_step"] > 0
    assert (trained_run / "spec.dssm").is_file()
    config = json.loads((trained_run / "config.json").read_text())
    assert config["weight_decay"] == 0.01
    assert config["dropout"] == 0.1
    assert len((trained_run / "metrics.jsonl").read_text().splitlines()) == 1


@needs_music
def test_train_refuses_existing_run(trained_run, capsys):
    status = main(["train", str(trained_run / "spec.dssm"), "--dataset", "jsb",
                   "--out", str(trained_run), "--epochs", "1"])
    assert status == 1
    assert "--resume" in capsys.readouterr().err


@needs_music
def test_eval_records_nll(trained_run, capsys):
    assert main(["eval", str(trained_run), "--nll-samples", "2", "--threads", "1"]) == 0
    output = capsys.readouterr().out
    assert "test NLL per step" in output
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["test_nll_per_step"] > 0


@needs_music
def test_sample_writes_midi_and_png(trained_run, tmp_path):
    target = tmp_path / "sample.mid"
    assert main(["sample", str(trained_run), "--steps", "16", "--out", str(target)]) == 0
    assert target.is_file()
    assert target.with_suffix(".png").is_file()
    assert mido.MidiFile(target).length > 0


@needs_music
def test_report_tables_the_run(trained_run, tmp_path, capsys):
    assert main(["report", str(trained_run), "--out", str(tmp_path / "report")]) == 0
    assert trained_run.name in capsys.readouterr().out
    assert (tmp_path / "report" / "training_curves.png").is_file()


@needs_music
@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_eval_of_damaged_checkpoint_is_clear(trained_run, tmp_path, capsys, content):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    (copy / "checkpoint-best.pt").write_bytes(content)

    assert main(["eval", str(copy)]) == 1
    error = capsys.readouterr().err
    assert "checkpoint-best.pt: the file is damaged" in error
    assert "train the run for at least one epoch" not in error
    assert "weights_only" not in error
    assert "Traceback" not in error


@needs_music
def test_train_over_unfinished_run_is_clear(trained_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    (copy / "checkpoint-last.pt").unlink()

    assert main(["train", str(copy / "spec.dssm"), "--dataset", "jsb", "--out", str(copy),
                 "--epochs", "1"]) == 1
    error = capsys.readouterr().err
    assert "finished no epoch" in error
    assert "remove the folder or choose another --out" in error


def test_eval_of_missing_run_is_clear(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 1
    error = capsys.readouterr().err
    assert "not found" in error
    assert "Traceback" not in error


def test_interrupted_train_says_how_to_resume(monkeypatch, capsys):
    def interrupted(*arguments, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr("runtime.runs.train_spec", interrupted)

    assert main(["train", "specs/arssm.dssm", "--dataset", "jsb", "--out", "nowhere"]) == 130
    assert "interrupted; pass --resume" in capsys.readouterr().err
