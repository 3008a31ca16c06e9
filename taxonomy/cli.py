"""The `dssm` command-line program."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from taxonomy.errors import DssmError, SpecError

# Help for the regularisation options that `train` and `sweep` share.
WEIGHT_DECAY_HELP = "decoupled weight decay, AdamW (default 0: plain Adam)"
DROPOUT_HELP = ("dropout rate on the inputs of the transition and emission networks during "
                "training (default 0)")

log = logging.getLogger("dssm")


def _print_error(error: DssmError) -> None:
    print(error.format() if isinstance(error, SpecError) else f"error: {error}", file=sys.stderr)


def _command_check(args: argparse.Namespace) -> int:
    from taxonomy.hierarchy import check_spec

    failed = False
    for path in args.specs:
        try:
            placement = check_spec(path)
        except SpecError as error:
            failed = True
            _print_error(error)
            if args.json:
                # The same keys as a placed spec, so a script can read every line alike.
                print(json.dumps({"model": None, "path": path, "group": None, "cell": None,
                                  "orders": None, "relaxed": [], "known_as": [],
                                  "outside": None, "error": error.format()},
                                 ensure_ascii=False))
            continue

        problems = placement.problems()
        failed = failed or bool(problems)
        for problem in problems:
            _print_error(problem)
        if args.json:
            print(json.dumps(placement.as_dict(), ensure_ascii=False))
        else:
            print(_format_placement(placement))
    return 1 if failed else 0


def _format_placement(placement) -> str:
    from taxonomy.hierarchy import EDGE_KINDS

    data = placement.as_dict()
    lines = [f"{data['path']}: model {data['model']}"]
    if data["outside"]:
        lines.append("  outside the hierarchy:")
        lines += [f"    - {reason['message']}" for reason in data["outside"]]
        return "\n".join(lines)

    def order_text(order):
        return "absent" if order is None else str(order)

    lines.append(f"  group:   {data['group']}")
    lines.append(f"  cell:    {data['cell']}" + ("" if data["paper_cell"]
                                                  else "  (finite-order cell)"))
    lines.append("  orders:  " + ", ".join(f"{edge} {order_text(order)}"
                                          for edge, order in data["orders"].items()))
    relaxed = ", ".join(f"{edge} {EDGE_KINDS[edge].marker}" for edge in data["relaxed"])
    lines.append(f"  relaxed: {relaxed or 'none'}")
    lines.append(f"  known as: {', '.join(data['known_as']) or 'new'}")
    guide = data["guide"]
    lines.append(f"  guide:   z[t] independent of x[1:t-1] given z[t-1]: "
                 f"{'yes' if guide['z_independent_of_past_x'] else 'no'}"
                 f" (partial alignment uses a {guide['partial_alignment_rnn']} RNN)")
    lines.append(f"           exact posterior factor: p(z[t] | "
                 f"{', '.join(guide['posterior_conditioning'])})")
    return "\n".join(lines)


def _command_draw(args: argparse.Namespace) -> int:
    from taxonomy.render import draw_spec

    draw_spec(args.spec, args.output, steps=args.steps)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _command_taxonomy(args: argparse.Namespace) -> int:
    from taxonomy.render import draw_taxonomy

    draw_taxonomy(args.output, specs=args.specs)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _command_explore_list(args: argparse.Namespace) -> int:
    from taxonomy.explore import list_cells

    rows = list_cells(group=args.group, max_order=args.max_order, specs_dir=args.specs)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    width = max(len(row["cell"]) for row in rows)
    print(f"{'cell'.ljust(width)}  {'known as':<12}  spec")
    for row in rows:
        known = ", ".join(row["known_as"]) or "new"
        specs = ", ".join(row["specs"]) or "-"
        print(f"{row['cell'].ljust(width)}  {known:<12}  {specs}")
    return 0


def _command_explore_new(args: argparse.Namespace) -> int:
    from taxonomy.explore import write_cell_specs

    written = write_cell_specs(args.cells, args.output, paper_cells=args.paper_cells,
                               force=args.force)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _command_compile(args: argparse.Namespace) -> int:
    from taxonomy.build import compile_specs, orphan_modules, stale_modules, write_compiled

    compiled, errors = compile_specs(args.specs, args.output)
    for error in errors:
        _print_error(error)

    if args.check:
        stale = stale_modules(compiled) + orphan_modules(args.specs, args.output)
        for path, reason in stale:
            print(f"{path}: {reason}", file=sys.stderr)
        if not stale and not errors:
            print(f"{len(compiled)} compiled modules are up to date", file=sys.stderr)
        return 1 if stale or errors else 0

    for path in write_compiled(compiled):
        print(f"wrote {path}", file=sys.stderr)
    return 1 if errors else 0


def _command_train(args: argparse.Namespace) -> int:
    from runtime.runs import train_spec

    options = {name: getattr(args, name) for name in (
        "epochs", "batch_size", "lr", "clip_norm", "weight_decay", "dropout", "anneal_epochs",
        "min_anneal", "guide", "iaf", "elbo", "seed", "device", "threads")}
    options["resume"] = args.resume
    summary = train_spec(args.spec, args.dataset, args.out, options,
                         evaluate_test=not args.no_test)
    print(f"best validation negative ELBO per step: "
          f"{summary['best_valid_neg_elbo_per_step']:.4f} (epoch {summary['best_epoch']})")
    if "test_neg_elbo_per_step" in summary:
        print(f"test negative ELBO per step: {summary['test_neg_elbo_per_step']:.4f}")
    return 0


def _command_eval(args: argparse.Namespace) -> int:
    from runtime.runs import evaluate_saved_run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = evaluate_saved_run(args.run_dir, split=args.split, nll_samples=args.nll_samples,
                                device=args.device)
    print(f"{args.split} negative ELBO per step: {result.neg_elbo_per_step:.4f}")
    if result.nll_per_step is not None:
        print(f"{args.split} NLL per step ({args.nll_samples} importance samples): "
              f"{result.nll_per_step:.4f}")
    return 0


def _command_sample(args: argparse.Namespace) -> int:
    from runtime.runs import sample_run

    for path in sample_run(args.run_dir, args.steps, args.out, seed=args.seed, device=args.device):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _command_resynth(args: argparse.Namespace) -> int:
    from runtime.resynth import resynthesize_run

    result = resynthesize_run(args.run_dir, args.audio, args.out, split=args.split,
                              limit=args.limit, device=args.device)
    count = len(result.files)
    print(f"wrote {count} WAV files, {count} PNG files and {result.scores.name} to "
          f"{result.output}", file=sys.stderr)
    for key, label in (("sisdr_db", "SI-SDR (dB)"), ("pesq", "PESQ"), ("estoi", "ESTOI")):
        figures = result.statistics[key]
        if figures["mean"] is None:
            print(f"{args.split} {label}: not computed")
        else:
            print(f"{args.split} {label}: mean {figures['mean']:.3f}, median "
                  f"{figures['median']:.3f} over {figures['files']} files")
    return 0


def _command_sweep(args: argparse.Namespace) -> int:
    from runtime.sweep import run_sweep

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    options = {"batch_size": args.batch_size, "lr": args.lr,
               "weight_decay": args.weight_decay, "dropout": args.dropout,
               "anneal_epochs": args.anneal_epochs, "device": args.device,
               "threads": args.threads}
    result = run_sweep(args.specs, args.dataset, args.out, epochs=args.epochs, seeds=args.seeds,
                       guides=args.guide, iafs=args.iaf, workers=args.workers,
                       engine=args.engine, address=args.address, options=options,
                       report=report)
    for path in result.files:
        print(f"wrote {path}", file=sys.stderr)
    print((result.output / "leaderboard.md").read_text(encoding="utf-8"))
    return 1 if result.failed else 0


def _comma_list(convert):
    def parse(text: str) -> list:
        try:
            return [convert(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid list '{text}'") from None
    return parse


def _command_report(args: argparse.Namespace) -> int:
    from runtime.report import report

    files = report(args.runs, args.out)
    for path in files:
        print(f"wrote {path}", file=sys.stderr)
    print(Path(files.markdown).read_text(encoding="utf-8"))
    return 0


def _command_data_fetch(args: argparse.Namespace) -> int:
    from runtime.data import fetch

    path = fetch(args.name)
    print(f"{args.name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssm", description="Compile declarative deep state space model specs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="place specs in the DSSM hierarchy")
    check.add_argument("specs", nargs="+", metavar="SPEC", help=".dssm files")
    check.add_argument("--json", action="store_true", help="print one JSON object per spec")
    check.set_defaults(run=_command_check)

    draw = commands.add_parser("draw", help="draw a spec's graphical model")
    draw.add_argument("spec", metavar="SPEC")
    draw.add_argument("-o", "--output", required=True, metavar="FILE",
                      help="output file: .svg, .png, .pdf or .dot")
    draw.add_argument("--steps", type=int, default=3, help="time steps to unroll (default 3)")
    draw.set_defaults(run=_command_draw)

    taxonomy = commands.add_parser("taxonomy", help="draw the whole hierarchy")
    taxonomy.add_argument("-o", "--output", required=True, metavar="FILE",
                          help="output file: .svg, .png, .pdf or .dot")
    taxonomy.add_argument("--specs", nargs="*", default=None, metavar="PATH",
                          help="spec files or folders whose cells are highlighted")
    taxonomy.set_defaults(run=_command_taxonomy)

    compile_ = commands.add_parser("compile", help="compile specs into Pyro modules")
    compile_.add_argument("specs", nargs="+", metavar="SPEC",
                          help=".dssm files or folders (searched recursively)")
    compile_.add_argument("-o", "--output", default="generated", metavar="DIR",
                          help="output folder; spec subfolders are mirrored (default generated)")
    compile_.add_argument("--check", action="store_true",
                          help="write nothing; fail if a module on disk differs from the "
                               "compiler's output")
    compile_.set_defaults(run=_command_compile)

    train = commands.add_parser("train", help="train a compiled spec on a data set")
    train.add_argument("spec", metavar="SPEC")
    train.add_argument("--dataset", required=True,
                       help="jsb, nottingham, musedata, piano-midi or speech:DIR")
    train.add_argument("--out", required=True, metavar="RUN", help="run directory")
    train.add_argument("--epochs", type=int, help="passes over the training split")
    train.add_argument("--batch-size", type=int, help="sequences per mini-batch (default 20)")
    train.add_argument("--lr", type=float, help="Adam's learning rate (music 3e-4, speech 1e-3)")
    train.add_argument("--clip-norm", type=float, help="gradient-norm clipping (default 10)")
    train.add_argument("--weight-decay", type=float,
                       help=WEIGHT_DECAY_HELP)
    train.add_argument("--dropout", type=float,
                       help=DROPOUT_HELP)
    train.add_argument("--anneal-epochs", type=int,
                       help="epochs over which the KL annealing factor reaches 1 (default 100)")
    train.add_argument("--min-anneal", type=float,
                       help="first annealing factor (music 0.2, speech 0.001)")
    train.add_argument("--guide", choices=("partial", "full"),
                       help="guide alignment (default: the spec's, else full)")
    train.add_argument("--iaf", type=int, metavar="LAYERS",
                       help="IAF layers on the guide (default: the spec's flow, else 0)")
    train.add_argument("--elbo", choices=("trace", "meanfield", "jit-trace", "jit-meanfield"),
                       help="Trace_ELBO, TraceMeanField_ELBO or their JIT versions")
    train.add_argument("--seed", type=int, help="random seed (default 0)")
    train.add_argument("--device", help="cpu, cuda or auto (default auto)")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--no-test", action="store_true",
                       help="skip evaluating the test split after training")
    train.set_defaults(run=_command_train)

    evaluate = commands.add_parser("eval", help="evaluate a run's best checkpoint")
    evaluate.add_argument("run_dir", metavar="RUN")
    evaluate.add_argument("--split", default="test", choices=("train", "valid", "test"))
    evaluate.add_argument("--nll-samples", type=int, default=0, metavar="K",
                          help="importance samples per sequence for the NLL (0: skip)")
    evaluate.add_argument("--device", default=None, help="cpu, cuda or auto")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")
    evaluate.set_defaults(run=_command_eval)

    sample = commands.add_parser("sample", help="sample a music run's prior to MIDI")
    sample.add_argument("run_dir", metavar="RUN")
    sample.add_argument("--steps", type=int, default=64, help="time steps (default 64)")
    sample.add_argument("--out", required=True, metavar="FILE.mid")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default=None, help="cpu, cuda or auto")
    sample.set_defaults(run=_command_sample)

    resynth = commands.add_parser(
        "resynth", help="resynthesise held-out speech through a speech run and score it",
        description="Reconstruct each file's whole power spectrogram with the run's model "
                    "(teacher forcing), invert it with the original phase, and write a "
                    "16 kHz WAV and a mel spectrogram PNG per file, and scores.csv, into "
                    "--out. The run's summary.json gets the keys sisdr_db, pesq and estoi, "
                    "each {\"mean\": ..., \"median\": ..., \"files\": N}. There N counts "
                    "the files with that score, and mean and median are null when none has "
                    "one. The key resynth records the audio folder, split, file count and "
                    "seconds. PESQ (wide band) and ESTOI need 'pip install -e .[speech]'.")
    # Not dest "run": that attribute stores the subcommand's handler.
    resynth.add_argument("run_dir", metavar="RUN", help="run directory of a speech run")
    resynth.add_argument("--audio", required=True, metavar="DIR",
                         help="folder of .flac or .wav files, split by speaker as in training")
    resynth.add_argument("--out", required=True, metavar="DIR", help="output folder")
    resynth.add_argument("--split", default="test", choices=("train", "valid", "test"),
                         help="which split of --audio to resynthesise (default test)")
    resynth.add_argument("--limit", type=int, default=None, metavar="N",
                         help="resynthesise only the split's first N files")
    resynth.add_argument("--device", default=None, help="cpu, cuda or auto")
    resynth.set_defaults(run=_command_resynth)

    sweep = commands.add_parser(
        "sweep", help="train specs x options x seeds; write a leaderboard and a coloured hierarchy",
        description="Train every combination of specs, guide alignments, IAF layer counts and "
                    "seeds into OUT/runs/<spec>-<guide>-iaf<k>-seed<s>/, then write "
                    "leaderboard.csv, leaderboard.md, hierarchy.svg and hierarchy.png into OUT. "
                    "Run the same command again to resume: finished runs are skipped, and "
                    "interrupted runs continue from their last checkpoint. A failed run is "
                    "recorded in the leaderboard and the exit status is 1.")
    sweep.add_argument("specs", nargs="+", metavar="SPEC",
                       help=".dssm files or folders (searched recursively)")
    sweep.add_argument("--dataset", required=True,
                       help="jsb, nottingham, musedata, piano-midi, speech:DIR or "
                            "synthetic:SPEC?n=200&T=40&seed=0")
    sweep.add_argument("--epochs", type=int, required=True, help="passes over the training split")
    sweep.add_argument("--seeds", type=int, default=3,
                       help="seeds per setting, numbered from 0 (default 3)")
    sweep.add_argument("--guide", type=_comma_list(str), metavar="LIST",
                       help="guide alignments, e.g. partial,full (default: each spec's own)")
    sweep.add_argument("--iaf", type=_comma_list(int), metavar="LIST",
                       help="IAF layer counts, e.g. 0,3 (default: each spec's flow, else 0)")
    sweep.add_argument("--workers", type=int, default=1, help="runs trained at once (default 1)")
    sweep.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local processes, or Ray tasks (needs pip install 'dssm[ray]')")
    sweep.add_argument("--address", metavar="ADDR",
                       help="the Ray cluster to join (default: start a local Ray instance)")
    sweep.add_argument("--out", required=True, metavar="DIR", help="the sweep folder")
    sweep.add_argument("--batch-size", type=int, help="sequences per mini-batch (default 20)")
    sweep.add_argument("--lr", type=float, help="Adam's learning rate (music 3e-4, speech 1e-3)")
    sweep.add_argument("--weight-decay", type=float,
                       help=WEIGHT_DECAY_HELP)
    sweep.add_argument("--dropout", type=float,
                       help=DROPOUT_HELP)
    sweep.add_argument("--anneal-epochs", type=int,
                       help="epochs over which the KL annealing factor reaches 1 (default 100)")
    sweep.add_argument("--device", help="cpu, cuda or auto (default auto)")
    sweep.add_argument("--threads", type=int, help="torch CPU threads per run (default 1)")
    sweep.set_defaults(run=_command_sweep)

    report = commands.add_parser("report", help="training curves and a table of runs")
    report.add_argument("runs", nargs="+", metavar="RUN")
    report.add_argument("--out", default="report", metavar="DIR",
                        help="output folder (default report)")
    report.set_defaults(run=_command_report)

    data = commands.add_parser("data", help="manage data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_commands.add_parser("fetch", help="download a data set into the cache")
    fetch.add_argument("name", help="jsb, nottingham, musedata or piano-midi")
    fetch.set_defaults(run=_command_data_fetch)

    explore = commands.add_parser("explore", help="list cells and scaffold specs for them")
    explore_commands = explore.add_subparsers(dest="explore_command", required=True,
                                              metavar="ACTION")
    listing = explore_commands.add_parser("list", help="list the cells of the hierarchy")
    listing.add_argument("--group", help="only this group: HMM, AR-HMM, F-HMM or DMM-Aug")
    listing.add_argument("--max-order", type=int, default=None, metavar="K",
                         help="also list the finite-order cells with orders up to K")
    listing.add_argument("--specs", default="specs", metavar="DIR",
                         help="folder searched for specs of each cell (default specs)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_command_explore_list)
    new = explore_commands.add_parser("new", help="write a spec for a cell")
    new.add_argument("cells", nargs="*", metavar="CELL",
                     help="cells written as in a spec, e.g. 'AR-HMM(z<-z, x<-x)'")
    new.add_argument("--paper-cells", action="store_true",
                     help="write all 36 cells of the paper (OUTPUT is then a folder)")
    new.add_argument("-o", "--output", required=True,
                     help="the .dssm file to write, or a folder for several cells")
    new.add_argument("--force", action="store_true", help="overwrite existing files")
    new.set_defaults(run=_command_explore_new)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    logging.captureWarnings(True)
    try:
        return args.run(args)
    except DssmError as error:
        _print_error(error)
        return 1
    except BrokenPipeError:
        # The reader stopped early, as `| head` does. Pointing stdout at devnull
        # keeps the interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        # Output paths are user input too: a folder where a file should go,
        # a file where a folder should go, a read-only location.
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = {"train": "; pass --resume to continue from the last finished epoch",
                "sweep": "; run the same command again to resume the sweep"}
        print(f"interrupted{hint.get(args.command, '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
