import csv
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch
from support.sequences import binary_dataset
from support.toy_dssm import ToyDMM

from runtime.report import ReportError, needs_log_axis, report
from runtime.trainer import default_config, train


def write_run(run_dir, valid_losses, summary):
    run_dir.mkdir(parents=True)
    rows = [{"epoch": epoch, "train_loss_per_step": 10.0 - epoch,
             "valid_neg_elbo_per_step": loss, "seconds": 1.0, "annealing_factor": 1.0,
             "lr": 1e-3} for epoch, loss in enumerate(valid_losses, start=1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def two_run_report(tmp_path_factory):
    """Report two hand-written runs once; the tests below read its files."""
    root = tmp_path_factory.mktemp("runs")
    dmm = write_run(root / "dmm", [9.0, 8.0, 7.5, 7.2],
                    {"run": "dmm", "epochs": 4, "best_epoch": 4,
                     "best_valid_neg_elbo_per_step": 7.2, "test_neg_elbo_per_step": 7.123456,
                     "seed": 0, "dataset": "jsb"})
    vrnn = write_run(root / "vrnn", [8.5, None, 7.0],
                     {"run": "vrnn", "epochs": 3, "best_epoch": 3,
                      "best_valid_neg_elbo_per_step": 7.0, "seed": 1, "failures": 1})
    return report([dmm, vrnn], root / "report")


def test_report_writes_curves_and_tables(two_run_report):
    assert two_run_report.curves.name == "training_curves.png"
    assert two_run_report.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert two_run_report.markdown.name == "summary.md"
    assert two_run_report.csv.name == "summary.csv"


def test_report_csv_has_one_row_per_run(two_run_report):
    with open(two_run_report.csv, newline="") as handle:
        rows = list(csv.DictReader(handle))

    assert [row["run"] for row in rows] == ["dmm", "vrnn"]
    assert float(rows[0]["test_neg_elbo_per_step"]) == 7.123456
    assert rows[1]["test_neg_elbo_per_step"] == ""
    assert rows[1]["failures"] == "1"
    header = list(rows[0])
    assert header[:4] == ["run", "epochs", "best_epoch", "best_valid_neg_elbo_per_step"]


def test_report_markdown_table_rounds_floats(two_run_report):
    lines = two_run_report.markdown.read_text().splitlines()

    assert lines[0].startswith("| run | epochs | best_epoch | best_valid_neg_elbo_per_step |")
    assert lines[1].startswith("|---|---:|")
    header = lines[0].strip("|").split("|")
    alignments = lines[1].strip("|").split("|")
    assert alignments[[name.strip() for name in header].index("dataset")] == "---"
    assert len(lines) == 4
    assert "| dmm | 4 | 4 | 7.2000 | 7.1235 |" in lines[2]


def test_report_curves_draw_one_colour_per_run(two_run_report):
    image = matplotlib.image.imread(two_run_report.curves)[..., :3]

    # matplotlib's first two cycle colours, C0 and C1.
    for colour in ([0x1f, 0x77, 0xb4], [0xff, 0x7f, 0x0e]):
        close = np.abs(image - np.array(colour) / 255).max(-1) < 0.05
        assert close.sum() > 200, colour


def test_report_labels_clashing_names_with_parent(tmp_path):
    first = write_run(tmp_path / "a" / "dmm", [7.0], {"epochs": 1})
    second = write_run(tmp_path / "b" / "dmm", [6.0], {"epochs": 1})

    files = report([first, second], tmp_path / "report")

    with open(files.csv, newline="") as handle:
        assert [row["run"] for row in csv.DictReader(handle)] == ["a/dmm", "b/dmm"]


def test_report_on_missing_run_raises(tmp_path):
    with pytest.raises(ReportError, match="metrics.jsonl not found"):
        report([tmp_path / "nothing"], tmp_path / "report")


def test_report_reads_trained_run(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    config = default_config("music", epochs=2, batch_size=4, device="cpu", threads=1)
    try:
        train(ToyDMM(x_dim=3), binary_dataset(), config, tmp_path / "toy", progress=False)
    finally:
        torch.set_num_threads(threads)

    files = report([tmp_path / "toy"], tmp_path / "report")

    with open(files.csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["run"] == "toy"
    assert rows[0]["epochs"] == "2"
    assert float(rows[0]["best_valid_neg_elbo_per_step"]) > 0


@pytest.mark.parametrize("values, expected", [
    ([50.0, 12.0, 7.4], True),
    ([9.0, 8.0, 7.5], False),
    ([50.0, None, math.nan, 7.0], True),
    ([40.0, 2.0, -1.0], False),
    ([None], False),
])
def test_log_axis_only_for_wide_positive_ranges(values, expected):
    assert needs_log_axis(values) is expected

