import matplotlib.image
import mido
import numpy as np
import pytest
import torch

from runtime.music_output import plot_piano_roll, write_midi


def read_roll(path, step_seconds=0.25, steps=None):
    """Rebuild a piano roll from a MIDI file's note_on / note_off events."""
    midi = mido.MidiFile(path)
    ticks_per_step = mido.second2tick(step_seconds, midi.ticks_per_beat, 500_000)
    notes, started = [], {}
    tick = 0
    for message in mido.merge_tracks(midi.tracks):
        tick += message.time
        if message.type == "note_on" and message.velocity > 0:
            started[message.note] = tick
        elif message.type in ("note_off", "note_on"):
            notes.append((message.note, started.pop(message.note), tick))
    assert not started, "notes left sounding at the end"

    last = max((end for _, _, end in notes), default=0)
    roll = np.zeros((steps or round(last / ticks_per_step), 88), dtype=int)
    for note, start, end in notes:
        roll[round(start / ticks_per_step):round(end / ticks_per_step), note - 21] = 1
    return roll


def example_roll():
    roll = np.zeros((12, 88), dtype=int)
    roll[0:4, 39] = 1     # middle C held for four steps from the first step
    roll[2, 43] = 1       # E4 for one step
    roll[5:7, 0] = 1      # A0, the lowest key
    roll[9:12, 87] = 1    # C8, the highest key, up to the last step
    roll[6, 50] = 1
    roll[8, 50] = 1       # the same key again after a rest
    return roll


def test_midi_round_trip_recovers_roll(tmp_path):
    roll = example_roll()
    path = write_midi(roll, tmp_path / "example.mid")

    assert np.array_equal(read_roll(path, steps=len(roll)), roll)


def test_midi_keys_map_to_notes_from_21(tmp_path):
    roll = example_roll()
    midi = mido.MidiFile(write_midi(roll, tmp_path / "example.mid"))

    notes = {message.note for message in midi.tracks[0] if message.type == "note_on"}
    assert notes == {21, 60, 64, 71, 108}


def test_midi_length_follows_step_seconds(tmp_path):
    roll = example_roll()

    default = mido.MidiFile(write_midi(roll, tmp_path / "default.mid"))
    slow = mido.MidiFile(write_midi(roll, tmp_path / "slow.mid", step_seconds=0.5))

    assert default.type == 0
    assert default.length == pytest.approx(12 * 0.25)
    assert slow.length == pytest.approx(12 * 0.5)
    assert np.array_equal(read_roll(tmp_path / "slow.mid", 0.5, steps=12), roll)


def test_midi_of_silent_roll_has_no_notes(tmp_path):
    midi = mido.MidiFile(write_midi(np.zeros((4, 88)), tmp_path / "silent.mid"))

    assert [message for message in midi.tracks[0] if message.type == "note_on"] == []
    assert midi.length == pytest.approx(1.0)


def test_midi_accepts_bool_tensor(tmp_path):
    roll = torch.from_numpy(example_roll()).bool()
    path = write_midi(roll, tmp_path / "tensor.mid")

    assert np.array_equal(read_roll(path, steps=12), example_roll())


def test_midi_rejects_probabilities(tmp_path):
    with pytest.raises(ValueError, match="must be 0 or 1"):
        write_midi(np.full((3, 88), 0.3), tmp_path / "bad.mid")


def test_midi_rejects_wrong_key_count(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(T, 88\)"):
        write_midi(np.zeros((3, 12)), tmp_path / "bad.mid")


def test_plot_piano_roll_draws_notes(tmp_path):
    path = plot_piano_roll(example_roll(), tmp_path / "roll.png", title="example")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 300
    dark = (image[..., :3].mean(-1) < 0.2).sum()
    assert dark > 500, "no notes drawn"


def test_plot_piano_roll_shades_probabilities(tmp_path):
    probabilities = np.linspace(0, 1, 20)[:, None] * np.ones((1, 88))
    path = plot_piano_roll(probabilities, tmp_path / "shades.png", step_seconds=0.25)

    image = matplotlib.image.imread(path)[..., :3].mean(-1)
    grey = ((image > 0.3) & (image < 0.7)).sum()
    assert grey > 1000
