"""Data sets as padded mini-batches of sequences: the trainer's only view of data.

`load_dataset(name)` returns a `Dataset` with train, valid and test splits, each a
`SequenceData`. Music sets (piano rolls, 88 binary keys) are read by
`runtime.music`, speech (power spectrograms, 513 bins) by `runtime.speech`,
and `synthetic:SPEC?n=..&T=..&seed=..` draws sequences from a randomly
initialised compiled spec (`runtime.synthetic`).

Files are looked for in `$DSSM_DATA_DIR`, then in the cache directory
(`$DSSM_CACHE_DIR`, else `$XDG_CACHE_HOME/dssm`, else `~/.cache/dssm`), which
is also where `fetch` downloads to and where spectrograms are cached.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from taxonomy.errors import DssmError

log = logging.getLogger("dssm.data")

MUSIC_NAMES = ("jsb", "nottingham", "musedata", "piano-midi")
SPEECH_PREFIX = "speech:"
SYNTHETIC_PREFIX = "synthetic:"


class DataError(DssmError):
    """A data file or folder that is missing, unreadable or not in the expected format."""


class DataWarning(UserWarning):
    """A sequence or file left out of a data set, with the reason."""


def cache_dir() -> Path:
    """Return the cache directory: `$DSSM_CACHE_DIR`, `$XDG_CACHE_HOME/dssm` or `~/.cache/dssm`."""
    override = os.environ.get("DSSM_CACHE_DIR")
    if override:
        return Path(override).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return (Path(xdg).expanduser() / "dssm").resolve()
    return Path.home() / ".cache" / "dssm"


def data_dirs() -> list[Path]:
    """Return the folders searched for data files, in order: `$DSSM_DATA_DIR`, then `cache_dir()`."""
    folders = []
    override = os.environ.get("DSSM_DATA_DIR")
    if override:
        folders.append(Path(override).expanduser().resolve())
    folders.append(cache_dir())
    return folders


@dataclass(frozen=True)
class Batch:
    """A mini-batch of sequences, zero padded to the longest one.

    :param torch.Tensor x: float32 values of shape (B, T_max, D); 0 on padded steps.
    :param torch.Tensor mask: bool of shape (B, T_max), True on real steps.
    :param torch.Tensor lengths: int64 of shape (B,), the number of real steps.
    :param torch.Tensor index: int64 of shape (B,), the positions of these
        sequences in their `SequenceData`.
    """

    x: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Return a copy with every tensor on `device`."""
        return Batch(x=self.x.to(device, non_blocking=non_blocking),
                     mask=self.mask.to(device, non_blocking=non_blocking),
                     lengths=self.lengths.to(device, non_blocking=non_blocking),
                     index=self.index.to(device, non_blocking=non_blocking))


class SequenceData:
    """One split of a data set: variable-length sequences of D-dimensional steps.

    The steps of all sequences are stored in one float32 array of shape
    (total_steps, D); `data[i]` returns sequence i as a (T_i, D) view.

    :param list sequences: float arrays of shape (T_i, D) with T_i >= 1.
    :param list names: one label per sequence, used in messages
        (e.g. "train[12]" or "84-121123-0003[4]").
    :param int x_dim: D; needed when `sequences` is empty.
    """

    def __init__(self, sequences: Sequence[np.ndarray], names: Sequence[str], x_dim: int):
        if len(sequences) != len(names):
            raise ValueError(f"{len(sequences)} sequences but {len(names)} names")
        for name, sequence in zip(names, sequences):
            if sequence.ndim != 2 or sequence.shape[1] != x_dim or sequence.shape[0] == 0:
                raise ValueError(f"sequence {name} has shape {sequence.shape}, "
                                 f"expected (T, {x_dim}) with T >= 1")

        self.x_dim = x_dim
        self.names = list(names)
        self.lengths = np.array([len(sequence) for sequence in sequences], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        if sequences:
            self.steps = np.concatenate(sequences).astype(np.float32, copy=False)
        else:
            self.steps = np.zeros((0, x_dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        i = range(len(self))[i]
        return self.steps[self.offsets[i]:self.offsets[i + 1]]

    @property
    def total_steps(self) -> int:
        """The number of time steps summed over all sequences."""
        return int(self.lengths.sum())

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if len(self) else 0

    def batch_order(self, batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None,
                    drop_last: bool = False) -> list[np.ndarray]:
        """Return the sequence indices of each mini-batch of one epoch.

        Without `shuffle` the sequences come in stored order. With it, the order
        is `torch.randperm(len(self), generator=generator)` with a CPU
        generator, so the same generator state gives the same batches. Without
        a generator, torch's global generator is used. Sequences are not sorted by length, within
        a batch or across batches. The last batch is smaller when `len(self)` is
        not a multiple of `batch_size`, unless `drop_last` leaves it out.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if shuffle:
            order = torch.randperm(len(self), generator=generator).numpy()
        else:
            order = np.arange(len(self))

        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        return [order[start:start + batch_size] for start in range(0, stop, batch_size)]

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False,
                start: int = 0) -> Iterator[Batch]:
        """Yield the mini-batches of one epoch in the order of `batch_order`.

        The order is drawn when this is called, not when iteration starts.
        `start` skips that many batches without building them: to resume an
        epoch, pass a generator in the state it had when the epoch began and
        the number of batches already done.
        """
        order = self.batch_order(batch_size, shuffle=shuffle, generator=generator,
                                 drop_last=drop_last)
        return (self.batch(indices) for indices in order[start:])

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Build the zero-padded batch of the sequences at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        lengths = self.lengths[indices]
        width = int(lengths.max()) if len(indices) else 0

        x = np.zeros((len(indices), width, self.x_dim), dtype=np.float32)
        for row, i in enumerate(indices):
            x[row, :lengths[row]] = self.steps[self.offsets[i]:self.offsets[i + 1]]
        mask = np.arange(width)[None, :] < lengths[:, None]

        return Batch(x=torch.from_numpy(x), mask=torch.from_numpy(mask),
                     lengths=torch.from_numpy(lengths.copy()),
                     index=torch.from_numpy(indices.copy()))

    def __repr__(self) -> str:
        return (f"SequenceData({len(self)} sequences, {self.total_steps} steps, "
                f"x_dim={self.x_dim})")


@dataclass
class Dataset:
    """A data set split three ways, with what the emission needs to know about it.

    :param str name: the name given to `load_dataset`.
    :param SequenceData train, valid, test: the splits.
    :param int x_dim: the dimension of one step (88 keys, 513 frequency bins).
    :param str family: the emission family that fits the values:
        "bernoulli" for binary piano rolls, "exponential" for power spectrograms.
    :param list sources: the files the data was read from.
    :param dict files: for speech, the audio files of each split (keys
        "train", "valid", "test"); empty for music.
    """

    name: str
    train: SequenceData
    valid: SequenceData
    test: SequenceData
    x_dim: int
    family: str
    sources: list[Path] = field(default_factory=list)
    files: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def splits(self) -> dict[str, SequenceData]:
        return {"train": self.train, "valid": self.valid, "test": self.test}


def load_dataset(name: str) -> Dataset:
    """Load a data set by name: "jsb", "nottingham", "musedata", "piano-midi", "speech:DIR"
    or "synthetic:SPEC?n=200&T=40&seed=0".

    Raises DataError when the name is unknown or the data cannot be read.
    """
    if name.startswith(SPEECH_PREFIX):
        from runtime.speech import load_speech

        directory = name[len(SPEECH_PREFIX):]
        if not directory:
            raise DataError("'speech:' needs a folder of audio files, e.g. speech:data/librispeech")
        return load_speech(directory)

    if name.startswith(SYNTHETIC_PREFIX):
        from runtime.synthetic import load_synthetic_name

        return load_synthetic_name(name)

    if name in MUSIC_NAMES:
        from runtime.music import load_music

        return load_music(name)

    known = ", ".join(MUSIC_NAMES) + ", speech:DIR, synthetic:SPEC"
    close = difflib.get_close_matches(name.lower(), MUSIC_NAMES, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"unknown data set '{name}'.{hint} Known data sets: {known}.")


def fetch(name: str) -> Path:
    """Download the file of a music data set into `cache_dir()`; see `runtime.music.fetch`."""
    from runtime.music import fetch as fetch_music

    return fetch_music(name)
