"""The HTML report: figure choice, benchmark folding, a real report from a real tiny sweep, and
the page as a browser shows it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO

from suite.analyze import figures
from suite.analyze.collect import collect
from suite.analyze.report import (
    filter_runs,
    load_benchmarks,
    matching_benchmarks,
    step_time_vs_preln,
)

ARTIFACTS = REPO / "test-artifacts"


def test_palette_is_fixed_per_variant_whatever_else_is_present():
    alone = figures.palette(["preln"])
    together = figures.palette(["postln", "preln", "rezero", "my_variant"])
    assert alone["preln"] == together["preln"]
    assert len(set(together.values())) == 4
    assert figures.variant_order(["zeta", "preln", "postln"]) == ["postln", "preln", "zeta"]


def test_with_sixteen_variants_the_legend_sits_beside_the_lines_not_on_them():
    """issue 17: the report stays readable with every built-in in one store."""
    import matplotlib.pyplot as plt

    names = [f"variant{i:02d}" for i in range(16)]
    runs = pd.DataFrame(
        [
            {"variant": name, "depth": 6, "lr": lr, "seed": 0, "status": "ok",
             "verdict": "converged", "val_loss": 2.5 + 0.01 * i, "initial_loss": 5.5,
             "val_unigram_entropy": 3.0}
            for i, name in enumerate(names)
            for lr in (1e-3, 1e-2)
        ]
    )  # fmt: skip
    fig = figures.loss_vs_lr(runs)
    legend = fig.axes[-1].get_legend()
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert box.x0 >= fig.axes[-1].get_window_extent().x1  # right of the axes
    assert len(legend.get_texts()) == 16 and legend._ncols == 2
    plt.close(fig)


def test_hardest_cell_is_where_verdicts_disagree_most():
    runs = pd.DataFrame(
        {
            "variant": ["a", "b", "c"] * 3,
            "depth": [6] * 3 + [24] * 3 + [24] * 3,
            "lr": [1e-3] * 3 + [1e-3] * 3 + [1e-2] * 3,
            "verdict": ["converged"] * 3
            + ["converged", "stalled", "converged"]
            + ["converged", "stalled", "diverged"],
            "status": "ok",
        }
    )
    assert figures.hardest_cell(runs) == (24, 1e-2)


def test_benchmark_json_is_folded_in(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    {
                        "name": "step[preln-6]",
                        "stats": {"median": 0.5},
                        "extra_info": {"variant": "preln", "depth": 6, "tokens_per_step": 1024},
                    },
                    {"name": "unrelated", "stats": {"median": 1.0}, "extra_info": {}},
                ]
            }
        )
    )
    table = load_benchmarks(path)
    assert table.to_dict("records") == [
        {"variant": "preln", "depth": 6, "width": None, "tokens_per_s": 2048.0, "step_ms": 500.0}
    ]
    assert load_benchmarks(tmp_path / "missing.json") is None


def test_step_time_relative_to_preln_per_shape():
    benchmarks = pd.DataFrame(
        {
            "variant": ["preln", "sandwich", "postln", "preln", "postln"],
            "width": [64, 64, 64, 128, 128],
            "depth": [6, 6, 6, 6, 6],
            "step_ms": [10.0, 12.0, 9.0, 40.0, 44.0],
        }
    )
    table = step_time_vs_preln(benchmarks).set_index(["width", "variant"])["vs_preln"]
    assert table[(64, "sandwich")] == pytest.approx(1.2)
    assert table[(64, "postln")] == pytest.approx(0.9)
    assert table[(128, "postln")] == pytest.approx(1.1)
    assert table[(64, "preln")] == 1.0


def test_filters():
    runs = pd.DataFrame(
        {"variant": ["a", "b", "a"], "depth": [6, 6, 24], "sweep": ["quick", "quick", "tiny"]}
    )
    assert len(filter_runs(runs, variants=["a"])) == 2
    assert len(filter_runs(runs, depths=[24])) == 1
    assert len(filter_runs(runs, sweep="quick")) == 2


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "suite.report", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def report(tiny_sweep, tmp_path_factory) -> Path:
    store, _ = tiny_sweep
    out = tmp_path_factory.mktemp("report") / "stability.html"
    result = run_report("--store", str(store), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {out} (8 runs, 0 errored)" in result.stdout
    return out


pytestmark_slow = pytest.mark.slow


@pytestmark_slow
def test_report_from_a_real_sweep_is_self_contained(report):
    html = report.read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    # the leaderboard's ranks, heatmaps, plateau survival, loss-vs-LR, max stable LR, LR transfer
    # (the tiny sweep has two depths), sensitivity, throughput, curves, and the diagnostics: init
    # gradient norms, model update, attention logits, the per-layer heatmaps
    assert len(images) == 13
    assert "Exponent s of the optimal LR" in html
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="https?://', html)  # nothing fetched from the network
    for text in (
        "postln, preln",
        "Leaderboard",
        "Verdicts by depth and learning rate",
        "did not learn within its 150 steps",  # the budget N of every stalled verdict
        "Leaving the plateau",
        "median_escape_step",
        "borderline",
        "Verdicts judged by",
        "v2 stall_margin=0.1",
        "lr_sensitivity",
        "max_stable_lr",
        "tokens_per_s_vs_preln",
        "Appendix: every run",
        "width 32",
        "Diagnostics: gradient norm by layer at initialization",
        "Diagnostics: model update",
        "Diagnostics: max attention logit",
        "init_grad_norm_ratio",
        "Diagnostics: per-layer series over training",
        "Why it failed",
        "Per mechanism: the published remedy",  # Post-LN stalls in the tiny sweep
        "failure_mechanism",
    ):
        assert text in html
    assert html.count("<tr>") >= 8 + 4  # every run in the appendix, every cell in the summary


@pytestmark_slow
def test_report_filters_and_partial_data(tiny_sweep, tmp_path):
    store, _ = tiny_sweep
    out = tmp_path / "one.html"
    result = run_report(
        "--store", str(store), "--out", str(out), "--variants", "preln", "--depths", "4"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 runs, 0 errored)" in result.stdout
    assert len(re.findall(r"<img ", out.read_text())) == 12  # one depth: no LR transfer


@pytestmark_slow
def test_report_lists_errored_cells_instead_of_crashing(tiny_sweep, tmp_path):
    store, _ = tiny_sweep
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    record_path = next((copy / "cells").glob("preln-L4-*/record.json"))
    record = json.loads(record_path.read_text())
    record.update(
        status="error", verdict=None, error="Traceback ...\nRuntimeError: CUDA out of memory"
    )
    record_path.write_text(json.dumps(record))
    out = tmp_path / "errors.html"
    result = run_report("--store", str(copy), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 errored" in result.stdout
    html = out.read_text()
    assert "Cells without a result" in html
    assert "(error): RuntimeError: CUDA out of memory" in html


def test_report_on_an_empty_store_says_what_to_do(tmp_path):
    result = run_report("--store", str(tmp_path), "--out", str(tmp_path / "x.html"))
    assert result.returncode != 0
    assert "run a sweep first" in result.stderr


def test_report_help():
    result = run_report("--help")
    assert result.returncode == 0 and "--variants" in result.stdout and "--store" in result.stdout


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytestmark_slow
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="Debian's chromium and chromium-driver are not installed (CI installs them)",
)
def test_report_in_headless_chromium(report):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1300,2400",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(report.as_uri())
        widths = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0);"
        )
        assert len(widths) == 13 and all(w > 0 for w in widths), widths
        # The leaderboard is there, its table sortable like the others.
        rows = driver.execute_script(
            "return document.querySelectorAll('#leaderboard tbody tr').length;"
        )
        assert rows == 4  # postln and preln at depths 2 and 4
        # The appendix sorts when a header is clicked.
        driver.execute_script("document.querySelector('#runs thead th').click();")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        driver.quit()


def test_only_benchmarks_of_the_swept_width_are_folded_in():
    benchmarks = pd.DataFrame(
        {
            "variant": ["preln", "preln"],
            "depth": [6, 6],
            "width": [64, 128],
            "tokens_per_s": [1.0, 2.0],
        }
    )
    runs = pd.DataFrame({"width": [64, 64]})
    assert list(matching_benchmarks(benchmarks, runs)["width"]) == [64]


def test_runs_without_diagnostics_get_a_note_not_a_crash(tiny_sweep):
    from suite.analyze.report import diagnostics_sections

    store, _ = tiny_sweep
    runs = collect(store, write=False)
    old = runs.drop(columns=[c for c in runs.columns if c.startswith("init_")])
    sections = diagnostics_sections(old, pd.DataFrame(), 4, 0.03)
    assert all(not s.image and "No diagnostics" in s.note for s in sections)
    sections = diagnostics_sections(runs, pd.DataFrame(), 4, 0.03)
    assert sections[0].image  # init gradients need no curve
