"""Resynthesise held-out speech through a trained run and score the result.

Each file's whole power spectrogram (not the 50-frame training sequences) goes
through `model.reconstruct` in one batch of one, with x teacher-forced. For
the exponential emission the output is the expected power in every bin. The
square root of that power, with the original STFT phase, is inverted by
`runtime.speech.istft` to a waveform of the trimmed original's length.

Scores compare that waveform with the trimmed, peak-normalised original:
SI-SDR (`runtime.metrics.si_sdr`), wide-band PESQ (the `pesq` package) and
ESTOI (the `pystoi` package). Both packages are optional (`pip install
-e .[speech]`); a missing one is reported, and its scores are recorded as null.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyro
import soundfile
import torch
from tqdm import tqdm

from runtime.data import SPEECH_PREFIX, load_dataset
from runtime.evaluate import EvaluationError, _read_config
from runtime.metrics import si_sdr
from runtime.speech import DEFAULT_SETTINGS, istft, load_utterance
from runtime.trainer import update_summary
from taxonomy.writing import write_bytes_atomically, write_text_atomically

log = logging.getLogger("dssm.resynth")

SPLITS = ("train", "valid", "test")
SCORES_FILE = "scores.csv"
N_MELS = 80
# The dynamic range drawn in the mel spectrogram pictures, in dB below the original's peak.
PICTURE_RANGE_DB = 80.0
# Summary keys of the three scores, each {"mean", "median", "files"}.
SCORE_KEYS = ("sisdr_db", "pesq", "estoi")


@dataclass
class FileScores:
    """One resynthesised file and its scores; a score is None where it could not be computed.

    :param str file: the input's path relative to the audio folder.
    :param str output: the WAV file's name inside the output folder.
    :param float seconds: the trimmed waveform's duration.
    :param float sisdr_db: SI-SDR in dB.
    :param float pesq: wide-band PESQ (MOS-LQO, about 1.0 to 4.6).
    :param float estoi: extended STOI, 0 to 1.
    """

    file: str
    output: str
    seconds: float
    sisdr_db: float | None = None
    pesq: float | None = None
    estoi: float | None = None


class ResynthesisResult(NamedTuple):
    """The files `resynthesize_run` writes and the statistics it records in summary.json.

    :param list files: one `FileScores` per resynthesised file, in input order.
    :param dict statistics: for each key in SCORE_KEYS, {"mean", "median",
        "files"}; mean and median are None when no file has that score.
    :param Path output: the output folder.
    :param Path scores: the per-file CSV.
    """

    files: list[FileScores]
    statistics: dict[str, dict[str, Any]]
    output: Path
    scores: Path


# Choosing and reconstructing files.

def held_out_files(audio_dir: str | os.PathLike, split: str = "test") -> list[Path]:
    """Return the audio files of `split` under `audio_dir`, split by speaker as for training.

    The data layer leaves out unusable files (corrupt, silent, too short)
    with a DataWarning naming each, so the split is the one a run trained on
    `speech:audio_dir` holds out.
    """
    if split not in SPLITS:
        raise EvaluationError(f"unknown split '{split}'; choose train, valid or test")
    return list(load_dataset(f"{SPEECH_PREFIX}{audio_dir}").files[split])


def reconstruct_power(model, power: np.ndarray, device: torch.device) -> np.ndarray:
    """Return the model's teacher-forced reconstruction of a whole (T, bins) spectrogram.

    The spectrogram is one batch of one sequence with every step real.
    Negative values, possible only under a normal emission, are set to 0 so
    that their square root is a magnitude.
    """
    x = torch.from_numpy(np.ascontiguousarray(power, dtype=np.float32))[None].to(device)
    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=device)
    with torch.no_grad():
        reconstruction = model.reconstruct(x, mask, num_samples=1)
    return reconstruction[0].detach().cpu().numpy().clip(min=0.0)


# Scores.

def _optional_scorers() -> dict[str, Callable[[np.ndarray, np.ndarray, int], float] | None]:
    """Return the PESQ and ESTOI functions, or None for a package that is not installed."""
    return {"pesq": pesq_scorer(), "estoi": estoi_scorer()}


def pesq_scorer() -> Callable[[np.ndarray, np.ndarray, int], float] | None:
    """Return wide-band PESQ(reference, estimate, rate), or None with a warning when pesq is missing."""
    try:
        import pesq
    except ImportError:
        log.warning("PESQ is not computed because the pesq package is not installed; "
                    "install it with 'pip install pesq' or 'pip install -e .[speech]'")
        return None
    return lambda reference, estimate, rate: float(pesq.pesq(rate, reference, estimate, "wb"))


def estoi_scorer() -> Callable[[np.ndarray, np.ndarray, int], float] | None:
    """Return ESTOI(reference, estimate, rate), or None with a warning when pystoi is missing."""
    try:
        import pystoi
    except ImportError:
        log.warning("ESTOI is not computed because the pystoi package is not installed; "
                    "install it with 'pip install pystoi' or 'pip install -e .[speech]'")
        return None
    return lambda reference, estimate, rate: _estoi(pystoi, reference, estimate, rate)


def _estoi(pystoi, reference: np.ndarray, estimate: np.ndarray, rate: int) -> float:
    # pystoi 0.4 warns and returns 1e-5 when too few frames are left after it
    # removes silent ones. That value is not a score, so it becomes an error here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(pystoi.stoi(reference, estimate, rate, extended=True))
    if caught:
        raise ValueError(str(caught[0].message))
    return value


def _score(scores: FileScores, name: str, scorer, reference: np.ndarray,
           estimate: np.ndarray, rate: int) -> None:
    if scorer is None:
        return
    try:
        setattr(scores, name, scorer(reference, estimate, rate))
    except (RuntimeError, ValueError) as error:
        # pesq raises PesqError, a RuntimeError, on silent or too short input
        # (under 1/4 s); ESTOI raises ValueError through `_estoi`.
        log.warning("%s: no %s score (%s); recorded as null", scores.file,
                    name.upper(), _decode(error))


def _decode(error: Exception) -> str:
    # pesq's errors carry bytes, e.g. b'No utterances detected'.
    message = error.args[0] if error.args else error
    return message.decode(errors="replace") if isinstance(message, bytes) else str(message)


def score_statistics(files: list[FileScores]) -> dict[str, dict[str, Any]]:
    """Return the mean and median of each score over the files that have one.

    Values are None when no file has the score, or when the mean or median
    is not finite (an SI-SDR of inf from an exact reconstruction), because
    summary.json holds only finite numbers.
    """
    statistics = {}
    for key in SCORE_KEYS:
        values = np.array([getattr(scores, key) for scores in files
                           if getattr(scores, key) is not None], dtype=np.float64)
        mean = float(values.mean()) if len(values) else math.nan
        median = float(np.median(values)) if len(values) else math.nan
        statistics[key] = {"mean": mean if math.isfinite(mean) else None,
                           "median": median if math.isfinite(median) else None,
                           "files": len(values)}
    return statistics


# Files out.

def output_names(files: list[Path], root: Path) -> list[str]:
    """Name each output WAV after its input: STEM.wav, or the relative path where stems repeat.

    A repeated stem (the same name in two folders, or a.flac beside a.wav)
    gives FOLDER__NAME.SUFFIX.wav, which is unique because relative paths are.
    """
    stems = [path.stem for path in files]
    names = []
    for path, stem in zip(files, stems):
        if stems.count(stem) == 1:
            names.append(f"{stem}.wav")
        else:
            names.append(path.relative_to(root).as_posix().replace("/", "__") + ".wav")
    return names


def write_scores_csv(files: list[FileScores], path: Path) -> None:
    """Write one row per file; a score that could not be computed is an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = ["file", "output", "seconds", *SCORE_KEYS]
    writer.writerow(columns)
    for scores in files:
        row = [getattr(scores, column) for column in columns]
        writer.writerow(["" if value is None else value for value in row])
    write_text_atomically(path, buffer.getvalue())


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = DEFAULT_SETTINGS.n_fft,
                   sample_rate: int = DEFAULT_SETTINGS.sample_rate,
                   f_min: float = 0.0, f_max: float | None = None) -> np.ndarray:
    """Return triangular mel filters of shape (n_mels, n_fft // 2 + 1), each with peak 1.

    The mel scale is HTK's, mel = 2595 log10(1 + f / 700). Filter k rises
    from the (k)th to the (k+1)th of n_mels + 2 points equally spaced in mel
    between f_min and f_max (default: the Nyquist frequency) and falls to
    the (k+2)th.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    mels = np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2)
    edges = _mel_to_hz(mels)
    frequencies = np.arange(n_fft // 2 + 1) * sample_rate / n_fft

    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (frequencies - lower) / (centre - lower)
    falling = (upper - frequencies) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def _hz_to_mel(frequency):
    return 2595.0 * np.log10(1.0 + np.asarray(frequency) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def plot_mel_spectrograms(original: np.ndarray, reconstruction: np.ndarray, path: Path,
                          title: str = "", sample_rate: int = DEFAULT_SETTINGS.sample_rate,
                          hop_length: int = DEFAULT_SETTINGS.hop_length) -> Path:
    """Draw the original and reconstructed power spectrograms on a log mel scale, side by side.

    Both panels show dB relative to the original's loudest mel band and
    frame, over the same PICTURE_RANGE_DB, so equal colours are equal power.

    :param original, reconstruction: power spectrograms of shape (T, n_bins).
    """
    from matplotlib.figure import Figure

    n_fft = 2 * (original.shape[1] - 1)
    filters = mel_filterbank(N_MELS, n_fft, sample_rate)
    original_mel = original @ filters.T
    reconstruction_mel = reconstruction @ filters.T
    peak = max(float(original_mel.max()), np.finfo(np.float64).tiny)
    duration = len(original) * hop_length / sample_rate

    figure = Figure(figsize=(max(9.0, min(20.0, 2.0 + duration)), 4.0), dpi=100,
                    layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    for axes, power, label in ((panels[0], original_mel, "original"),
                               (panels[1], reconstruction_mel, "reconstruction")):
        decibels = 10.0 * np.log10(np.maximum(power, peak * 1e-12) / peak)
        image = axes.imshow(decibels.T, origin="lower", aspect="auto", cmap="magma",
                            vmin=-PICTURE_RANGE_DB, vmax=0.0, interpolation="nearest",
                            extent=(0.0, duration, -0.5, N_MELS - 0.5))
        axes.set_title(label)
        axes.set_xlabel("time (s)")

    # Band k is centred on the (k+1)th of N_MELS + 2 points equally spaced in mel.
    kilohertz = (0.25, 0.5, 1, 2, 4, 7)
    mel_step = _hz_to_mel(sample_rate / 2) / (N_MELS + 1)
    panels[0].set_yticks([_hz_to_mel(1000 * value) / mel_step - 1 for value in kilohertz],
                         [f"{value:g}" for value in kilohertz])
    panels[0].set_ylabel(f"frequency (kHz), {N_MELS} mel bands")
    figure.colorbar(image, ax=list(panels), label="dB relative to the original's peak")
    if title:
        figure.suptitle(title)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomically(path, buffer.getvalue())
    return Path(path)


# The command.

def resynthesize_run(run_dir: str | os.PathLike, audio_dir: str | os.PathLike,
                     output_dir: str | os.PathLike, split: str = "test",
                     limit: int | None = None, device: str | None = None,
                     progress: bool = True) -> ResynthesisResult:
    """`dssm resynth`: resynthesise a split of `audio_dir` through a speech run and score it.

    Writes into `output_dir` one 32-bit float WAV (16 kHz) and one mel
    spectrogram PNG per file, named after the input, and `scores.csv`. Records
    in the run's summary.json "sisdr_db", "pesq" and "estoi", each
    {"mean", "median", "files"}, and "resynth" (audio folder, split, file
    count, seconds).

    :param str split: "train", "valid" or "test", split by speaker as in training.
    :param int limit: resynthesise only the first `limit` files of the split.
    :param str device: "cpu", "cuda" or "auto" (the default).
    :raises EvaluationError: for a run not trained on speech, or a bad split or limit.
    :raises DataError: when the audio folder or one of its files cannot be used.
    """
    from runtime.runs import load_trained_model

    started = time.perf_counter()
    run, output = Path(run_dir), Path(output_dir)
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be at least 1, not {limit}")
    dataset = _read_config(run).dataset or ""
    if not dataset.startswith(SPEECH_PREFIX):
        raise EvaluationError(f"{run} was trained on {dataset or 'an unnamed data set'}, not on "
                              f"speech; resynthesis needs a run trained on speech:DIR")

    files = held_out_files(audio_dir, split)[:limit]
    root = Path(audio_dir).expanduser()
    model, config, _ = load_trained_model(str(run), device)
    model_device = next(iter(model.parameters()), torch.zeros(0)).device
    # With a flow on the guide, reconstruct draws z; a fixed seed makes the output repeatable.
    pyro.set_rng_seed(config.seed)
    scorers = _optional_scorers()
    output.mkdir(parents=True, exist_ok=True)

    results = []
    names = output_names(files, root)
    for path, name in tqdm(list(zip(files, names)), desc="resynth", unit="file",
                           file=sys.stderr, leave=False, disable=not progress):
        results.append(_resynthesize_file(model, model_device, path, root, output / name,
                                          scorers))

    scores_path = output / SCORES_FILE
    write_scores_csv(results, scores_path)
    statistics = score_statistics(results)
    update_summary(run, {**statistics, "resynth": {
        "audio": str(audio_dir), "split": split, "files": len(results),
        "seconds": time.perf_counter() - started}})
    return ResynthesisResult(results, statistics, output, scores_path)


def _resynthesize_file(model, device: torch.device, path: Path, root: Path, wav_path: Path,
                       scorers: dict) -> FileScores:
    """Reconstruct, invert, write and score one file."""
    utterance = load_utterance(path)
    power = reconstruct_power(model, utterance.power, device)
    reference = utterance.waveform
    estimate = istft(np.sqrt(power), utterance.phase, hop_length=DEFAULT_SETTINGS.hop_length,
                     length=len(reference))

    buffer = io.BytesIO()
    soundfile.write(buffer, estimate.astype(np.float32), utterance.samplerate, format="WAV",
                    subtype="FLOAT")
    write_bytes_atomically(wav_path, buffer.getvalue())

    relative = path.relative_to(root).as_posix()
    scores = FileScores(file=relative, output=wav_path.name,
                        seconds=len(reference) / utterance.samplerate)
    try:
        scores.sisdr_db = si_sdr(reference, estimate)
    except ValueError as error:
        log.warning("%s: no SI-SDR score (%s); recorded as null", relative, error)
    for name in ("pesq", "estoi"):
        _score(scores, name, scorers[name], reference, estimate, utterance.samplerate)

    plot_mel_spectrograms(utterance.power, power, wav_path.with_suffix(".png"),
                          title=f"{relative}: SI-SDR {_format_score(scores.sisdr_db)} dB, "
                                f"PESQ {_format_score(scores.pesq)}, "
                                f"ESTOI {_format_score(scores.estoi)}")
    return scores


def _format_score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
