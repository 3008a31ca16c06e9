"""Speech as power spectrograms: 16 kHz mono audio, 1024-sample sine-window STFT, hop 256.

Each file is trimmed of leading and trailing silence (frames more than 30 dB
below the loudest frame), peak-normalised and transformed. The model's input
is the power |STFT|^2 of 513 frequency bins, cut into sequences of 50 frames.
Spectrograms are cached under `cache_dir()/spectrograms`, keyed by the file's
content and the settings, so a changed file or setting computes a new one.

Files are split by speaker, so no speaker is in two splits; see
`split_by_speaker`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile

from runtime.data import DataError, DataWarning, Dataset, SequenceData, cache_dir
from taxonomy.writing import write_bytes_atomically

log = logging.getLogger("dssm.data")

AUDIO_SUFFIXES = (".flac", ".wav")
SEQUENCE_LENGTH = 50
TEST_FRACTION = 0.1
VALID_FRACTION = 0.1
# Bump when the computation changes in a way the settings do not show, so old
# cache files are no longer used.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class SpectrogramSettings:
    """Settings that turn audio into a power spectrogram.

    :param int sample_rate: Hz; other rates are resampled to it.
    :param int n_fft: STFT frame and sine-window length in samples; gives
        n_fft // 2 + 1 frequency bins.
    :param int hop_length: samples between STFT frames.
    :param float top_db: frames more than this many dB below the loudest one
        are silence, and are trimmed from the start and end.
    :param int trim_frame_length, trim_hop_length: the frames, in samples, whose
        energy decides the trimming.
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 256
    top_db: float = 30.0
    trim_frame_length: int = 2048
    trim_hop_length: int = 512

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1


DEFAULT_SETTINGS = SpectrogramSettings()
N_BINS = DEFAULT_SETTINGS.n_bins


class Utterance(NamedTuple):
    """One file after trimming and peak normalisation, with its STFT.

    :param np.ndarray power: float32 (T, n_bins), |STFT|^2, the model's input.
    :param np.ndarray phase: float32 (T, n_bins), the STFT's angle in radians.
    :param int samplerate: Hz of `waveform` (the settings' rate, after any resampling).
    :param np.ndarray waveform: float64 (N,), the trimmed, peak-normalised
        signal; `istft(np.sqrt(power), phase, length=len(waveform))` rebuilds it.
    """

    power: np.ndarray
    phase: np.ndarray
    samplerate: int
    waveform: np.ndarray


# Signal processing.

def sine_window(length: int) -> np.ndarray:
    """Return sin(pi (n + 1/2) / length) for n = 0 .. length - 1."""
    return np.sin(np.pi * (np.arange(length) + 0.5) / length)


def stft(waveform: np.ndarray, n_fft: int = 1024, hop_length: int = 256) -> np.ndarray:
    """Return the complex STFT, shape (1 + len(waveform) // hop_length, n_fft // 2 + 1).

    Frame t is centred on sample t * hop_length: the signal is padded with
    n_fft // 2 zeros at each end. Frames are multiplied by the sine window and
    not scaled further.
    """
    waveform = np.asarray(waveform, dtype=np.float64)
    padded = np.pad(waveform, n_fft // 2)
    n_frames = 1 + len(waveform) // hop_length
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length][:n_frames]
    return np.fft.rfft(frames * sine_window(n_fft), axis=1)


def istft(magnitude: np.ndarray, phase: np.ndarray, hop_length: int = 256,
          length: int | None = None) -> np.ndarray:
    """Invert `stft`: rebuild a waveform from magnitudes and phases of shape (T, n_bins).

    Each frame is windowed again, overlap-added, and divided by the summed
    squared window (the least-squares inverse). `length` defaults to
    (T - 1) * hop_length, the longest signal whose STFT has T frames.
    """
    magnitude = np.asarray(magnitude, dtype=np.float64)
    phase = np.asarray(phase, dtype=np.float64)
    if magnitude.shape != phase.shape or magnitude.ndim != 2:
        raise ValueError(f"magnitude {magnitude.shape} and phase {phase.shape} must have "
                         f"the same shape (T, n_bins)")
    n_frames, n_bins = magnitude.shape
    n_fft = 2 * (n_bins - 1)
    window = sine_window(n_fft)

    frames = np.fft.irfft(magnitude * np.exp(1j * phase), n=n_fft, axis=1) * window
    total = n_fft + (n_frames - 1) * hop_length
    signal = np.zeros(total)
    weight = np.zeros(total)
    for t in range(n_frames):
        signal[t * hop_length:t * hop_length + n_fft] += frames[t]
        weight[t * hop_length:t * hop_length + n_fft] += window ** 2

    # The weight is 0 only at the outer edges of the padding, which is cut off.
    nonzero = weight > 1e-10
    signal[nonzero] /= weight[nonzero]
    if length is None:
        length = (n_frames - 1) * hop_length
    start = n_fft // 2
    waveform = signal[start:start + length]
    return np.pad(waveform, (0, length - len(waveform)))


def trim_silence(waveform: np.ndarray, top_db: float = 30.0, frame_length: int = 2048,
                 hop_length: int = 512) -> tuple[int, int]:
    """Return (start, end) sample indices of `waveform` without leading and trailing silence.

    Frames are centred on every hop_length-th sample, with zero padding at
    the ends. A frame is silent when its mean square is more than top_db
    below the loudest frame's. The kept span runs from the first non-silent
    frame's centre to one hop past the last one's centre. The defaults and
    the reference (the loudest frame) are those of librosa.effects.trim, but
    an all-zero signal returns (0, 0) here, where librosa keeps it whole.
    """
    waveform = np.asarray(waveform, dtype=np.float64)
    padded = np.pad(waveform, frame_length // 2)
    cumulative = np.concatenate([[0.0], np.cumsum(padded ** 2)])
    starts = np.arange(1 + len(waveform) // hop_length) * hop_length
    energy = (cumulative[starts + frame_length] - cumulative[starts]) / frame_length

    loudest = energy.max(initial=0.0)
    if loudest <= 0.0:
        return 0, 0
    loud = np.flatnonzero(energy > loudest * 10.0 ** (-top_db / 10.0))
    start = int(loud[0]) * hop_length
    end = min(len(waveform), (int(loud[-1]) + 1) * hop_length)
    return start, end


# Reading audio.

def read_audio(path: str | Path, sample_rate: int = 16000,
               content: bytes | None = None) -> np.ndarray:
    """Read a mono audio file as float64 samples at `sample_rate`, resampling if needed.

    `content` is the file's bytes when the caller has read them already.
    Raises DataError naming the file when it cannot be read or decoded, is
    truncated, has more than one channel, or contains NaN or infinite samples.
    A file at another sample rate is resampled with a polyphase filter, and
    the log records it at INFO level.
    """
    path = Path(path)
    if content is None:
        content = _read_bytes(path)
    _check_wav_length(path, content)

    try:
        with soundfile.SoundFile(io.BytesIO(content)) as audio:
            declared_frames, channels, rate = audio.frames, audio.channels, audio.samplerate
            samples = audio.read(dtype="float64", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as error:
        raise DataError(f"{path}: cannot be decoded as audio ({error}); the file is "
                        f"corrupt, truncated or in an unsupported format") from None

    if len(samples) < declared_frames:
        raise DataError(f"{path}: truncated: the header declares {declared_frames} frames "
                        f"but only {len(samples)} could be read")
    if channels != 1:
        raise DataError(f"{path}: has {channels} channels, but speech must be mono; "
                        f"convert it to one channel (mix it down) and load again")
    waveform = samples[:, 0]
    if not np.isfinite(waveform).all():
        bad = int(np.flatnonzero(~np.isfinite(waveform))[0])
        raise DataError(f"{path}: contains NaN or infinite samples (the first at sample "
                        f"{bad}); re-export the file")

    if rate != sample_rate:
        # Imported here because scipy.signal takes seconds to import and most
        # files need no resampling.
        import scipy.signal

        divisor = math.gcd(rate, sample_rate)
        waveform = scipy.signal.resample_poly(waveform, sample_rate // divisor, rate // divisor)
        log.info("%s: resampled from %d Hz to %d Hz", path, rate, sample_rate)
    return waveform


def _check_wav_length(path: Path, content: bytes) -> None:
    """Raise DataError when a WAV file's data chunk is shorter than its header declares.

    libsndfile reads such a file without error and returns fewer frames.
    """
    if content[:4] not in (b"RIFF", b"RIFX") or content[8:12] != b"WAVE":
        return
    byte_order = "<" if content[:4] == b"RIFF" else ">"
    position = 12
    while position + 8 <= len(content):
        chunk_id = content[position:position + 4]
        (size,) = struct.unpack(byte_order + "I", content[position + 4:position + 8])
        if chunk_id == b"data":
            # Streaming writers leave the size as 0 or 0xFFFFFFFF when it is unknown.
            available = len(content) - position - 8
            if size not in (0, 0xFFFFFFFF) and size > available:
                raise DataError(f"{path}: truncated: the header declares {size} bytes of "
                                f"audio but the file contains {available}")
            return
        position += 8 + size + (size & 1)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None


# Spectrograms.

def load_utterance(path: str | Path, settings: SpectrogramSettings = DEFAULT_SETTINGS) -> Utterance:
    """Read, trim and peak-normalise an audio file, and return its power and phase.

    Raises DataError naming the file when `read_audio` does or when nothing
    is left after trimming (a silent file).
    """
    path = Path(path)
    spectrum, waveform = _spectrum(path, _read_bytes(path), settings)
    return Utterance(power=_power(spectrum), phase=np.angle(spectrum).astype(np.float32),
                     samplerate=settings.sample_rate, waveform=waveform)


def _spectrum(path: Path, content: bytes,
              settings: SpectrogramSettings) -> tuple[np.ndarray, np.ndarray]:
    """Return the STFT of the trimmed, peak-normalised audio, and that waveform."""
    waveform = read_audio(path, settings.sample_rate, content=content)
    start, end = trim_silence(waveform, settings.top_db, settings.trim_frame_length,
                              settings.trim_hop_length)
    trimmed = waveform[start:end]
    peak = np.abs(trimmed).max(initial=0.0)
    if peak == 0.0:
        raise DataError(f"{path}: silent: nothing is left after trimming silence "
                        f"{settings.top_db:g} dB below the loudest frame")

    normalised = trimmed / peak
    return stft(normalised, settings.n_fft, settings.hop_length), normalised


def _power(spectrum: np.ndarray) -> np.ndarray:
    return (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32)


def cache_key(content: bytes, settings: SpectrogramSettings = DEFAULT_SETTINGS) -> str:
    """Return the cache key of a file's spectrogram: a SHA-256 of its bytes and the settings."""
    description = json.dumps({"format": CACHE_FORMAT, **dataclasses.asdict(settings)},
                             sort_keys=True)
    digest = hashlib.sha256(description.encode())
    digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def power_spectrogram(path: str | Path, settings: SpectrogramSettings = DEFAULT_SETTINGS,
                      cache: bool = True) -> np.ndarray:
    """Return the float32 power spectrogram (T, n_bins) of an audio file, cached on disk.

    The cache file is `cache_dir()/spectrograms/KEY.npy` with KEY from
    `cache_key`. A cache file that cannot be read, or whose shape or values
    are invalid, is computed again. Raises DataError as `load_utterance` does.
    """
    path = Path(path)
    content = _read_bytes(path)
    if not cache:
        return _power(_spectrum(path, content, settings)[0])

    cached = cache_dir() / "spectrograms" / f"{cache_key(content, settings)}.npy"
    if cached.is_file():
        power = _read_cached(cached, settings.n_bins)
        if power is not None:
            return power

    power = _power(_spectrum(path, content, settings)[0])
    buffer = io.BytesIO()
    np.save(buffer, power, allow_pickle=False)
    try:
        write_bytes_atomically(cached, buffer.getvalue())
    except OSError as error:
        log.warning("cannot write the spectrogram cache %s (%s); continuing without it",
                    cached, error.strerror or error)
    return power


def _read_cached(cached: Path, n_bins: int) -> np.ndarray | None:
    try:
        power = np.load(cached, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        log.warning("%s: invalid cache file (%s); computing the spectrogram again", cached, error)
        return None

    if power.dtype != np.float32 or power.ndim != 2 or power.shape[1] != n_bins:
        log.warning("%s: cached spectrogram has shape %s and type %s, expected (T, %d) "
                    "float32; computing it again", cached, power.shape, power.dtype, n_bins)
        return None
    if not np.isfinite(power).all() or (power < 0).any():
        log.warning("%s: cached spectrogram contains NaN, infinite or negative values; "
                    "computing it again", cached)
        return None
    return power


# The data set.

def speaker_id(path: str | Path) -> str:
    """Return the speaker of a LibriSpeech file named SPEAKER-CHAPTER-UTTERANCE.

    A prefix before the three numbers is allowed (libri-1088-134315-0000);
    a file not named this way is its own speaker, identified by its stem.
    """
    stem = Path(path).stem
    match = re.search(r"(\d+)-\d+-\d+$", stem)
    return match.group(1) if match else stem


def split_by_speaker(files: list[Path], test_fraction: float = TEST_FRACTION,
                     valid_fraction: float = VALID_FRACTION) -> dict[str, list[Path]]:
    """Split files into train, valid and test so that each speaker is in one split.

    Speakers are ordered by the SHA-256 of their id, so the order depends on
    nothing else. In that order, speakers go to test until it has
    test_fraction of the files, then to valid until it has valid_fraction of
    the remaining files. The other speakers are train. Each split gets at
    least one speaker, so at least three are needed (DataError otherwise). A
    split overshoots its fraction by at most one speaker's files.
    """
    by_speaker: dict[str, list[Path]] = {}
    for path in sorted(files):
        by_speaker.setdefault(speaker_id(path), []).append(path)
    if len(by_speaker) < 3:
        raise DataError(f"speech needs files from at least 3 speakers, so that train, valid "
                        f"and test have different speakers; found {len(by_speaker)}: "
                        f"{', '.join(sorted(by_speaker)) or 'none'}")

    remaining = sorted(by_speaker, key=lambda speaker: hashlib.sha256(speaker.encode()).hexdigest())

    def take(target: float, keep: int) -> list[Path]:
        chosen: list[Path] = []
        while len(remaining) > keep and (not chosen or len(chosen) < target):
            chosen += by_speaker[remaining.pop(0)]
        return chosen

    test = take(test_fraction * len(files), keep=2)
    valid = take(valid_fraction * (len(files) - len(test)), keep=1)
    train = [path for speaker in remaining for path in by_speaker[speaker]]
    return {"train": sorted(train), "valid": sorted(valid), "test": sorted(test)}


def load_speech(directory: str | Path, sequence_length: int = SEQUENCE_LENGTH,
                settings: SpectrogramSettings = DEFAULT_SETTINGS, cache: bool = True) -> Dataset:
    """Load every .flac and .wav file under `directory` as power-spectrogram sequences.

    A file that cannot be used is left out with a DataWarning that names it
    and the reason. That covers unreadable, corrupt and truncated files,
    files with more than one channel, NaN or infinite samples, silent files,
    and files shorter than one sequence after trimming. All of this happens
    before training starts. Each file's spectrogram is
    cut into consecutive sequences of `sequence_length` frames, and the last
    frames that do not fill one are dropped. Files are split with
    `split_by_speaker`.

    Raises DataError when the folder is missing, contains no audio files, or
    leaves fewer than three speakers with usable files.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"speech folder {root} not found; give a folder of .flac or .wav "
                        f"files, e.g. speech:data/librispeech")
    files = sorted(path for path in root.rglob("*")
                   if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file())
    if not files:
        raise DataError(f"no .flac or .wav files found under {root}")

    spectrograms: dict[Path, np.ndarray] = {}
    skipped: list[str] = []
    for path in files:
        try:
            power = power_spectrogram(path, settings, cache=cache)
        except DataError as error:
            skipped.append(str(error))
            warnings.warn(f"skipped {error}", DataWarning, stacklevel=2)
            continue
        if len(power) < sequence_length:
            reason = (f"{path}: too short: {len(power)} frames after trimming, fewer than "
                      f"one sequence of {sequence_length}")
            skipped.append(reason)
            warnings.warn(f"skipped {reason}", DataWarning, stacklevel=2)
            continue
        spectrograms[path] = power

    if not spectrograms:
        reasons = "\n  ".join(skipped[:5])
        raise DataError(f"none of the {len(files)} audio files under {root} could be used:"
                        f"\n  {reasons}")
    split_files = split_by_speaker(list(spectrograms))

    splits = {}
    for split, paths in split_files.items():
        sequences, names = [], []
        for path in paths:
            power = spectrograms[path]
            label = path.relative_to(root).as_posix()
            for k in range(len(power) // sequence_length):
                sequences.append(power[k * sequence_length:(k + 1) * sequence_length])
                names.append(f"{label}[{k}]")
        splits[split] = SequenceData(sequences, names, settings.n_bins)

    log.info("speech from %s: %d files used, %d skipped; %s", root, len(spectrograms),
             len(skipped), ", ".join(f"{split} {len(split_files[split])} files / "
                                     f"{len(data)} sequences" for split, data in splits.items()))
    return Dataset(name=f"speech:{directory}", train=splits["train"], valid=splits["valid"],
                   test=splits["test"], x_dim=settings.n_bins, family="exponential",
                   sources=list(spectrograms), files=split_files)
