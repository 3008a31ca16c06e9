"""`dssm compile`: writing modules, --check, errors, and where files go."""

import os
import re
import shutil

import pytest
from support.compiled import REPO, SPECS, one_torch_thread

from taxonomy import build
from taxonomy.build import collect_specs, module_name, output_paths
from taxonomy.cli import main
from taxonomy.errors import DssmError

__all__ = ["one_torch_thread"]  # the autouse fixture, imported for pytest

GOOD = """model Tiny
latent   z : normal[2]
observed x : bernoulli[3]
z[t] <- z[t-1]
x[t] <- z[t]
"""

BAD_SYNTAX = """model Tiny
latent   z : normal[2]
observed x : bernoulli[3]
z[t] <- z[t-1
x[t] <- z[t]
"""

OUTSIDE = """model Tiny
latent   z : normal[2]
observed x : bernoulli[3]
z[t] <- x[t-1]
x[t] <- z[t]
"""

STATES_READ_EACH_OTHER = """model Tiny
latent   z : normal[2]
observed x : bernoulli[3]
deterministic a[t] = gru[4](b[t-1])
deterministic b[t] = gru[4](a[t-1], z[t])
z[t] <- z[t-1], a[t-1]
x[t] <- z[t]
"""


def files_under(folder):
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file())


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- --check ------------------------------------------------------------------

def test_check_passes_on_committed_modules(monkeypatch, capsys):
    monkeypatch.chdir(REPO)

    assert main(["compile", "--check", "specs", "-o", "generated"]) == 0
    assert "up to date" in capsys.readouterr().err


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    shutil.copytree(SPECS, tmp_path / "specs")
    shutil.copytree(REPO / "generated", tmp_path / "generated",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_fails_on_an_edited_module(repo_copy, capsys):
    module = repo_copy / "generated" / "cells" / "hmm.py"
    edited = module.read_text(encoding="utf-8").replace("mlp=100", "mlp=101")
    module.write_text(edited, encoding="utf-8")

    code = main(["compile", "--check", "specs", "-o", "generated"])

    assert code == 1
    assert f"{module.resolve()}: differs from what specs/cells/hmm.dssm compiles to" in \
        capsys.readouterr().err
    assert module.read_text(encoding="utf-8") == edited


def test_check_fails_on_a_missing_module(repo_copy, capsys):
    (repo_copy / "generated" / "vrnn.py").unlink()

    code = main(["compile", "--check", "specs", "-o", "generated"])

    assert code == 1
    assert "vrnn.py: missing; compile specs/vrnn.dssm" in capsys.readouterr().err
    assert not (repo_copy / "generated" / "vrnn.py").exists()


def test_check_reports_module_of_deleted_spec(repo_copy, capsys):
    (repo_copy / "specs" / "cells" / "hmm.dssm").unlink()

    code = main(["compile", "--check", "specs", "-o", "generated"])

    assert code == 1
    message = capsys.readouterr().err
    assert "hmm.py: its spec specs/cells/hmm.dssm no longer exists" in message
    assert (repo_copy / "generated" / "cells" / "hmm.py").exists()


def test_check_of_one_spec_ignores_other_modules(repo_copy, capsys):
    code = main(["compile", "--check", "specs/dmm.dssm", "-o", "generated"])

    assert code == 0
    assert "1 compiled modules are up to date" in capsys.readouterr().err


def test_check_fails_after_a_spec_changes(repo_copy):
    spec = repo_copy / "specs" / "dmm.dssm"
    spec.write_text(spec.read_text(encoding="utf-8").replace("normal[100]", "normal[99]"),
                    encoding="utf-8")

    assert main(["compile", "--check", "specs", "-o", "generated"]) == 1
    assert main(["compile", "specs", "-o", "generated"]) == 0
    assert main(["compile", "--check", "specs", "-o", "generated"]) == 0


# --- writing modules ----------------------------------------------------------

def test_compile_writes_one_module_per_spec(tmp_path, monkeypatch, capsys):
    write(tmp_path / "specs" / "tiny.dssm", GOOD)
    write(tmp_path / "specs" / "nested" / "deeper" / "other.dssm", GOOD)
    monkeypatch.chdir(tmp_path)

    assert main(["compile", "specs"]) == 0
    first = capsys.readouterr().err

    assert files_under(tmp_path / "generated") == ["nested/deeper/other.py", "tiny.py"]
    assert first.count("wrote ") == 2
    module = (tmp_path / "generated" / "tiny.py").read_text(encoding="utf-8")
    assert module.startswith('"""Tiny, compiled by dssm from specs/tiny.dssm.')


def test_compile_leaves_unchanged_modules_alone(tmp_path, monkeypatch, capsys):
    write(tmp_path / "specs" / "tiny.dssm", GOOD)
    monkeypatch.chdir(tmp_path)
    assert main(["compile", "specs", "-o", "out"]) == 0
    module = tmp_path / "out" / "tiny.py"
    os.utime(module, (1_000_000, 1_000_000))
    capsys.readouterr()

    assert main(["compile", "specs", "-o", "out"]) == 0

    assert "wrote" not in capsys.readouterr().err
    assert module.stat().st_mtime == 1_000_000


def test_written_module_imports_and_matches_load_module(tmp_path, monkeypatch):
    spec = write(tmp_path / "specs" / "tiny.dssm", GOOD)
    monkeypatch.chdir(tmp_path)
    assert main(["compile", "specs", "-o", "out"]) == 0
    text = (tmp_path / "out" / "tiny.py").read_text(encoding="utf-8")
    namespace = {}

    exec(compile(text, "tiny.py", "exec"), namespace)
    loaded = build.load_module(os.path.relpath(spec))

    assert namespace["Model"].__name__ == "Tiny"
    assert namespace["Model"].spec == loaded.Model.spec == "specs/tiny.dssm"


# --- errors -------------------------------------------------------------------

@pytest.mark.parametrize("text, line, column, message", [
    (BAD_SYNTAX, 4, 14, "missing closing bracket"),
    (OUTSIDE, 4, 1, "outside the hierarchy"),
    (STATES_READ_EACH_OTHER, 4, 1, "deterministic states that read each other"),
])
def test_bad_spec_keeps_previous_module(
        tmp_path, monkeypatch, capsys, text, line, column, message):
    spec = write(tmp_path / "specs" / "tiny.dssm", GOOD)
    monkeypatch.chdir(tmp_path)
    assert main(["compile", "specs", "-o", "out"]) == 0
    previous = (tmp_path / "out" / "tiny.py").read_text(encoding="utf-8")
    capsys.readouterr()
    spec.write_text(text, encoding="utf-8")

    code = main(["compile", "specs", "-o", "out"])
    error = capsys.readouterr().err

    assert code == 1
    assert error.startswith(f"specs/tiny.dssm:{line}:{column}: error: ")
    assert message in error.splitlines()[0]
    assert "Traceback" not in error
    assert (tmp_path / "out" / "tiny.py").read_text(encoding="utf-8") == previous
    assert files_under(tmp_path / "out") == ["tiny.py"]


def test_bad_spec_does_not_stop_the_good_ones(tmp_path, monkeypatch, capsys):
    write(tmp_path / "specs" / "good.dssm", GOOD)
    write(tmp_path / "specs" / "bad.dssm", BAD_SYNTAX)
    monkeypatch.chdir(tmp_path)

    code = main(["compile", "specs", "-o", "out"])
    error = capsys.readouterr().err

    assert code == 1
    assert re.search(r"^specs/bad\.dssm:4:14: error: ", error, re.MULTILINE)
    assert files_under(tmp_path / "out") == ["good.py"]


def test_check_reports_a_bad_spec(tmp_path, monkeypatch, capsys):
    write(tmp_path / "specs" / "bad.dssm", OUTSIDE)
    monkeypatch.chdir(tmp_path)

    assert main(["compile", "--check", "specs", "-o", "out"]) == 1
    assert "specs/bad.dssm:4:1: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failed_write_keeps_previous_module(tmp_path, monkeypatch):
    write(tmp_path / "specs" / "tiny.dssm", GOOD)
    monkeypatch.chdir(tmp_path)
    assert main(["compile", "specs", "-o", "out"]) == 0
    module = tmp_path / "out" / "tiny.py"
    module.write_text("previous", encoding="utf-8")
    renames = []

    def failing_replace(source, target):
        renames.append((source, target))
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    compiled, errors = build.compile_specs(["specs"], "out")
    with pytest.raises(OSError, match="disk full"):
        build.write_compiled(compiled)

    assert errors == []
    assert module.read_text(encoding="utf-8") == "previous"
    assert files_under(tmp_path / "out") == ["tiny.py"]
    # The new text went to a file beside the module, to be renamed over it.
    assert os.path.dirname(renames[0][0]) == str(module.parent)
    assert os.path.abspath(renames[0][1]) == str(module.resolve())


# --- where modules go ---------------------------------------------------------

def test_output_paths_mirror_nested_folders(tmp_path):
    specs = [write(tmp_path / "specs" / "a.dssm", GOOD),
             write(tmp_path / "specs" / "group one" / "b.dssm", GOOD),
             write(tmp_path / "specs" / "group one" / "deep-er" / "c.dssm", GOOD)]
    out = tmp_path / "out"

    paths = output_paths(specs, out)

    assert [path.relative_to(out.resolve()).as_posix() for path in paths] == [
        "a.py", "group_one/b.py", "group_one/deep_er/c.py"]


@pytest.mark.parametrize("stem, expected", [
    ("dmm", "dmm"),
    ("my model-v2", "my_model_v2"),
    ("2nd", "spec_2nd"),
    ("class", "class_"),
    ("None", "None_"),
    ("__init__", "spec___init__"),
    ("x²", "x_"),
])
def test_module_names_are_importable_identifiers(stem, expected):
    name = module_name(stem)

    assert name == expected
    assert name.isidentifier()


def test_two_specs_with_one_module_name_are_rejected(tmp_path, monkeypatch, capsys):
    write(tmp_path / "specs" / "a-b.dssm", GOOD)
    write(tmp_path / "specs" / "a_b.dssm", GOOD)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(DssmError, match="would both compile to"):
        output_paths(collect_specs(["specs"]), tmp_path / "out")
    assert main(["compile", "specs", "-o", "out"]) == 1
    assert "rename one of them" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_specs_from_several_folders_stay_inside_output(tmp_path, monkeypatch):
    write(tmp_path / "one" / "specs" / "tiny.dssm", GOOD)
    write(tmp_path / "two" / "tiny.dssm", GOOD)
    monkeypatch.chdir(tmp_path / "one")

    assert main(["compile", "specs", "../two/tiny.dssm", "-o", "out"]) == 0

    assert files_under(tmp_path / "one" / "out") == ["one/specs/tiny.py", "two/tiny.py"]
    assert files_under(tmp_path / "two") == ["tiny.dssm"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_symlink_inside_output_cannot_lead_outside(tmp_path, monkeypatch, capsys):
    write(tmp_path / "specs" / "cells" / "tiny.dssm", GOOD)
    write(tmp_path / "specs" / "top.dssm", GOOD)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cells").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.chdir(tmp_path)

    code = main(["compile", "specs", "-o", "out"])

    assert code == 1
    assert "would lie outside out" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []
    assert not (tmp_path / "out" / "top.py").exists()


def test_missing_folder_of_specs_is_an_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)

    assert main(["compile", "empty", "-o", "out"]) == 1
    assert "empty: no .dssm files in this folder" in capsys.readouterr().err
