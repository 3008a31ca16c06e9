"""`dssm resynth`: teacher-forced reconstruction of whole utterances, WAV output and scores."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from runtime import resynth, runs
from runtime.data import DataWarning
from runtime.resynth import (FileScores, held_out_files, mel_filterbank, output_names,
                             resynthesize_run, score_statistics)
from runtime.speech import load_utterance
from runtime.trainer import default_config
from taxonomy.cli import main

REPO = Path(__file__).resolve().parent.parent


def _speech_dir() -> Path:
    # The speech data sits beside the music data that CI names in DSSM_DATA_DIR.
    configured = os.environ.get("DSSM_DATA_DIR")
    music = Path(configured) if configured else Path("../shared/data/music")
    music = music if music.is_absolute() else (REPO / music).resolve()
    return music.parent / "speech" / "librispeech"


SPEECH_DIR = _speech_dir()
# Six short files from six speakers: the speaker split gives train 4, valid 1, test 1.
TINY_FILES = ["train-clean-100/1447-130550-0000.flac", "train-clean-100/403-126855-0000.flac",
              "train-clean-100/19-198-0000.flac", "dev-clean/84-121123-0007.wav",
              "train-clean-100/328-129766-0000.flac", "dev-clean/2412-153947-0000.wav"]
needs_speech = pytest.mark.skipif(
    not all((SPEECH_DIR / name).is_file() for name in TINY_FILES),
    reason=f"the LibriSpeech files are not in {SPEECH_DIR}")

# The speech ArSSM shrunk to a 4-dimensional latent and 8-unit networks.
TINY_SPEC = """\
model ArSSM_tiny

latent   z : normal[4]
observed x : exponential[513]

deterministic h1[t] = gru[8](z[t])
deterministic h2[t] = gru[8](x[t])

z[t] <- h1[t-1]
x[t] <- h1[t], h2[t-1]

size mlp = 8
size inference = 8
guide full
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Train the tiny spec for one epoch on six LibriSpeech files; return (run, audio folder)."""
    folder = tmp_path_factory.mktemp("tiny")
    audio = folder / "audio"
    for name in TINY_FILES:
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SPEECH_DIR / name, audio / name)
    spec = folder / "tiny.dssm"
    spec.write_text(TINY_SPEC, encoding="utf-8")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSSM_CACHE_DIR", str(folder / "cache"))
        runs.train_spec(str(spec), f"speech:{audio}", str(folder / "run"),
                        {"epochs": 1, "threads": 1}, evaluate_test=False, progress=False)
    return folder / "run", audio


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSSM_CACHE_DIR", str(tmp_path / "cache"))


def run_resynth(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(["resynth", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_run_config(run: Path, dataset: str) -> Path:
    """Write the config.json of an untrained run on `dataset`; enough for the checks before loading."""
    run.mkdir(parents=True)
    family = "exponential" if dataset.startswith("speech:") else "bernoulli"
    config = default_config(family, dataset=dataset)
    (run / "config.json").write_text(json.dumps(config.to_dict()), encoding="utf-8")
    return run


def read_scores(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# Pieces that need no data.

def test_mel_filterbank_covers_every_band():
    filters = mel_filterbank(80, 1024, 16000)

    assert filters.shape == (80, 513)
    assert (filters >= 0).all()
    assert filters.max() <= 1.0
    assert (filters.max(axis=1) > 0.5).all()
    # Centres rise with the band index, and the top band ends at the Nyquist bin.
    assert (np.diff(filters.argmax(axis=1)) >= 0).all()
    assert filters[:, -1].sum() == pytest.approx(0.0)
    assert filters[-1, -2] > 0


def test_mel_filterbank_maps_rising_tones_to_rising_bands():
    filters = mel_filterbank(80, 1024, 16000)
    # A unit of power in one bin from bin 1 (15.6 Hz) to bin 511 (7984 Hz).
    tones = np.eye(513)[1:512]

    band = np.concatenate([[-1], (tones @ filters.T).argmax(axis=1)])

    assert (np.diff(band[1:]) >= 0).all()
    assert band[1] == 0
    assert band[511] == 79
    # The mel scale is finer at low frequencies: 4 bins near 100 Hz span more
    # bands than 4 bins near 7 kHz.
    assert band[8] - band[4] > band[452] - band[448]


def test_output_names_use_stems_unless_repeated(tmp_path):
    files = [tmp_path / "a" / "1-2-3.flac", tmp_path / "b" / "same.flac",
             tmp_path / "c" / "same.wav"]

    names = output_names(files, tmp_path)

    assert names == ["1-2-3.wav", "b__same.flac.wav", "c__same.wav.wav"]


def test_score_statistics_skip_missing_scores():
    files = [FileScores("a", "a.wav", 1.0, sisdr_db=1.0, pesq=None, estoi=0.5),
             FileScores("b", "b.wav", 1.0, sisdr_db=2.0, pesq=None, estoi=0.7),
             FileScores("c", "c.wav", 1.0, sisdr_db=6.0, pesq=None, estoi=None)]

    statistics = score_statistics(files)

    assert statistics["sisdr_db"] == {"mean": 3.0, "median": 2.0, "files": 3}
    assert statistics["pesq"] == {"mean": None, "median": None, "files": 0}
    assert statistics["estoi"]["mean"] == pytest.approx(0.6)
    assert statistics["estoi"]["files"] == 2


def test_pesq_failure_recorded_as_null_naming_file(caplog):
    pytest.importorskip("pesq")
    scorer = resynth.pesq_scorer()
    scores = FileScores("dev/short.flac", "short.wav", 0.1)
    short = np.sin(np.arange(1600) / 5.0)

    with caplog.at_level(logging.WARNING, logger="dssm.resynth"):
        resynth._score(scores, "pesq", scorer, short, short, 16000)

    assert scores.pesq is None
    assert "dev/short.flac: no PESQ score" in caplog.text


def test_estoi_of_too_short_input_recorded_as_null(caplog):
    pytest.importorskip("pystoi")
    scorer = resynth.estoi_scorer()
    scores = FileScores("dev/short.flac", "short.wav", 0.1)
    short = np.sin(np.arange(1600) / 5.0)

    with caplog.at_level(logging.WARNING, logger="dssm.resynth"):
        resynth._score(scores, "estoi", scorer, short, short, 16000)

    assert scores.estoi is None
    assert "dev/short.flac: no ESTOI score" in caplog.text


def test_resynth_rejects_music_run(tmp_path, capsys):
    run = write_run_config(tmp_path / "run", "jsb")

    code, _, err = run_resynth(capsys, str(run), "--audio", str(tmp_path), "--out",
                               str(tmp_path / "out"))

    assert code == 1
    assert "trained on jsb, not on speech" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


# A trained tiny run on real speech.

@needs_speech
@pytest.mark.slow
def test_resynth_writes_wavs_scores_and_summary(tiny_run, tmp_path, capsys):
    run, audio = tiny_run
    out = tmp_path / "out"

    code, stdout, err = run_resynth(capsys, str(run), "--audio", str(audio), "--out", str(out))

    assert code == 0, err
    test_files = held_out_files(audio, "test")
    assert len(test_files) == 1
    for path in test_files:
        wav = out / f"{path.stem}.wav"
        samples, rate = soundfile.read(wav)
        assert rate == 16000
        assert len(samples) == len(load_utterance(path).waveform)
        assert np.isfinite(samples).all()
        assert np.abs(samples).max() > 0
        assert (out / f"{path.stem}.png").stat().st_size > 10_000

    rows = read_scores(out / "scores.csv")
    assert [row["file"] for row in rows] == [path.relative_to(audio).as_posix()
                                              for path in test_files]
    assert all(float(row["sisdr_db"]) < 30 for row in rows)

    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    for key in ("sisdr_db", "pesq", "estoi"):
        assert set(summary[key]) == {"mean", "median", "files"}
    assert summary["sisdr_db"]["mean"] == pytest.approx(float(rows[0]["sisdr_db"]))
    assert summary["resynth"]["split"] == "test"
    assert summary["resynth"]["files"] == 1
    assert "best_valid_neg_elbo_per_step" in summary
    assert "test SI-SDR (dB): mean" in stdout


@pytest.fixture(scope="module")
def perfect_result(tiny_run, tmp_path_factory):
    """Resynthesise two files with `reconstruct` returning the true power."""
    run, audio = tiny_run
    load_trained_model = runs.load_trained_model

    def load_with_true_power(*arguments, **keywords):
        model, config, data = load_trained_model(*arguments, **keywords)
        model.reconstruct = lambda x, mask, num_samples=1: x
        return model, config, data

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSSM_CACHE_DIR", str(run.parent / "cache"))
        patch.setattr(runs, "load_trained_model", load_with_true_power)
        return resynthesize_run(run, audio, tmp_path_factory.mktemp("perfect"), split="train",
                                limit=2, progress=False)


@needs_speech
@pytest.mark.slow
def test_perfect_reconstruction_sisdr_above_30_db(perfect_result):
    assert len(perfect_result.files) == 2
    for scores in perfect_result.files:
        assert scores.sisdr_db > 30


@needs_speech
@pytest.mark.slow
def test_perfect_reconstruction_pesq_and_estoi_near_maximum(perfect_result):
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")

    for scores in perfect_result.files:
        assert scores.pesq > 4.0
        assert scores.estoi > 0.99


@needs_speech
@pytest.mark.slow
def test_missing_pesq_records_null_and_names_install(tiny_run, tmp_path, capsys, caplog,
                                                     monkeypatch):
    run, audio = tiny_run
    out = tmp_path / "out"
    # A None entry in sys.modules makes `import pesq` raise ImportError.
    monkeypatch.setitem(sys.modules, "pesq", None)

    with caplog.at_level(logging.WARNING, logger="dssm.resynth"):
        code, stdout, err = run_resynth(capsys, str(run), "--audio", str(audio), "--out",
                                        str(out), "--limit", "1")

    assert code == 0, err
    assert "pip install pesq" in caplog.text
    assert "test PESQ: not computed" in stdout
    rows = read_scores(out / "scores.csv")
    assert len(rows) == 1
    assert rows[0]["pesq"] == ""
    assert float(rows[0]["sisdr_db"]) < 30
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["pesq"] == {"mean": None, "median": None, "files": 0}
    assert summary["sisdr_db"]["files"] == 1


@needs_speech
@pytest.mark.slow
def test_corrupt_audio_file_skipped_with_its_name(tiny_run, tmp_path, capsys):
    run, audio = tiny_run
    folder = tmp_path / "audio"
    shutil.copytree(audio, folder)
    corrupt = folder / "dev-clean" / "911-1-0000.flac"
    corrupt.write_bytes(b"fLaC" + bytes(200))

    with pytest.warns(DataWarning, match="911-1-0000.flac: cannot be decoded as audio"):
        code, _, err = run_resynth(capsys, str(run), "--audio", str(folder), "--out",
                                   str(tmp_path / "out"), "--limit", "1")

    assert code == 0, err
    assert "Traceback" not in err
    assert len(read_scores(tmp_path / "out" / "scores.csv")) == 1


def test_folder_of_only_corrupt_files_is_an_error(tmp_path, capsys):
    run = write_run_config(tmp_path / "run", "speech:elsewhere")
    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "911-1-0000.wav").write_bytes(b"RIFF" + bytes(40))

    with pytest.warns(DataWarning):
        code, _, err = run_resynth(capsys, str(run), "--audio", str(folder), "--out",
                                   str(tmp_path / "out"))

    assert code == 1
    assert "911-1-0000.wav" in err
    assert "Traceback" not in err


def test_limit_below_one_is_an_error(tmp_path, capsys):
    run = write_run_config(tmp_path / "run", "speech:elsewhere")

    code, _, err = run_resynth(capsys, str(run), "--audio", str(tmp_path), "--out",
                               str(tmp_path / "out"), "--limit", "0")

    assert code == 1
    assert "--limit must be at least 1, not 0" in err
