"""The `dssm check` and `dssm explore` commands: exit codes, output and file errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import taxonomy.parser
from taxonomy.cli import main
from taxonomy.hierarchy import check_spec, paper_cells, parse_cell

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
DMM = str(SPECS / "dmm.dssm")
ARSSM = str(SPECS / "arssm.dssm")
VRNN = str(SPECS / "vrnn.dssm")
GOOD = ("model M\nlatent z : normal[16]\nobserved x : bernoulli[88]\n"
        "z[t] <- z[t-1]\nx[t] <- z[t]\n")
REQUIRED_KEYS = {"model", "group", "orders", "relaxed", "known_as", "outside"}


def write(folder: Path, name: str, text: str | bytes) -> str:
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def run_check(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(["check", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


# --- dssm check: good specs -----------------------------------------------------------------


def test_check_good_spec_exits_zero(capsys):
    code, out, err = run_check(capsys, DMM)

    assert code == 0
    assert err == ""
    assert f"{DMM}: model DMM" in out
    assert "group:   HMM" in out
    assert "cell:    HMM()" in out
    assert "orders:  z<-z 1, x<-z 0, x<-x absent, z<-x absent" in out
    assert "relaxed: none" in out
    assert "known as: DMM" in out
    assert "independent of x[1:t-1] given z[t-1]: yes" in out
    assert "backward RNN" in out
    assert "p(z[t] | z[t-1], x[t:T])" in out


def test_check_text_shows_markers_of_relaxed_edges(capsys):
    code, out, _ = run_check(capsys, ARSSM)

    assert code == 0
    assert "relaxed: z<-z ○, x<-z ◑, x<-x ●" in out
    assert "known as: ArSSM" in out
    assert "independent of x[1:t-1] given z[t-1]: no" in out
    assert "bidirectional RNN" in out
    assert "p(z[t] | z[1:t-1], x[1:T])" in out


def test_check_json_prints_one_object_per_spec(capsys):
    code, out, err = run_check(capsys, "--json", DMM, ARSSM, VRNN)
    objects = json_lines(out)

    assert code == 0
    assert err == ""
    assert len(objects) == 3
    for data in objects:
        assert REQUIRED_KEYS <= set(data)
    assert [data["model"] for data in objects] == ["DMM", "ArSSM", "VRNN"]


def test_check_json_fields_of_arssm(capsys):
    _, out, _ = run_check(capsys, "--json", ARSSM)
    (data,) = json_lines(out)

    assert data["group"] == "AR-HMM"
    assert data["cell"] == "AR-HMM(z<-z, x<-z, x<-x)"
    assert data["orders"] == {"z<-z": "all", "x<-z": "all", "x<-x": "all", "z<-x": None}
    assert data["relaxed"] == ["z<-z", "x<-z", "x<-x"]
    assert data["markers"] == ["○", "◑", "●"]
    assert data["known_as"] == ["ArSSM"]
    assert data["outside"] == []
    assert data["guide"]["z_independent_of_past_x"] is False
    assert data["guide"]["posterior_conditioning"] == ["z[1:t-1]", "x[1:T]"]
    assert data["asserted_cell"] == "AR-HMM(z<-z, x<-z, x<-x)"
    assert data["assertion_holds"] is True


def test_check_json_orders_are_integers(capsys, tmp_path):
    spec = write(tmp_path, "finite.dssm", GOOD.replace("z[t] <- z[t-1]", "z[t] <- z[t-3:t-1]")
                 .replace("x[t] <- z[t]", "x[t] <- z[t-1:t]"))
    code, out, _ = run_check(capsys, "--json", spec)
    (data,) = json_lines(out)

    assert code == 0
    assert data["orders"] == {"z<-z": 3, "x<-z": 1, "x<-x": None, "z<-x": None}
    assert data["cell"] == "HMM(z<-z:3, x<-z:1)"
    assert data["paper_cell"] is False
    assert data["relaxed"] == []
    assert data["known_as"] == []


def test_check_json_for_repository_specs(capsys):
    paths = sorted(str(path) for path in SPECS.rglob("*.dssm"))
    code, out, _ = run_check(capsys, "--json", *paths)
    objects = json_lines(out)

    assert code == 0
    assert [data["path"] for data in objects] == paths
    assert all(data["outside"] == [] for data in objects)


# --- dssm check: specs that fail ------------------------------------------------------------


def test_check_outside_spec_exits_one(capsys, tmp_path):
    spec = write(tmp_path, "storn.dssm", GOOD.replace("z[t] <- z[t-1]", "z[t] <- x[t-1]"))
    code, out, err = run_check(capsys, spec)

    assert code == 1
    assert "outside the hierarchy:" in out
    assert "the latent does not evolve" in out
    assert f"{spec}:4:1: error: outside the hierarchy:" in err
    assert "hint: add `z[t] <- z[t-1]`" in err


def test_check_outside_spec_json_names_the_reason(capsys, tmp_path):
    spec = write(tmp_path, "future.dssm", GOOD.replace("x[t] <- z[t]", "x[t] <- z[t], z[t+1]"))
    code, out, _ = run_check(capsys, "--json", spec)
    (data,) = json_lines(out)

    assert code == 1
    assert data["group"] is None
    assert data["relaxed"] == []
    assert [reason["reason"] for reason in data["outside"]] == ["future-reference"]
    assert data["outside"][0]["line"] == 5


def test_check_cell_mismatch_exits_one(capsys, tmp_path):
    spec = write(tmp_path, "mismatch.dssm", GOOD + "cell AR-HMM(x<-x)\n")
    code, out, err = run_check(capsys, spec)

    assert code == 1
    assert "cell:    HMM()" in out
    assert f"{spec}:6:1: error: the spec asserts cell AR-HMM(x<-x) but lands in HMM()" in err
    assert "    cell AR-HMM(x<-x)\n    ^~~~" in err


def test_check_syntax_error_format(capsys, tmp_path):
    spec = write(tmp_path, "broken.dssm", GOOD.replace("z[t-1]", "z[t-1"))
    code, out, err = run_check(capsys, spec)

    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"{spec}:4:14: error: missing closing bracket ']'; found end of line",
        "    z[t] <- z[t-1",
        "                 ^",
    ]


def test_check_misspelt_keyword_suggests_it(capsys, tmp_path):
    spec = write(tmp_path, "typo.dssm", GOOD.replace("observed", "obsrved"))
    code, _, err = run_check(capsys, spec)

    assert code == 1
    assert f"{spec}:3:1: error: unknown statement 'obsrved'" in err
    assert "hint: did you mean 'observed'?" in err


def test_check_reports_all_despite_bad(capsys, tmp_path):
    bad = write(tmp_path, "bad.dssm", GOOD.replace("<-", "<"))
    code, out, err = run_check(capsys, DMM, bad, ARSSM)

    assert code == 1
    assert f"{DMM}: model DMM" in out
    assert f"{ARSSM}: model ArSSM" in out
    assert f"{bad}:4:" in err


def test_check_json_reports_all_despite_bad(capsys, tmp_path):
    bad = write(tmp_path, "bad.dssm", "model M\n")
    code, out, err = run_check(capsys, "--json", DMM, bad, ARSSM)
    objects = json_lines(out)

    assert code == 1
    assert [data["model"] for data in objects] == ["DMM", None, "ArSSM"]
    failed = objects[1]
    assert REQUIRED_KEYS <= set(failed)
    assert failed["path"] == bad
    assert "no latent variable is declared" in failed["error"]
    assert "no latent variable is declared" in err


# --- dssm check: files that cannot be read --------------------------------------------------


def test_check_missing_file(capsys, tmp_path):
    missing = str(tmp_path / "nowhere.dssm")
    code, out, err = run_check(capsys, missing)

    assert code == 1
    assert out == ""
    assert err.startswith(f"{missing}: error: no such file")


def test_check_missing_extension_suggests_it(capsys, tmp_path):
    write(tmp_path, "dmm.dssm", GOOD)
    code, _, err = run_check(capsys, str(tmp_path / "dmm"))

    assert code == 1
    assert f"did you mean '{tmp_path / 'dmm'}.dssm'?" in err


def test_check_directory(capsys, tmp_path):
    code, _, err = run_check(capsys, str(tmp_path))

    assert code == 1
    assert f"{tmp_path}: error: is a directory, not a spec file" in err
    assert "*.dssm" in err


def test_check_binary_file(capsys, tmp_path):
    spec = write(tmp_path, "model.dssm", b"model M\x00\x01\x02\n")
    code, _, err = run_check(capsys, spec)

    assert code == 1
    assert f"{spec}: error: binary file" in err


def test_check_non_utf8_file_points_at_the_byte(capsys, tmp_path):
    spec = write(tmp_path, "latin1.dssm", "model M\nlatent z : normal[16] # é\n".encode("latin-1"))
    code, _, err = run_check(capsys, spec)

    assert code == 1
    assert f"{spec}:2:25: error: not valid UTF-8 (byte 0xe9)" in err
    lines = err.splitlines()
    assert lines[2].index("^") == lines[1].index("\ufffd")
    assert "hint: save the spec as UTF-8 text" in err


def test_check_non_utf8_column_counts_characters(capsys, tmp_path):
    spec = write(tmp_path, "mixed.dssm", "# ζ\xff\n".encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    code, _, err = run_check(capsys, spec)

    assert code == 1
    assert f"{spec}:1:4: error: not valid UTF-8 (byte 0xff)" in err


@pytest.mark.parametrize("text", ["", "\n\n  \n", "# only a comment\n# and another\n"])
def test_check_empty_file(capsys, tmp_path, text):
    spec = write(tmp_path, "empty.dssm", text)
    code, _, err = run_check(capsys, spec)

    assert code == 1
    assert f"{spec}:1:1: error: empty spec: it declares nothing" in err
    assert "hint: start with `model NAME`" in err


def test_check_unreadable_file(capsys, tmp_path, monkeypatch):
    spec = write(tmp_path, "secret.dssm", GOOD)

    def deny(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    # Root may read any file, so the refusal is simulated in the parser's module.
    monkeypatch.setattr(taxonomy.parser, "open", deny, raising=False)
    code, _, err = run_check(capsys, spec)

    assert code == 1
    assert f"{spec}: error: permission denied: the file cannot be read" in err
    assert "hint: check the file's permissions" in err


def test_check_other_read_failure(capsys, tmp_path, monkeypatch):
    spec = write(tmp_path, "flaky.dssm", GOOD)

    def fail(path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(taxonomy.parser, "open", fail, raising=False)
    code, _, err = run_check(capsys, spec)

    assert code == 1
    assert f"{spec}: error: cannot read the file: Input/output error" in err


def test_check_subprocess_malformed_no_traceback(tmp_path):
    spec = write(tmp_path, "broken.dssm", "model M\nlatent z : normal[16\n")
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "taxonomy.cli", "check", spec],
                            capture_output=True, text=True, cwd=REPO, env=environment,
                            timeout=120)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{spec}:2:21: error: missing closing bracket ']'")


def test_check_subprocess_file_errors_no_traceback(tmp_path):
    files = [
        str(tmp_path / "missing.dssm"),
        str(tmp_path),
        write(tmp_path, "binary.dssm", b"\x00\xff"),
        write(tmp_path, "latin1.dssm", b"model \xe9\n"),
        write(tmp_path, "empty.dssm", ""),
        write(tmp_path, "outside.dssm", GOOD.replace("z[t] <- z[t-1]", "z[t] <- x[t-1]")),
    ]
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "taxonomy.cli", "check", *files],
                            capture_output=True, text=True, cwd=REPO, env=environment,
                            timeout=120)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("error:") == len(files)


# --- dssm explore list ----------------------------------------------------------------------


def run_explore(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(["explore", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explore_list_shows_all_paper_cells(capsys):
    code, out, _ = run_explore(capsys, "list", "--specs", str(SPECS))
    rows = out.splitlines()[1:]

    assert code == 0
    assert len(rows) == 36
    assert {row.split("  ")[0].strip() for row in rows} == {cell.label for cell in paper_cells()}
    vrnn_row = next(row for row in rows if row.startswith("DMM-Aug(z<-z, x<-z, x<-x, z<-x)"))
    assert "VRNN" in vrnn_row
    assert "vrnn.dssm" in vrnn_row


def test_explore_list_json_names_specs(capsys):
    code, out, _ = run_explore(capsys, "list", "--json", "--specs", str(SPECS))
    rows = json.loads(out)
    by_cell = {row["cell"]: row for row in rows}

    assert code == 0
    assert len(rows) == 36
    assert by_cell["HMM()"]["known_as"] == ["DMM"]
    assert sorted(Path(path).name for path in by_cell["HMM()"]["specs"]) == ["dmm.dssm",
                                                                          "hmm.dssm"]
    assert all(row["specs"] for row in rows)


def test_explore_list_one_group(capsys, tmp_path):
    code, out, _ = run_explore(capsys, "list", "--group", "F-HMM", "--json",
                               "--specs", str(tmp_path))
    rows = json.loads(out)

    assert code == 0
    assert len(rows) == 8
    assert {row["group"] for row in rows} == {"F-HMM"}
    assert all(row["specs"] == [] for row in rows)


def test_explore_list_finite_orders(capsys, tmp_path):
    code, out, _ = run_explore(capsys, "list", "--group", "HMM", "--max-order", "2", "--json",
                               "--specs", str(tmp_path))
    labels = [row["cell"] for row in json.loads(out)]

    # z<-z takes 1, 2 or all, and x<-z takes 0, 1, 2 or all.
    assert len(labels) == 12
    assert "HMM(z<-z:2, x<-z:1)" in labels
    assert "HMM(z<-z, x<-z)" in labels


def test_explore_list_unknown_group(capsys):
    code, out, err = run_explore(capsys, "list", "--group", "HNM")

    assert code == 1
    assert out == ""
    assert "error: unknown group 'HNM'" in err


def test_explore_list_rejects_order_zero(capsys):
    code, _, err = run_explore(capsys, "list", "--max-order", "0")

    assert code == 1
    assert "--max-order must be at least 1" in err


# --- dssm explore new -----------------------------------------------------------------------


def test_explore_new_writes_one_cell_to_a_file(capsys, tmp_path):
    target = tmp_path / "ar_model.dssm"
    code, _, err = run_explore(capsys, "new", "AR-HMM(z<-z, x<-x:3)", "-o", str(target))
    placement = check_spec(str(target))

    assert code == 0
    assert f"wrote {target}" in err
    assert placement.problems() == []
    assert placement.cell == parse_cell("AR-HMM(z<-z, x<-x:3)")
    assert placement.model.name == "ar_model"


def test_explore_new_paper_cells_to_a_folder(capsys, tmp_path):
    folder = tmp_path / "cells"
    code, _, err = run_explore(capsys, "new", "--paper-cells", "-o", str(folder))
    written = sorted(folder.glob("*.dssm"))

    assert code == 0
    assert len(written) == 36
    assert err.count("wrote ") == 36
    landed = set()
    for path in written:
        placement = check_spec(str(path))
        assert placement.problems() == [], path
        landed.add(placement.cell)
    assert landed == set(paper_cells())


def test_explore_new_written_cells_match_the_repository(capsys, tmp_path):
    run_explore(capsys, "new", "--paper-cells", "-o", str(tmp_path))

    for path in sorted((SPECS / "cells").glob("*.dssm")):
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name


def test_explore_new_refuses_to_overwrite(capsys, tmp_path):
    target = tmp_path / "mine.dssm"
    target.write_text("# my own spec\n")
    code, _, err = run_explore(capsys, "new", "HMM()", "-o", str(target))

    assert code == 1
    assert f"{target} already exists; pass --force to overwrite" in err
    assert target.read_text() == "# my own spec\n"


def test_explore_new_force_overwrites(capsys, tmp_path):
    target = tmp_path / "mine.dssm"
    target.write_text("# my own spec\n")
    code, _, _ = run_explore(capsys, "new", "HMM(z<-z)", "-o", str(target), "--force")

    assert code == 0
    assert check_spec(str(target)).cell == parse_cell("HMM(z<-z)")


def test_explore_new_refusal_writes_nothing(capsys, tmp_path):
    existing = tmp_path / "hmm__zz.dssm"
    existing.write_text("# my own spec\n")
    code, _, err = run_explore(capsys, "new", "--paper-cells", "-o", str(tmp_path))

    assert code == 1
    assert "already exists" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hmm__zz.dssm"]
    assert existing.read_text() == "# my own spec\n"


def test_explore_new_named_and_paper_cell_written_once(capsys, tmp_path):
    code, _, err = run_explore(capsys, "new", "HMM()", "F-HMM(z<-x:2)", "--paper-cells",
                               "-o", str(tmp_path))

    assert code == 0
    assert len(list(tmp_path.glob("*.dssm"))) == 37
    assert err.count("wrote ") == 37
    assert check_spec(str(tmp_path / "f_hmm__zx2.dssm")).cell == parse_cell("F-HMM(z<-x:2)")


def test_explore_new_keyword_file_name_gets_cell_name(capsys, tmp_path):
    target = tmp_path / "class.dssm"
    code, _, _ = run_explore(capsys, "new", "HMM(x<-z)", "-o", str(target))
    placement = check_spec(str(target))

    assert code == 0
    assert placement.model.name == "hmm__xz"
    assert placement.problems() == []


def test_explore_new_several_cells_need_a_folder(capsys, tmp_path):
    code, _, err = run_explore(capsys, "new", "HMM()", "F-HMM()", "-o", str(tmp_path / "a.dssm"))

    assert code == 1
    assert "several cells need a folder" in err


def test_explore_new_needs_a_cell(capsys, tmp_path):
    code, _, err = run_explore(capsys, "new", "-o", str(tmp_path / "a.dssm"))

    assert code == 1
    assert "name a cell" in err


@pytest.mark.parametrize("label, message", [
    ("HMM(x<-x)", "group HMM has no x<-x edge"),
    ("HMM(", "missing closing parenthesis ')'"),
    ("Hmm-Aug()", "unknown group 'Hmm-Aug'"),
])
def test_explore_new_rejects_a_bad_cell(capsys, tmp_path, label, message):
    code, _, err = run_explore(capsys, "new", label, "-o", str(tmp_path / "a.dssm"))

    assert code == 1
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "a.dssm").exists()


def test_explore_new_output_over_file_fails(capsys, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder\n")
    code, _, err = run_explore(capsys, "new", "HMM()", "-o", str(blocker))

    assert code == 1
    assert f"cannot create the folder {blocker}" in err


def test_output_cut_short_by_reader_exits_cleanly():
    # 205 kB of cells: more than a pipe buffers, so writing goes on after
    # the reader has closed its end.
    command = [sys.executable, "-m", "taxonomy.cli", "explore", "list", "--max-order", "6"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=REPO)
    assert process.stdout.readline().startswith(b"cell")
    process.stdout.close()
    _, error = process.communicate(timeout=60)

    assert process.returncode == 0
    assert error.decode() == ""
