"""Piano rolls out: standard MIDI files with mido and PNG pictures with matplotlib.

A piano roll is a (T, 88) array of 0/1 values, one row per time step and one
column per piano key. Key j is MIDI note j + 21, so column 0 is A0 and
column 87 is C8.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import mido
import numpy as np
import torch

from taxonomy.writing import write_bytes_atomically

KEYS = 88
LOWEST_NOTE = 21
TICKS_PER_BEAT = 480
TEMPO = 500_000  # microseconds per beat, 120 beats per minute


def _as_array(piano_roll) -> np.ndarray:
    if isinstance(piano_roll, torch.Tensor):
        piano_roll = piano_roll.detach().cpu().numpy()
    roll = np.asarray(piano_roll)
    if roll.ndim != 2 or roll.shape[1] != KEYS:
        raise ValueError(f"a piano roll has shape (T, {KEYS}), not {roll.shape}")
    return roll


def write_midi(piano_roll, path: str | os.PathLike, step_seconds: float = 0.25,
               velocity: int = 80, program: int = 0) -> Path:
    """Write a binary piano roll as a one-track standard MIDI file; return the path.

    A key that is on for consecutive steps becomes one held note, because a
    piano roll cannot tell a held note from repeated strikes. The tempo is
    120 beats per minute at 480 ticks per beat, so the default 0.25 s step is
    240 ticks.

    :param piano_roll: (T, 88) array or tensor of 0/1 (or bool) values.
    :param float step_seconds: the duration of one time step in seconds.
    :param int velocity: the MIDI velocity of every note, 1 to 127.
    :param int program: the General MIDI program (0 is the acoustic grand piano).
    :raises ValueError: for another shape, values other than 0 and 1, or a
        step shorter than one tick.
    """
    roll = _as_array(piano_roll)
    if not np.isin(roll, (0, 1)).all():
        raise ValueError("piano roll values must be 0 or 1; threshold probabilities first, "
                         "e.g. write_midi(roll > 0.5, ...)")
    roll = roll.astype(bool)
    ticks_per_step = round(mido.second2tick(step_seconds, TICKS_PER_BEAT, TEMPO))
    if ticks_per_step < 1:
        raise ValueError(f"step_seconds {step_seconds} is shorter than one MIDI tick")

    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=TEMPO, time=0))
    track.append(mido.Message("program_change", program=program, time=0))

    # Compare each step with the one before; a silent step after the last
    # closes the notes still sounding. Releases come before strikes.
    silence = np.zeros(KEYS, dtype=bool)
    previous = silence
    last_event_tick = 0
    for step, current in enumerate([*roll, silence]):
        tick = step * ticks_per_step
        released = np.flatnonzero(previous & ~current)
        struck = np.flatnonzero(current & ~previous)
        for key, kind in [(key, "note_off") for key in released] + \
                         [(key, "note_on") for key in struck]:
            track.append(mido.Message(kind, note=int(key) + LOWEST_NOTE,
                                      velocity=velocity if kind == "note_on" else 0,
                                      time=tick - last_event_tick))
            last_event_tick = tick
        previous = current
    end_tick = len(roll) * ticks_per_step
    track.append(mido.MetaMessage("end_of_track", time=end_tick - last_event_tick))

    midi = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(track)
    buffer = io.BytesIO()
    midi.save(file=buffer)
    write_bytes_atomically(path, buffer.getvalue())
    return Path(path)


def _note_name(note: int) -> str:
    names = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
    return f"{names[note % 12]}{note // 12 - 1}"


def plot_piano_roll(piano_roll, path: str | os.PathLike, title: str | None = None,
                    step_seconds: float | None = None) -> Path:
    """Draw a piano roll as a PNG: time to the right, pitch upwards; return the path.

    Values between 0 and 1 (e.g. emission probabilities from `reconstruct`)
    are drawn as shades of grey, 1 as black.

    :param piano_roll: (T, 88) array or tensor with values in [0, 1].
    :param str title: the figure's title, or None.
    :param float step_seconds: label the time axis in seconds instead of steps.
    """
    from matplotlib.figure import Figure

    roll = _as_array(piano_roll).astype(float)
    steps = roll.shape[0]
    duration = steps * step_seconds if step_seconds else steps

    figure = Figure(figsize=(max(6.0, min(20.0, steps / 10)), 4.0), dpi=100,
                    layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(roll.T, origin="lower", aspect="auto", cmap="Greys", vmin=0.0, vmax=1.0,
                interpolation="nearest", extent=(0, duration, -0.5, KEYS - 0.5))

    c_keys = [key for key in range(KEYS) if (key + LOWEST_NOTE) % 12 == 0]
    axes.set_yticks(c_keys, [_note_name(key + LOWEST_NOTE) for key in c_keys])
    axes.set_ylabel("key")
    axes.set_xlabel("time (s)" if step_seconds else "step")
    axes.grid(axis="y", color="tab:blue", alpha=0.2, linewidth=0.5)
    if title:
        axes.set_title(title)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomically(path, buffer.getvalue())
    return Path(path)
