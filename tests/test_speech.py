"""Speech: reading audio, trimming, the STFT and its inverse, the spectrogram cache and splits."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from runtime import speech
from runtime.data import DataError, DataWarning, cache_dir, load_dataset
from runtime.metrics import si_sdr
from runtime.speech import (SpectrogramSettings, cache_key, istft, load_speech, load_utterance,
                            power_spectrogram, read_audio, sine_window, speaker_id,
                            split_by_speaker, stft, trim_silence)

REPO = Path(__file__).resolve().parent.parent


def _speech_dir() -> Path:
    # The speech data sits beside the music data that CI names in DSSM_DATA_DIR.
    configured = os.environ.get("DSSM_DATA_DIR")
    music = Path(configured) if configured else Path("../shared/data/music")
    music = music if music.is_absolute() else (REPO / music).resolve()
    return music.parent / "speech" / "librispeech"


SPEECH_DIR = _speech_dir()
# Five speakers, 16-bit FLAC, 16-bit WAV and 32-bit float WAV, one name with a prefix.
REAL_FILES = ["dev-clean/84-121123-0000.wav", "dev-clean/84-121123-0007.wav",
              "dev-clean/3752-4944-0000.flac", "dev-clean/3752-4944-0002.flac",
              "dev-clean/1988-24833-0000.flac", "dev-clean/2412-153947-0000.wav",
              "train-clean-100/libri-1088-134315-0000.wav"]
needs_speech = pytest.mark.skipif(
    not all((SPEECH_DIR / name).is_file() for name in REAL_FILES),
    reason=f"the LibriSpeech files are not in {SPEECH_DIR}")

RATE = 16000


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSSM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def real_subset(tmp_path) -> Path:
    """Copy a few LibriSpeech files, in their subset folders, into a fresh folder."""
    folder = tmp_path / "librispeech"
    for name in REAL_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SPEECH_DIR / name, folder / name)
    return folder


def _tone(seconds: float, frequency: float = 440.0, rate: int = RATE,
          amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * frequency * t)


def _write(path: Path, samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, rate, subtype=subtype)
    return path


# The STFT and its inverse.

def test_sine_window_formula():
    window = sine_window(1024)

    assert window.shape == (1024,)
    assert window[0] == pytest.approx(np.sin(np.pi * 0.5 / 1024))
    np.testing.assert_allclose(window, window[::-1])
    # At a hop of a quarter window the squared windows sum to 2 everywhere.
    overlap = sum(np.roll(window ** 2, shift) for shift in range(0, 1024, 256))
    np.testing.assert_allclose(overlap, 2.0)


def test_stft_shape_and_bins():
    signal = _tone(1.0, frequency=1000.0)

    spectrum = stft(signal)

    assert spectrum.shape == (1 + len(signal) // 256, 513)
    # 1000 Hz lies at bin 1000 / (16000 / 1024) = 64.
    assert np.argmax(np.abs(spectrum[10])) == 64


@pytest.mark.parametrize("length", [16000, 16001, 12345])
def test_istft_inverts_stft(length):
    signal = np.random.default_rng(length).standard_normal(length)
    spectrum = stft(signal)

    rebuilt = istft(np.abs(spectrum), np.angle(spectrum), length=length)

    assert rebuilt.shape == signal.shape
    assert si_sdr(signal, rebuilt) > 40.0
    np.testing.assert_allclose(rebuilt, signal, atol=1e-8)


def test_istft_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        istft(np.ones((4, 513)), np.ones((4, 512)))


# Trimming.

def test_trim_silence_keeps_tone():
    quiet = 1e-4 * np.random.default_rng(0).standard_normal(RATE // 2)
    signal = np.concatenate([quiet, _tone(1.0), quiet])

    start, end = trim_silence(signal, top_db=30)

    # The kept span reaches at most one trim frame (2048 samples) into the silence.
    assert RATE // 2 - 2048 <= start <= RATE // 2
    assert RATE // 2 + RATE <= end <= RATE // 2 + RATE + 2048


def test_trim_silence_threshold_in_db():
    loud, soft = _tone(1.0), _tone(1.0, amplitude=0.5 * 10 ** (-20 / 20))
    fainter = _tone(1.0, amplitude=0.5 * 10 ** (-40 / 20))

    assert trim_silence(np.concatenate([soft, loud]), top_db=30)[0] == 0
    start, _ = trim_silence(np.concatenate([fainter, loud]), top_db=30)
    assert RATE - 2048 <= start <= RATE


def test_trim_silence_of_zeros_is_empty():
    assert trim_silence(np.zeros(RATE)) == (0, 0)


# Reading audio.

def test_other_sample_rate_is_resampled(tmp_path, caplog):
    path = _write(tmp_path / "low.wav", _tone(1.0, frequency=1000.0, rate=8000), rate=8000)

    with caplog.at_level(logging.INFO, logger="dssm.data"):
        waveform = read_audio(path)

    assert len(waveform) == RATE
    assert np.argmax(np.abs(stft(waveform)[20])) == 64
    assert "low.wav: resampled from 8000 Hz to 16000 Hz" in caplog.text


def test_stereo_file_is_rejected(tmp_path):
    path = _write(tmp_path / "stereo.wav", np.stack([_tone(0.5), _tone(0.5)], axis=1))

    with pytest.raises(DataError, match="2 channels, but speech must be mono") as raised:
        read_audio(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_samples_are_rejected(tmp_path, value):
    samples = _tone(0.5)
    samples[100] = value
    path = _write(tmp_path / "bad.wav", samples, subtype="FLOAT")

    with pytest.raises(DataError, match="NaN or infinite samples") as raised:
        read_audio(path)
    assert str(path) in str(raised.value)


def test_truncated_wav_is_rejected(tmp_path):
    content = _write(tmp_path / "whole.wav", _tone(1.0)).read_bytes()
    path = tmp_path / "cut.wav"
    path.write_bytes(content[:len(content) // 2])

    with pytest.raises(DataError, match="truncated") as raised:
        read_audio(path)
    assert str(path) in str(raised.value)


def test_truncated_flac_is_rejected(tmp_path):
    content = _write(tmp_path / "whole.flac", _tone(1.0) + 0.01 * np.random.default_rng(0)
                     .standard_normal(RATE)).read_bytes()
    for cut in (len(content) // 2, len(content) - 100, 30):
        path = tmp_path / f"cut{cut}.flac"
        path.write_bytes(content[:cut])

        with pytest.raises(DataError) as raised:
            read_audio(path)
        assert str(path) in str(raised.value)


def test_corrupt_bytes_are_rejected(tmp_path):
    path = tmp_path / "noise.flac"
    path.write_bytes(b"this is not audio " * 100)

    with pytest.raises(DataError, match="cannot be decoded") as raised:
        read_audio(path)
    assert str(path) in str(raised.value)


def test_silent_file_is_rejected(tmp_path):
    path = _write(tmp_path / "silence.wav", np.zeros(RATE))

    with pytest.raises(DataError, match="silent") as raised:
        load_utterance(path)
    assert str(path) in str(raised.value)


def test_load_utterance_normalises_and_inverts(tmp_path):
    signal = np.concatenate([np.zeros(4000), _tone(1.0, amplitude=0.25), np.zeros(4000)])
    path = _write(tmp_path / "tone.wav", signal, subtype="FLOAT")

    utterance = load_utterance(path)

    assert utterance.samplerate == RATE
    assert np.abs(utterance.waveform).max() == pytest.approx(1.0)
    assert len(utterance.waveform) < len(signal)
    assert utterance.power.shape == (1 + len(utterance.waveform) // 256, 513)
    assert utterance.power.dtype == np.float32
    assert utterance.phase.shape == utterance.power.shape
    rebuilt = istft(np.sqrt(utterance.power), utterance.phase, length=len(utterance.waveform))
    assert si_sdr(utterance.waveform, rebuilt) > 40.0


@needs_speech
@pytest.mark.data
def test_real_utterance_resynthesis_above_40_db():
    utterance = load_utterance(SPEECH_DIR / "dev-clean/1988-24833-0000.flac")

    rebuilt = istft(np.sqrt(utterance.power), utterance.phase, length=len(utterance.waveform))

    assert si_sdr(utterance.waveform, rebuilt) > 40.0


# Speakers and splits.

@pytest.mark.parametrize("name, speaker", [("84-121123-0003.wav", "84"),
                                           ("libri-1088-134315-0000.wav", "1088"),
                                           ("dev-clean/3752-4944-0000.flac", "3752"),
                                           ("interview.wav", "interview")])
def test_speaker_id_from_file_name(name, speaker):
    assert speaker_id(name) == speaker


def test_split_by_speaker_is_disjoint_and_stable():
    files = [Path(f"{speaker}-1-{utterance:04d}.flac")
             for speaker in range(100, 120) for utterance in range(3)]

    splits = split_by_speaker(files)
    again = split_by_speaker(list(reversed(files)))

    assert splits == again
    speakers = {split: {speaker_id(path) for path in paths} for split, paths in splits.items()}
    assert not speakers["train"] & speakers["valid"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["valid"] & speakers["test"]
    assert sorted(p for paths in splits.values() for p in paths) == sorted(files)
    # 10% of 60 files is 6, two speakers; 10% of the other 54 is 5.4, two speakers.
    assert [len(speakers["test"]), len(speakers["valid"]), len(speakers["train"])] == [2, 2, 16]


def test_split_by_speaker_gives_each_split_a_speaker():
    files = [Path("1-1-0000.flac"), Path("2-1-0000.flac")] + \
        [Path(f"3-1-{i:04d}.flac") for i in range(40)]

    splits = split_by_speaker(files)

    assert all(splits[split] for split in ("train", "valid", "test"))


def test_split_by_speaker_needs_three_speakers():
    files = [Path("1-1-0000.flac"), Path("1-1-0001.flac"), Path("2-1-0000.flac")]

    with pytest.raises(DataError, match="at least 3 speakers.*found 2: 1, 2"):
        split_by_speaker(files)


# Loading a folder.

@needs_speech
@pytest.mark.data
def test_load_speech_real_subset(real_subset):
    data = load_dataset(f"speech:{real_subset}")

    assert (data.x_dim, data.family) == (513, "exponential")
    assert sum(len(paths) for paths in data.files.values()) == len(REAL_FILES)
    speakers = {split: {speaker_id(path) for path in paths} for split, paths in data.files.items()}
    assert all(speakers.values())
    assert speakers["train"].isdisjoint(speakers["test"])
    assert speakers["train"].isdisjoint(speakers["valid"])
    assert speakers["valid"].isdisjoint(speakers["test"])
    for split in data.splits.values():
        assert len(split) > 0
        assert split.lengths.tolist() == [50] * len(split)
        assert split.total_steps == 50 * len(split)
        assert np.isfinite(split.steps).all()
        assert (split.steps >= 0).all()

    first = data.files["train"][0]
    expected = load_utterance(first).power
    assert data.train.names[0] == f"{first.relative_to(real_subset).as_posix()}[0]"
    np.testing.assert_array_equal(data.train[0], expected[:50])
    np.testing.assert_array_equal(data.train[1], expected[50:100])

    batch = next(iter(data.train.batches(4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))))
    assert batch.x.shape == (4, 50, 513)
    assert batch.mask.all()


@needs_speech
@pytest.mark.data
def test_load_speech_skips_bad_files(real_subset, caplog):
    bad = {
        "9001-1-0000.wav": lambda path: _write(path, np.stack([_tone(4.0)] * 2, axis=1)),
        "9002-1-0000.wav": lambda path: _write(path, np.full(RATE, np.nan), subtype="FLOAT"),
        "9003-1-0000.flac": lambda path: path.write_bytes(b"not audio" * 50),
        "9004-1-0000.wav": lambda path: path.write_bytes(
            _write(path, _tone(4.0)).read_bytes()[:20000]),
        "9005-1-0000.wav": lambda path: _write(path, np.zeros(4 * RATE)),
        "9006-1-0000.wav": lambda path: _write(path, _tone(0.5)),
    }
    reasons = {"9001": "2 channels", "9002": "NaN or infinite", "9003": "cannot be decoded",
               "9004": "truncated", "9005": "silent", "9006": "too short"}
    for name, make in bad.items():
        make(real_subset / "synthetic" / name)
    _write(real_subset / "synthetic" / "9007-1-0000.wav", _tone(4.0, rate=8000), rate=8000)

    with pytest.warns(DataWarning) as warned, caplog.at_level(logging.INFO, logger="dssm.data"):
        data = load_speech(real_subset)

    messages = [str(warning.message) for warning in warned]
    for speaker, reason in reasons.items():
        matching = [m for m in messages if f"{speaker}-1-0000" in m]
        assert len(matching) == 1, speaker
        assert reason in matching[0]
    used = [path.name for paths in data.files.values() for path in paths]
    assert not any(name in used for name in bad)
    assert "9007-1-0000.wav" in used
    assert "9007-1-0000.wav: resampled from 8000 Hz to 16000 Hz" in caplog.text


def test_load_speech_only_bad_files_is_error(tmp_path):
    _write(tmp_path / "audio" / "1-1-0000.wav", np.zeros(RATE))
    (tmp_path / "audio" / "2-1-0000.flac").write_bytes(b"junk")

    with pytest.warns(DataWarning), pytest.raises(DataError, match="none of the 2") as raised:
        load_speech(tmp_path / "audio")
    assert "1-1-0000.wav: silent" in str(raised.value)
    assert "2-1-0000.flac" in str(raised.value)


def test_load_speech_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_speech(tmp_path / "absent")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no audio here")
    with pytest.raises(DataError, match="no .flac or .wav files"):
        load_speech(tmp_path / "empty")


def test_speech_prefix_needs_folder():
    with pytest.raises(DataError, match="needs a folder"):
        load_dataset("speech:")


# The spectrogram cache.

def _cached_files() -> list[Path]:
    folder = cache_dir() / "spectrograms"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_cache_is_written_and_reused(tmp_path, monkeypatch):
    path = _write(tmp_path / "tone.wav", _tone(1.0))

    first = power_spectrogram(path)
    cached = _cached_files()
    monkeypatch.setattr(speech, "stft", lambda *args: pytest.fail("the cache was not used"))
    second = power_spectrogram(path)

    assert [p.name for p in cached] == [f"{cache_key(path.read_bytes())}.npy"]
    np.testing.assert_array_equal(first, second)
    assert not [p for p in cache_dir().rglob("*") if p.name.endswith(".tmp")]


def test_cache_key_follows_content_and_settings(tmp_path):
    path = _write(tmp_path / "tone.wav", _tone(1.0))
    power_spectrogram(path)
    _write(path, _tone(1.0, frequency=880.0))
    changed = power_spectrogram(path)
    other = power_spectrogram(path, SpectrogramSettings(top_db=40.0))

    assert len(_cached_files()) == 3
    assert cache_key(b"a") != cache_key(b"b")
    assert cache_key(b"a") != cache_key(b"a", SpectrogramSettings(hop_length=128))
    assert np.argmax(changed[5]) == round(880 / (RATE / 1024))
    assert other.shape == changed.shape


@pytest.mark.parametrize("damage", ["bytes", "bins", "nan"])
def test_invalid_cache_file_is_recomputed(tmp_path, damage, caplog):
    path = _write(tmp_path / "tone.wav", _tone(1.0))
    expected = power_spectrogram(path)
    (cached,) = _cached_files()
    if damage == "bytes":
        cached.write_bytes(b"garbage")
    elif damage == "bins":
        np.save(cached, np.ones((10, 512), dtype=np.float32))
    else:
        np.save(cached, np.full((10, 513), np.nan, dtype=np.float32))

    with caplog.at_level(logging.WARNING, logger="dssm.data"):
        power = power_spectrogram(path)

    np.testing.assert_array_equal(power, expected)
    assert str(cached) in caplog.text


def test_cache_can_be_turned_off(tmp_path):
    path = _write(tmp_path / "tone.wav", _tone(1.0))

    power_spectrogram(path, cache=False)

    assert _cached_files() == []


# SI-SDR.

def test_si_sdr_known_value():
    # The example of torchmetrics' scale_invariant_signal_distortion_ratio: 18.4030 dB.
    assert si_sdr([3.0, -0.5, 2.0, 7.0], [2.5, 0.0, 2.0, 8.0]) == pytest.approx(18.4030, abs=1e-4)


def test_si_sdr_is_scale_invariant():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(1000)
    estimate = reference + 0.1 * rng.standard_normal(1000)

    assert si_sdr(reference, 3.0 * estimate) == pytest.approx(si_sdr(reference, estimate))
    assert si_sdr(reference, estimate) == pytest.approx(20.0, abs=1.0)
    assert si_sdr(reference, 2.0 * reference) == float("inf")


def test_si_sdr_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        si_sdr(np.ones(10), np.ones(9))
    with pytest.raises(ValueError, match="zero energy"):
        si_sdr(np.zeros(10), np.ones(10))
