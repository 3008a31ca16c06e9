"""Names that would break the compiled module, IAF widths, and how outputs are written."""

import os
import stat

import pytest
import torch
from pyro import poutine

from taxonomy.build import build_model
from taxonomy.cli import main
from taxonomy.errors import SpecError
from taxonomy.hierarchy import check_text
from taxonomy.writing import write_text_atomically


def spec_with(latent="z", observed="x", extra=""):
    return (f"model M\nlatent {latent} : normal[4]\nobserved {observed} : bernoulli[3]\n"
            f"{extra}{latent}[t] <- {latent}[t-1]\n{observed}[t] <- {latent}[t]\n")


@pytest.mark.parametrize("name", ["blocks", "pyro", "torch", "mask", "batch", "self",
                                  "States", "Model", "steps"])
def test_generated_code_names_are_rejected(name):
    with pytest.raises(SpecError, match="the compiled module uses itself") as error:
        check_text(spec_with(latent=name), "names.dssm")
    assert error.value.location.line == 2
    assert f"'{name}_'" in error.value.hint


def test_model_named_like_generated_class_is_rejected():
    with pytest.raises(SpecError, match="uses itself"):
        check_text(spec_with().replace("model M", "model States"), "names.dssm")


@pytest.mark.parametrize("state", ["z_0", "z_steps", "x_carry", "x_t"])
def test_state_clashing_with_generated_suffix_is_rejected(state):
    extra = f"deterministic {state}[t] = gru[3](z[t])\n"
    with pytest.raises(SpecError, match="clashes with the compiled code's name") as error:
        check_text(spec_with(extra=extra), "names.dssm")
    assert error.value.location.line == 4


def test_suffix_without_base_variable_is_allowed():
    placement = check_text(spec_with(extra="deterministic h_t[t] = gru[3](z[t])\n"))
    assert placement.cell is not None


def test_iaf_narrower_than_latent_is_rejected():
    text = spec_with() + "flow iaf[3, 2]\n"
    with pytest.raises(SpecError, match="hidden width 2 is below the latent dimension 4") as error:
        check_text(text, "flow.dssm")
    assert "flow iaf[3, 4]" in error.value.hint


def test_iaf_as_wide_as_latent_is_accepted():
    assert check_text(spec_with() + "flow iaf[3, 4]\n").model.flow == (3, 4)


def test_bare_iaf_widens_to_wide_latent(tmp_path):
    wide = spec_with().replace("normal[4]", "normal[40]") + "flow iaf\n"
    assert check_text(wide).model.flow == (3, 40)

    spec = tmp_path / "wide.dssm"
    spec.write_text(wide)
    model = build_model(spec, x_dim=3)
    x = torch.ones(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    trace = poutine.trace(model.guide).get_trace(x, mask)
    assert trace.nodes["z"]["value"].shape[-1] == 40


def test_cycle_points_at_same_step_reference(tmp_path, capsys):
    spec = tmp_path / "cycle.dssm"
    spec.write_text(spec_with() + "x[t] <- x[t-1]\nx[t] <- x[t]\n")
    assert main(["check", str(spec)]) == 1
    error = capsys.readouterr().err
    assert f"{spec}:7:9: error: outside the hierarchy: a cycle within one step" in error
    assert "read x[t-1] instead of x[t]" in error


def test_atomic_write_keeps_existing_mode(tmp_path):
    target = tmp_path / "figure.svg"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_text_atomically(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_atomic_write_new_file_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text_atomically(tmp_path / "new.txt", "text")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644


@pytest.mark.parametrize("command", [
    ["draw", "specs/dmm.dssm", "-o", "{file}/out.svg"],
    ["taxonomy", "-o", "{file}/taxonomy.svg"],
    ["compile", "specs/dmm.dssm", "-o", "{file}"],
])
def test_output_under_a_file_is_a_clear_error(command, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    status = main([part.format(file=blocker) for part in command])
    error = capsys.readouterr().err
    assert status == 1
    assert error.startswith("error: ")
    assert "Traceback" not in error
