"""The data layer: batching, piano-roll files, the restricted unpickler and fetch."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from runtime import music
from runtime.data import (Batch, DataError, DataWarning, SequenceData, cache_dir, data_dirs,
                          fetch, load_dataset)
from runtime.music import load_music, read_mat_rolls, read_pickle_rolls

REPO = Path(__file__).resolve().parent.parent


def _music_dir() -> Path:
    # CI sets DSSM_DATA_DIR relative to the repository root. The data layer
    # resolves links, so this path is resolved too and the two compare equal.
    configured = os.environ.get("DSSM_DATA_DIR")
    folder = Path(configured) if configured else Path("../shared/data/music")
    return (REPO / folder).resolve()


MUSIC_DIR = _music_dir()
needs_music = pytest.mark.skipif(not (MUSIC_DIR / "jsb_chorales.pickle").is_file(),
                                 reason=f"the music data is not in {MUSIC_DIR}")


@pytest.fixture(autouse=True)
def isolated_folders(tmp_path, monkeypatch):
    """Point the cache at a fresh folder and search no data folder unless a test sets one."""
    monkeypatch.setenv("DSSM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DSSM_DATA_DIR", raising=False)


def _write_pickle(path: Path, contents, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(contents, protocol=protocol))
    return path


def _cells(*matrices) -> np.ndarray:
    cells = np.empty((1, len(matrices)), dtype=object)
    for i, matrix in enumerate(matrices):
        cells[0, i] = matrix
    return cells


def _write_mat(path: Path, train=None, valid=None, test=None) -> Path:
    roll = np.zeros((3, 88), dtype=np.uint8)
    roll[0, 39] = 1
    variables = {"traindata": _cells(*(train if train is not None else [roll])),
                 "validdata": _cells(*(valid if valid is not None else [roll])),
                 "testdata": _cells(*(test if test is not None else [roll]))}
    scipy.io.savemat(path, variables, do_compression=True)
    return path


# Batching.

def _sequences(lengths, x_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    sequences = [rng.random((length, x_dim)).astype(np.float32) + 1.0 for length in lengths]
    return SequenceData(sequences, [f"s{i}" for i in range(len(lengths))], x_dim), sequences


def test_sequence_data_counts():
    data, sequences = _sequences([4, 1, 7])

    assert len(data) == 3
    assert data.total_steps == 12
    assert data.max_length == 7
    np.testing.assert_array_equal(data[2], sequences[2])
    np.testing.assert_array_equal(data[-1], sequences[2])


def test_batch_padding_mask_and_values():
    data, sequences = _sequences([4, 1, 7, 2])

    batch = data.batch([2, 1, 3])

    assert batch.x.shape == (3, 7, 3)
    assert batch.x.dtype == torch.float32
    assert batch.mask.dtype == torch.bool
    assert batch.lengths.tolist() == [7, 1, 2]
    assert batch.index.tolist() == [2, 1, 3]
    assert batch.mask.sum(dim=1).tolist() == [7, 1, 2]
    for row, i in enumerate([2, 1, 3]):
        length = len(sequences[i])
        np.testing.assert_array_equal(batch.x[row, :length].numpy(), sequences[i])
        assert not batch.mask[row, length:].any()
        assert torch.all(batch.x[row, length:] == 0)
    assert torch.isfinite(batch.x).all()


def test_batches_without_shuffle_keep_stored_order():
    data, _ = _sequences([2] * 7)

    batches = list(data.batches(batch_size=3))

    assert [b.index.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [len(b) for b in data.batches(batch_size=3, drop_last=True)] == [3, 3]


def test_batches_repeat_for_same_generator_seed():
    data, _ = _sequences(list(range(1, 51)))

    def epoch(seed):
        generator = torch.Generator().manual_seed(seed)
        return [b.index.tolist() for b in data.batches(20, shuffle=True, generator=generator)]

    first, again, other = epoch(0), epoch(0), epoch(1)

    assert first == again
    assert first != other
    assert sorted(i for indices in first for i in indices) == list(range(50))
    assert [len(indices) for indices in first] == [20, 20, 10]


def test_batches_start_resumes_mid_epoch():
    data, _ = _sequences(list(range(1, 30)))
    full = [b.index.tolist()
            for b in data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3))]

    resumed = [b.index.tolist()
               for b in data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3),
                                     start=5)]

    assert resumed == full[5:]


def test_batch_to_moves_every_tensor():
    data, _ = _sequences([3, 2])

    moved = data.batch([0, 1]).to("meta")

    assert isinstance(moved, Batch)
    for tensor in (moved.x, moved.mask, moved.lengths, moved.index):
        assert tensor.device.type == "meta"


def test_batch_size_zero_is_rejected():
    data, _ = _sequences([3])

    with pytest.raises(ValueError, match="batch_size"):
        data.batch_order(0)


def test_sequence_data_rejects_empty_sequence():
    with pytest.raises(ValueError, match="s0"):
        SequenceData([np.zeros((0, 3), dtype=np.float32)], ["s0"], 3)


# Folders and names.

def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DSSM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == (tmp_path / "xdg" / "dssm").resolve()

    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "dssm"

    monkeypatch.setenv("DSSM_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == (tmp_path / "mine").resolve()


def test_data_dirs_put_data_dir_first(tmp_path, monkeypatch):
    monkeypatch.setenv("DSSM_DATA_DIR", str(tmp_path / "data"))

    assert data_dirs() == [(tmp_path / "data").resolve(), cache_dir()]


def test_unknown_data_set_suggests_name():
    with pytest.raises(DataError, match="Did you mean 'jsb'") as raised:
        load_dataset("jbs")
    assert "speech:DIR" in str(raised.value)


def test_missing_music_file_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("DSSM_DATA_DIR", str(tmp_path / "empty"))

    with pytest.raises(DataError) as raised:
        load_dataset("jsb")

    message = str(raised.value)
    assert "jsb_chorales.pickle" in message
    assert "JSB_Chorales.mat" in message
    assert str((tmp_path / "empty").resolve()) in message
    assert str(cache_dir()) in message
    assert "dssm data fetch jsb" in message
    assert "DSSM_DATA_DIR" in message


# The real data sets.

@needs_music
@pytest.mark.data
def test_jsb_pickle_matches_published_counts(monkeypatch):
    monkeypatch.setenv("DSSM_DATA_DIR", str(MUSIC_DIR))

    data = load_dataset("jsb")

    assert data.sources == [MUSIC_DIR / "jsb_chorales.pickle"]
    assert (data.x_dim, data.family) == (88, "bernoulli")
    assert [len(data.train), len(data.valid), len(data.test)] == [229, 76, 77]
    assert [data.train.total_steps, data.valid.total_steps, data.test.total_steps] == \
        [13807, 4602, 4725]
    assert data.test.max_length == 160
    assert set(np.unique(data.train.steps)) == {0.0, 1.0}


@needs_music
@pytest.mark.data
def test_jsb_pickle_and_mat_rolls_identical():
    from_pickle = read_pickle_rolls(MUSIC_DIR / "jsb_chorales.pickle")
    from_mat = read_mat_rolls(MUSIC_DIR / "JSB_Chorales.mat")

    for split in ("train", "valid", "test"):
        assert len(from_pickle[split]) == len(from_mat[split])
        for (label, roll), (mat_label, mat_roll) in zip(from_pickle[split], from_mat[split]):
            assert label == mat_label
            np.testing.assert_array_equal(roll, mat_roll, err_msg=label)


@needs_music
@pytest.mark.data
def test_jsb_falls_back_to_mat(tmp_path, monkeypatch):
    folder = tmp_path / "only-mat"
    folder.mkdir()
    shutil.copy(MUSIC_DIR / "JSB_Chorales.mat", folder)
    monkeypatch.setenv("DSSM_DATA_DIR", str(folder))

    data = load_dataset("jsb")

    assert data.sources == [folder.resolve() / "JSB_Chorales.mat"]
    assert [len(data.train), len(data.valid), len(data.test)] == [229, 76, 77]


@pytest.mark.data
@pytest.mark.parametrize("name, file_name, counts, total_steps", [
    ("nottingham", "Nottingham.mat", [694, 173, 170], [176561, 45513, 44463]),
    ("musedata", "MuseData.mat", [524, 135, 124], [245202, 82755, 64339]),
    ("piano-midi", "Piano_midi.mat", [87, 12, 25], [75911, 8540, 19036]),
])
def test_mat_sets_match_published_counts(name, file_name, counts, total_steps):
    if not (MUSIC_DIR / file_name).is_file():
        pytest.skip(f"{file_name} is not in {MUSIC_DIR}")

    data = load_music(name, search_dirs=[MUSIC_DIR])

    assert [len(split) for split in data.splits.values()] == counts
    assert [split.total_steps for split in data.splits.values()] == total_steps


# Invalid pickles.

def test_pickle_with_current_numpy_scalars_loads(tmp_path):
    contents = {"train": [[(np.int64(60), np.int64(64)), ()]],
                "valid": [[(np.int64(21),)]],
                "test": [[(np.int64(108),)]]}
    # Python 3 writes bytes at protocol 2 through _codecs.encode, which the
    # unpickler rejects, so only protocols 3 and up are read here.
    for protocol in (3, 4, 5):
        path = _write_pickle(tmp_path / f"p{protocol}.pickle", contents, protocol)

        rolls = read_pickle_rolls(path)

        label, roll = rolls["train"][0]
        assert label == "train[0]"
        assert roll.shape == (2, 88)
        assert np.flatnonzero(roll[0]).tolist() == [39, 43]
        assert not roll[1].any()
        assert np.flatnonzero(rolls["valid"][0][1][0]).tolist() == [0]
        assert np.flatnonzero(rolls["test"][0][1][0]).tolist() == [87]


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    def __init__(self, expression):
        self.expression = expression

    def __reduce__(self):
        return (eval, (self.expression,))


def test_pickle_calling_os_system_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = _write_pickle(tmp_path / "evil.pickle",
                         {"train": [_RunsCommand(f"touch {marker}")], "valid": [], "test": []})

    with pytest.raises(DataError, match="system") as raised:
        read_pickle_rolls(path)

    assert str(path) in str(raised.value)
    assert "nothing in it was run" in str(raised.value)
    assert not marker.exists()


def test_pickle_calling_eval_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    expression = f"open({str(marker)!r}, 'w').close()"
    handmade = (b"cbuiltins\neval\n(V" + expression.encode() + b"\ntR.")
    for name, content in [("made.pickle", pickle.dumps(_Evaluates(expression), protocol=2)),
                          ("handmade.pickle", handmade)]:
        path = tmp_path / name
        path.write_bytes(content)

        with pytest.raises(DataError, match="eval") as raised:
            read_pickle_rolls(path)

        assert str(path) in str(raised.value)
        assert not marker.exists()


def test_pickle_with_non_integer_dtype_is_rejected(tmp_path):
    path = _write_pickle(tmp_path / "float.pickle",
                         {"train": [[(np.float64(60.0),)]], "valid": [], "test": []})

    with pytest.raises(DataError, match="float.pickle"):
        read_pickle_rolls(path)


@pytest.mark.parametrize("note", [20, 109, -1])
def test_pickle_note_outside_keys_is_rejected(tmp_path, note):
    path = _write_pickle(tmp_path / "notes.pickle",
                         {"train": [[(60,), (note,)]], "valid": [], "test": []})

    with pytest.raises(DataError, match=r"train\[0\] step 1 contains note") as raised:
        read_pickle_rolls(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 60.0, True, "60"])
def test_pickle_non_integer_note_is_rejected(tmp_path, value):
    path = _write_pickle(tmp_path / "values.pickle",
                         {"train": [[(value,)]], "valid": [], "test": []})

    with pytest.raises(DataError, match="not a MIDI note number") as raised:
        read_pickle_rolls(path)
    assert str(path) in str(raised.value)


def test_pickle_empty_sequence_is_left_out_with_warning(tmp_path):
    path = _write_pickle(tmp_path / "gap.pickle",
                         {"train": [[(60,)], [], [(62,)]], "valid": [[(60,)]], "test": [[(60,)]]})

    with pytest.warns(DataWarning, match=r"gap.pickle: train\[1\] has no time steps"):
        rolls = read_pickle_rolls(path)

    assert [label for label, _ in rolls["train"]] == ["train[0]", "train[2]"]


def test_pickle_missing_split_is_rejected(tmp_path):
    path = _write_pickle(tmp_path / "two.pickle", {"train": [], "test": []})

    with pytest.raises(DataError, match="'valid' is missing"):
        read_pickle_rolls(path)


def test_pickle_of_wrong_type_is_rejected(tmp_path):
    path = _write_pickle(tmp_path / "list.pickle", [[(60,)]])

    with pytest.raises(DataError, match="expected a dict"):
        read_pickle_rolls(path)


def test_truncated_pickle_names_file(tmp_path):
    content = pickle.dumps({"train": [[(60,)] * 50], "valid": [], "test": []}, protocol=2)
    for cut in (0, 1, len(content) // 2, len(content) - 1):
        path = tmp_path / f"cut{cut}.pickle"
        path.write_bytes(content[:cut])

        with pytest.raises(DataError, match="truncated or corrupt") as raised:
            read_pickle_rolls(path)
        assert str(path) in str(raised.value)


@needs_music
@pytest.mark.data
def test_truncated_real_pickle_names_file(tmp_path):
    content = (MUSIC_DIR / "jsb_chorales.pickle").read_bytes()
    path = tmp_path / "jsb_chorales.pickle"
    path.write_bytes(content[:len(content) // 3])

    with pytest.raises(DataError, match="truncated or corrupt") as raised:
        read_pickle_rolls(path)
    assert str(path) in str(raised.value)


# Invalid .mat files.

def test_mat_roll_columns_are_keys(tmp_path):
    roll = np.zeros((2, 88), dtype=np.uint8)
    roll[1, 87] = 1
    path = _write_mat(tmp_path / "ok.mat", train=[roll])

    rolls = read_mat_rolls(path)

    label, loaded = rolls["train"][0]
    assert label == "train[0]"
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, roll)


def test_mat_wrong_key_count_is_rejected(tmp_path):
    path = _write_mat(tmp_path / "keys.mat", valid=[np.zeros((4, 87), dtype=np.uint8)])

    with pytest.raises(DataError, match=r"valid\[0\] has shape \(4, 87\), expected T x 88") \
            as raised:
        read_mat_rolls(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("value, message", [(np.nan, "NaN or infinite"),
                                            (np.inf, "NaN or infinite"),
                                            (2.0, "the value 2")])
def test_mat_bad_values_are_rejected(tmp_path, value, message):
    roll = np.zeros((3, 88))
    roll[1, 5] = value
    path = _write_mat(tmp_path / "values.mat", test=[roll])

    with pytest.raises(DataError, match=message) as raised:
        read_mat_rolls(path)
    assert str(path) in str(raised.value)


def test_mat_empty_sequence_is_left_out_with_warning(tmp_path):
    roll = np.ones((2, 88), dtype=np.uint8)
    path = _write_mat(tmp_path / "gap.mat", train=[roll, np.zeros((0, 88), dtype=np.uint8), roll])

    with pytest.warns(DataWarning, match=r"gap.mat: train\[1\] has no time steps"):
        rolls = read_mat_rolls(path)

    assert [label for label, _ in rolls["train"]] == ["train[0]", "train[2]"]


def test_mat_missing_variable_is_rejected(tmp_path):
    path = tmp_path / "partial.mat"
    scipy.io.savemat(path, {"traindata": _cells(np.zeros((1, 88)))})

    with pytest.raises(DataError, match="'validdata' is missing"):
        read_mat_rolls(path)


def test_truncated_or_corrupt_mat_names_file(tmp_path):
    rolls = [np.eye(88, dtype=np.uint8)[: 10 + i] for i in range(20)]
    content = _write_mat(tmp_path / "whole.mat", train=rolls).read_bytes()
    corrupt = bytearray(content)
    corrupt[300:340] = bytes(40)
    cases = {"empty.mat": b"", "header.mat": content[:100], "half.mat": content[:len(content) // 2],
             "corrupt.mat": bytes(corrupt), "text.mat": b"not a MATLAB file " * 20}
    for name, bad in cases.items():
        path = tmp_path / name
        path.write_bytes(bad)

        with pytest.raises(DataError, match="truncated or corrupt") as raised:
            read_mat_rolls(path)
        assert str(path) in str(raised.value)


def test_unreadable_music_file_names_file(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    (folder / "jsb_chorales.pickle").mkdir(parents=True)
    _write_mat(folder / "JSB_Chorales.mat")
    (folder / "Nottingham.mat").write_bytes(b"")
    monkeypatch.setenv("DSSM_DATA_DIR", str(folder))

    # A folder named like the pickle is not a file, so the .mat file is used.
    assert load_dataset("jsb").sources == [folder.resolve() / "JSB_Chorales.mat"]
    with pytest.raises(DataError, match="Nottingham.mat"):
        load_dataset("nottingham")


# Downloading.

class _FakeNetwork:
    """Stands in for urllib.request.urlopen, serving fixed bytes and recording URLs."""

    def __init__(self, content: bytes | None = None, error: Exception | None = None):
        self.content = content
        self.error = error
        self.urls = []

    def __call__(self, url, timeout=None):
        self.urls.append(url)
        if self.error is not None:
            raise self.error
        return io.BytesIO(self.content)


def _pin_download(monkeypatch, content: bytes) -> None:
    pinned = music.Download("https://example.invalid/jsb_chorales.pickle",
                            hashlib.sha256(content).hexdigest())
    monkeypatch.setitem(music.DOWNLOADS, "jsb_chorales.pickle", pinned)


def test_fetch_writes_verified_file(tmp_path, monkeypatch):
    content = pickle.dumps({"train": [[(60,)]], "valid": [[(62,)]], "test": [[(64,)]]})
    _pin_download(monkeypatch, content)
    network = _FakeNetwork(content)
    monkeypatch.setattr(urllib.request, "urlopen", network)

    path = fetch("jsb")

    assert path == cache_dir() / "jsb_chorales.pickle"
    assert path.read_bytes() == content
    assert network.urls == ["https://example.invalid/jsb_chorales.pickle"]
    assert load_dataset("jsb").sources == [path]


def test_fetch_keeps_verified_file(tmp_path, monkeypatch):
    content = b"already here"
    _pin_download(monkeypatch, content)
    (cache_dir()).mkdir(parents=True)
    (cache_dir() / "jsb_chorales.pickle").write_bytes(content)
    network = _FakeNetwork(b"other")
    monkeypatch.setattr(urllib.request, "urlopen", network)

    fetch("jsb")

    assert network.urls == []


def test_fetch_checksum_mismatch_deletes_file(tmp_path, monkeypatch):
    _pin_download(monkeypatch, b"the real file")
    cache_dir().mkdir(parents=True)
    stale = cache_dir() / "jsb_chorales.pickle"
    stale.write_bytes(b"an older, damaged download")
    monkeypatch.setattr(urllib.request, "urlopen", _FakeNetwork(b"tampered bytes"))

    with pytest.raises(DataError, match="SHA-256"):
        fetch("jsb")

    assert not stale.exists()
    assert list(cache_dir().iterdir()) == []


def test_fetch_network_failure_is_data_error(monkeypatch):
    network = _FakeNetwork(error=urllib.error.URLError("no route to host"))
    monkeypatch.setattr(urllib.request, "urlopen", network)

    with pytest.raises(DataError, match="no route to host.*DSSM_DATA_DIR"):
        fetch("jsb")
    assert not (cache_dir() / "jsb_chorales.pickle").exists()


def test_fetch_unknown_name_is_rejected():
    with pytest.raises(DataError, match="no download"):
        fetch("bach")


@needs_music
@pytest.mark.data
def test_fetch_accepts_pinned_pyro_pickle(monkeypatch):
    content = (MUSIC_DIR / "jsb_chorales.pickle").read_bytes()
    network = _FakeNetwork(content)
    monkeypatch.setattr(urllib.request, "urlopen", network)

    path = fetch("jsb")

    assert len(network.urls) == 1
    assert network.urls[0].endswith("/polyphonic/jsb_chorales.pickle")
    assert "pyro-ppl/datasets" in network.urls[0]
    assert path.read_bytes() == content
    assert len(load_dataset("jsb").train) == 229
