"""Compile spec files into modules on disk, check them, and import compiled models."""

from __future__ import annotations

import hashlib
import keyword
import linecache
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from taxonomy.codegen import compile_model
from taxonomy.errors import DssmError, SpecError
from taxonomy.graph import build_graph
from taxonomy.parser import load_spec
from taxonomy.writing import write_text_atomically


@dataclass
class CompiledSpec:
    """One spec's compiled module: where it comes from, where it goes, and its text."""

    spec: Path
    output: Path
    source: str


def collect_specs(paths: list[str]) -> list[Path]:
    """The .dssm files named, with folders searched recursively; raises DssmError if none."""
    specs: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(path.rglob("*.dssm"))
            if not found:
                raise DssmError(f"{name}: no .dssm files in this folder")
            specs += found
        else:
            specs.append(path)
    return specs


def module_name(stem: str) -> str:
    """A Python module name for a spec file stem: an identifier that is not a keyword.

    A dunder stem such as __init__ gets a prefix, so it cannot replace a
    package's own files.
    """
    name = "".join(char if ("_" + char).isidentifier() else "_" for char in stem)
    if not name.isidentifier() or name.startswith("__"):
        name = f"spec_{name}"
    return f"{name}_" if keyword.iskeyword(name) else name


def output_paths(specs: list[Path], output_dir: Path) -> list[Path]:
    """Mirror the specs' folders below their common parent into output_dir.

    Raises DssmError when a path would leave output_dir or two specs would
    share a module.
    """
    parents = [spec.resolve().parent for spec in specs]
    base = Path(os.path.commonpath(parents)) if parents else Path.cwd()
    root = output_dir.resolve()
    outputs, seen = [], {}
    for spec in specs:
        relative = spec.resolve().parent.relative_to(base)
        folder = root.joinpath(*(module_name(part) for part in relative.parts))
        target = (folder / f"{module_name(spec.stem)}.py").resolve()
        if not target.is_relative_to(root):
            raise DssmError(f"{spec}: its module {target} would lie outside {output_dir}")
        if target in seen:
            raise DssmError(f"{spec} and {seen[target]} would both compile to {target}; "
                            "rename one of them")
        seen[target] = spec
        outputs.append(target)
    return outputs


def compile_specs(paths: list[str], output_dir: str | os.PathLike = "generated"
                  ) -> tuple[list[CompiledSpec], list[SpecError]]:
    """Compile every spec in memory; return the results and the errors, writing nothing."""
    specs = collect_specs(paths)
    targets = output_paths(specs, Path(output_dir))
    compiled, errors = [], []
    for spec, target in zip(specs, targets):
        try:
            model = build_graph(load_spec(spec))
            compiled.append(CompiledSpec(spec, target, compile_model(model, spec.as_posix())))
        except SpecError as error:
            errors.append(error)
    return compiled, errors


def write_compiled(compiled: list[CompiledSpec]) -> list[Path]:
    """Write each compiled module atomically; return the paths that changed."""
    changed = []
    for item in compiled:
        if item.output.exists() and item.output.read_text(encoding="utf-8") == item.source:
            continue
        write_text_atomically(item.output, item.source)
        changed.append(item.output)
    return changed


def stale_modules(compiled: list[CompiledSpec]) -> list[tuple[Path, str]]:
    """Compiled modules whose file on disk is missing or differs: (path, reason)."""
    stale = []
    for item in compiled:
        if not item.output.exists():
            stale.append((item.output, f"missing; compile {item.spec}"))
        elif item.output.read_text(encoding="utf-8") != item.source:
            stale.append((item.output, f"differs from what {item.spec} compiles to"))
    return stale


SOURCE_LINE = re.compile(r'"""[^\n]*, compiled by dssm from (?P<spec>.+)\.$')


def orphan_modules(paths: list[str], output_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """Find compiled modules whose spec was deleted from one of the folders in `paths`.

    A module names its spec on its first line, as the path given to `dssm
    compile`. Only modules whose spec path lies in a folder of `paths` are
    checked, so checking one spec never reports the modules of the others.
    """
    folders = [Path(name) for name in paths if Path(name).is_dir()]
    orphans = []
    for module in sorted(Path(output_dir).rglob("*.py")):
        with module.open(encoding="utf-8", errors="replace") as file:
            match = SOURCE_LINE.match(file.readline().rstrip("\n"))
        if match is None:
            continue
        spec = Path(match["spec"])
        inside = any(spec.is_relative_to(folder) for folder in folders)
        if inside and not spec.exists():
            orphans.append((module.resolve(), f"its spec {spec} no longer exists; "
                                              f"delete the module or restore the spec"))
    return orphans


def load_module(spec_path: str | os.PathLike) -> types.ModuleType:
    """Compile a spec and import the result as a module, without writing a file.

    The source is registered with linecache, so tracebacks and debuggers
    show the generated lines.
    """
    path = Path(spec_path)
    model = build_graph(load_spec(path))
    source = compile_model(model, path.as_posix())
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    name = f"dssm_compiled_{module_name(path.stem)}_{digest}"
    filename = f"<dssm compiled {path.as_posix()}>"

    module = types.ModuleType(name)
    module.__file__ = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), module.__dict__)
    sys.modules[name] = module
    return module


def build_model(spec_path: str | os.PathLike, **options):
    """Compile a spec and construct its model; options go to the model's constructor."""
    return load_module(spec_path).Model(**options)
