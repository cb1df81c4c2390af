"""The HTML stability report: every record in the store → one self-contained HTML file.

    python -m suite.report [--store results] [--out reports/stability.html]
                           [--variants preln,postln] [--depths 6,24] [--sweep quick]
                           [--benchmark benchmark.json] [--curves-depth 24 --curves-lr 0.01]

Figures are PNGs embedded as data URIs, so the file opens anywhere with no network.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import errno
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import jinja2
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from suite.analyze import diagnostics_figures, figures
from suite.analyze.baseline import SOURCE, BaselineError, with_reference
from suite.analyze.collect import add_verdict_arguments, collect, parse_verdict
from suite.analyze.leaderboard import display, leaderboards
from suite.analyze.summary import (
    diagnostics_table,
    escape_label,
    format_summary,
    ok_runs,
    per_lr_table,
    step_budget,
    summarize,
    unstable_below,
    with_arm_labels,
)
from suite.analyze.transfer import transfer_exponents
from suite.analyze.why import mechanism_counts, remedy_table
from suite.provenance import git_sha, suite_version
from suite.record import FORMATS, REPORT_COLUMNS
from suite.store import atomic_write, read_curve

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("reports/stability.html")
_TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class Section:
    title: str
    caption: str
    image: str = ""  # data URI; empty when the data cannot support the figure
    note: str = ""


def png_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def filter_runs(
    runs: pd.DataFrame,
    variants: list[str] | None = None,
    depths: list[int] | None = None,
    sweep: str | None = None,
) -> pd.DataFrame:
    if variants:
        runs = runs[runs["variant"].isin(variants)]
    if depths:
        runs = runs[runs["depth"].isin(depths)]
    if sweep:
        runs = runs[runs["sweep"] == sweep]
    return runs


def load_benchmarks(path: Path | None) -> pd.DataFrame | None:
    """Training-step benchmarks from a pytest-benchmark JSON file.

    A benchmark contributes when its ``extra_info`` carries ``variant``, ``depth`` and
    ``tokens_per_step``; tokens/s is ``tokens_per_step / stats.median``.
    """
    if path is None or not path.exists():
        return None
    rows = []
    for bench in json.loads(path.read_text()).get("benchmarks", []):
        info = bench.get("extra_info", {})
        if {"variant", "depth", "tokens_per_step"} <= info.keys():
            rows.append(
                {
                    "variant": info["variant"],
                    "depth": int(info["depth"]),
                    "width": info.get("width"),
                    "tokens_per_s": info["tokens_per_step"] / bench["stats"]["median"],
                    "step_ms": 1000 * bench["stats"]["median"],
                }
            )
    return pd.DataFrame(rows) if rows else None


def step_time_vs_preln(benchmarks: pd.DataFrame) -> pd.DataFrame:
    """Per (width, depth, variant): the benchmark's median step time and its ratio to Pre-LN's
    at the same shape (NaN where Pre-LN was not benchmarked)."""
    shape = ["width", "depth"]
    table = benchmarks.groupby([*shape, "variant"], dropna=False)["step_ms"].median().reset_index()
    preln = table[table["variant"] == "preln"].set_index(shape)["step_ms"].rename("preln_ms")
    table = table.join(preln, on=shape)
    table["vs_preln"] = table["step_ms"] / table["preln_ms"]
    return table.drop(columns="preln_ms").sort_values([*shape, "vs_preln"])


def matching_benchmarks(benchmarks: pd.DataFrame | None, runs: pd.DataFrame) -> pd.DataFrame | None:
    """Only the benchmarked shapes the sweep also ran: another width is another model."""
    if benchmarks is None or benchmarks["width"].isna().all():
        return benchmarks
    return benchmarks[benchmarks["width"].isin(runs["width"].unique())]


CURVE_NEEDS = ("step", "loss")  # what the curve figures plot


def curves_at(
    runs: pd.DataFrame, store: Path, depth: int, lr: float, skipped: list[str] | None = None
) -> pd.DataFrame:
    """The stored curves of the finished runs at (depth, lr). A curve that is missing,
    unreadable or lacks a column the figures plot is left out and its cell named (logged, and
    appended to ``skipped``): the report shows the others."""
    frames = []
    finished = ok_runs(runs)
    for run in finished[(finished["depth"] == depth) & (finished["lr"] == lr)].itertuples():
        try:
            curve = read_curve(store, run.cell_id)
            missing = [column for column in CURVE_NEEDS if column not in curve]
            if missing:
                raise ValueError(f"no {', '.join(missing)} column")
            curve["step"] = pd.to_numeric(curve["step"], errors="raise")
            curve["loss"] = pd.to_numeric(curve["loss"], errors="raise")
        except (OSError, ValueError, TypeError) as error:
            log.warning("%s: its curve cannot be plotted (%s); left out", run.cell_id, error)
            if skipped is not None:
                skipped.append(run.cell_id)
            continue
        frames.append(curve.assign(variant=run.variant, seed=run.seed, run=run.cell_id))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def header(runs: pd.DataFrame) -> dict[str, str]:
    def values(column, fmt=str):
        return ", ".join(fmt(v) for v in sorted(runs[column].dropna().unique()))

    return {
        "Variants": ", ".join(figures.variant_order(runs["variant"].dropna())),
        "Depths": values("depth", lambda v: str(int(v))),
        "Learning rates": values("lr", lambda v: f"{v:g}"),
        "Seeds": values("seed", lambda v: str(int(v))),
        "Warmup steps": values("warmup_steps", lambda v: str(int(v))),
        "Steps": values("steps", lambda v: str(int(v))),
        "Model": values("width", lambda v: f"width {int(v)}")
        + "; heads "
        + values("heads", lambda v: str(int(v)))
        + "; seq "
        + values("seq_len", lambda v: str(int(v))),
        "Sweeps": values("sweep"),
        "Verdicts judged by": values("verdict_rule"),
        "Device": values("device_name"),
        "Torch": values("torch_version"),
        "Suite runs": values("suite_version") + " @ " + values("git_sha", lambda v: v[:12]),
        "Report": f"suite {suite_version()} @ {git_sha()[:12]}, "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
    }


def build_sections(
    runs: pd.DataFrame,
    store: Path,
    benchmarks: pd.DataFrame | None,
    curves_cell: tuple[int, float] | None,
) -> list[Section]:
    finished = ok_runs(runs)
    benchmarks = matching_benchmarks(benchmarks, finished)
    budget = step_budget(finished.get("steps", pd.Series(dtype=float))) or "N"
    sections = [
        Section(
            "Verdicts by depth and learning rate",
            "Green trains, red fails: look for the LRs and depths where a variant's cells turn "
            f"red (S = a stalled seed: did not learn within its {budget} steps; D = a diverged "
            "seed; * = a borderline seed, whose verdict sits near a boundary and could flip "
            "with another budget, seed or CPU).",
        ),
        Section(
            "Leaving the plateau",
            "Fraction of runs whose smoothed training loss is still above the stall threshold "
            "(unigram entropy − stall margin) at each step (Kaplan–Meier; runs that never got "
            f"below it are censored at their budget, {budget} steps, dotted). A curve that "
            "reaches 0 early learned fast; one that ends high stalled.",
        ),
        Section(
            "Final loss vs learning rate",
            "Lower and flatter is better; × marks diverged seeds (capped at the initial loss); "
            "curves resting on the dashed unigram-entropy line learned nothing from context.",
        ),
        Section(
            "Max stable learning rate vs depth",
            "How fast each variant's usable LR shrinks with depth; a missing point means no "
            "LR on the grid converged for every seed.",
        ),
        Section(
            "Learning-rate transfer across depth",
            "Depth-μP and CompleteP (Yang et al. 2023; Dey et al. 2025, Fig. 1) claim the best "
            "LR stops moving with depth. Left: the LR of the lowest seed-mean validation loss "
            "(diverged runs count as their initial loss), refined between grid points; right: "
            "the max stable LR. Dashed: the power-law fit LR ∝ N^s; s near 0 means the LR "
            "transfers, s = −½ or −1 that it shrinks as 1/√N or 1/N.",
        ),
        Section(
            "LR sensitivity vs depth",
            "Wortsman et al. (2023): mean excess loss over the LR grid relative to the best "
            "LR; lower means the variant forgives a badly chosen LR.",
        ),
        Section(
            "Throughput vs depth",
            "The cost side: median tokens/s of the sweep's training steps (dashed: "
            "pytest-benchmark results, when given).",
        ),
        Section("Training curves", "Loss vs step for every run at one cell."),
    ]
    if finished.empty:
        for section in sections:
            section.note = "No finished runs to plot."
        return sections
    makers = [
        lambda: figures.verdict_heatmaps(finished),
        lambda: figures.plateau_survival(finished),
        lambda: figures.loss_vs_lr(finished),
        lambda: figures.max_stable_lr_vs_depth(finished),
        lambda: figures.lr_transfer(finished),
        lambda: figures.lr_sensitivity_vs_depth(finished),
        lambda: figures.throughput_vs_depth(finished, benchmarks),
    ]
    empty_notes = {
        "Leaving the plateau": "No escape steps known: these runs were judged from their "
        "records (their curves could not be read).",
        "Learning-rate transfer across depth": "Needs runs of one variant at two depths or more.",
    }
    for section, make in zip(sections, makers, strict=False):
        figure = make()
        if figure is None:
            section.note = empty_notes.get(
                section.title, "Nothing to plot: no LR converged for every seed at any depth."
            )
        else:
            section.image = png_data_uri(figure)
    gaps = unstable_below(finished)
    gaps = gaps[gaps != ""]
    if len(gaps):
        stable_section = next(s for s in sections if s.title.startswith("Max stable"))
        stable_section.note = (
            "A lower LR failed below the max stable LR (the max stable LR is the largest LR "
            "where every seed converged, not the largest below which all did): "
            + "; ".join(f"{name} depth {depth} at {lrs}" for (name, depth), lrs in gaps.items())
            + "."
        )
    exponents = transfer_exponents(finished)
    fitted = exponents.dropna(subset=["optimal_lr_exponent"])
    if len(fitted):
        transfer = next(s for s in sections if s.title.startswith("Learning-rate transfer"))
        edge = int(fitted["optimum_at_grid_edge"].sum())
        transfer.note = (
            "Exponent s of the optimal LR (of the max stable LR): "
            + "; ".join(
                f"{name} {row.optimal_lr_exponent:+.2f} "
                f"({_signed(row.max_stable_lr_exponent)}) over depths {row.depths}"
                for name, row in fitted.iterrows()
            )
            + "."
            + (
                f" {edge} optimum(s) sit at an edge of the LR grid: the fit there is a bound."
                if edge
                else ""
            )
        )
    packed = int((finished.get("packed_members", pd.Series(dtype=float)).fillna(1) > 1).sum())
    if packed:
        throughput = next(s for s in sections if s.title == "Throughput vs depth")
        throughput.caption += (
            f" {packed} runs were packed (train.pack_lr=true): their tokens/s counts the tokens "
            "of every member of the pack."
        )
    depth, lr = curves_cell or figures.hardest_cell(finished)
    unplottable: list[str] = []
    # Runs added from a reference (with_reference) have no curves here: those stay with whoever
    # trained them.
    in_store = (
        finished[SOURCE].isna() if SOURCE in finished else pd.Series(True, index=finished.index)
    )
    curves = curves_at(finished[in_store], store, depth, lr, unplottable)
    elsewhere = finished[~in_store & (finished["depth"] == depth) & (finished["lr"] == lr)]
    curves_section = sections[-1]
    curves_section.title = f"Training curves at depth {depth}, LR {lr:g}"
    chosen = (
        "chosen on the command line"
        if curves_cell
        else ("the cell where the variants' verdicts disagree most")
    )
    curves_section.caption = (
        f"Loss vs step (10-step mean) of every run at {chosen}; dashed = unigram "
        "entropy. "
        "Watch for flat lines at the entropy (stalled) and lines that end early (diverged)."
    )
    if unplottable:
        curves_section.caption += (
            f" Left out: {len(unplottable)} run(s) whose stored curve is missing or damaged "
            f"({', '.join(unplottable)})."
        )
    if len(elsewhere):
        curves_section.caption += (
            f" Not drawn: {', '.join(sorted(set(elsewhere['variant'])))} (from "
            f"{', '.join(sorted(set(elsewhere[SOURCE])))}, whose curves are not shipped)."
        )
    if curves.empty:
        curves_section.note = f"No curves stored for depth {depth}, LR {lr:g}."
    else:
        entropy = float(finished["unigram_entropy"].mean())
        initial = float(finished["initial_loss"].max())
        curves_section.image = png_data_uri(
            figures.training_curves(curves, depth, lr, entropy, initial)
        )
    return sections + diagnostics_sections(finished, curves, depth, lr)


def _signed(value: float) -> str:
    return "none" if pd.isna(value) else f"{value:+.2f}"


def diagnostics_sections(
    finished: pd.DataFrame, curves: pd.DataFrame, depth: int, lr: float
) -> list[Section]:
    """Why variants fail: the literature's instruments (suite/run/diagnostics.py), at init and at
    the same cell as the training curves."""
    sections = [
        Section(
            "Diagnostics: gradient norm by layer at initialization",
            "Xiong et al. (2020, Fig. 3): at init Post-LN's feed-forward gradient norm grows "
            "toward the output layers while Pre-LN's stays flat. Measured on a fixed probe "
            "batch before the first step; band = range over seeds.",
        ),
        Section(
            f"Diagnostics: model update at depth {depth}, LR {lr:g}",
            "DeepNet (Wang et al. 2022, Fig. 3): ‖F(x; θ_t) − F(x; θ_0)‖ of the final hidden "
            "state on the probe batch. A large early update is the instability DeepNorm damps; "
            "right: the update after the first steps at every depth swept at this LR.",
        ),
        Section(
            f"Diagnostics: max attention logit at depth {depth}, LR {lr:g}",
            "Wortsman et al. (2023): max |q·k|/√d_head over heads and layers on the probe batch; "
            "logit growth (past ~1e4 at scale) precedes divergence, and qk-norm bounds it.",
        ),
        Section(
            f"Diagnostics: per-layer series over training at depth {depth}, LR {lr:g}",
            "Per variant (its lowest seed at this cell), block × sampled step: the gradient "
            "norm of each block (before clipping), its update-to-weight ratio, the residual "
            "stream's RMS after it, and for DyT/Derf the share of inputs past the squashing "
            "map's knee. A dark band at the first blocks is a vanishing gradient (Post-LN's "
            "failure, Xiong et al. 2020); a bright saturation map is DyT's.",
        ),
    ]
    curves = (
        curves if not curves.empty else pd.DataFrame(columns=["variant", "seed", "run", "step"])
    )
    made = [
        diagnostics_figures.init_grad_norms(finished),
        diagnostics_figures.model_update(curves, finished, lr),
        diagnostics_figures.attention_logits(curves),
        diagnostics_figures.layer_heatmaps(curves),
    ]
    for section, figure in zip(sections, made, strict=True):
        if figure is None:
            section.note = (
                "No diagnostics recorded for these runs: they are off with "
                "diagnostics.enabled=false and not measured in packed runs (train.pack_lr=true)."
            )
        else:
            section.image = png_data_uri(figure)
    return sections


def _table_html(frame: pd.DataFrame, table_id: str, formats: dict[str, str]) -> str:
    shown = frame.copy()
    for column, fmt in formats.items():
        if column in shown:
            shown[column] = shown[column].map(lambda v, f=fmt: "" if pd.isna(v) else format(v, f))
    return shown.to_html(
        table_id=table_id, classes="data sortable", border=0, na_rep="", escape=True, index=False
    )


SUMMARY_FORMATS = {
    "max_stable_lr": "g",
    "best_lr": "g",
    "median_tokens_per_s": ",.0f",
    "tokens_per_s_vs_preln": ".2f",
}
# Shown as "value [low, high]": 95% Wilson intervals for rates, the seeds' spread otherwise.
SUMMARY_INTERVALS = {
    "converged_%": ".0f",
    "stalled_%": ".0f",
    "diverged_%": ".0f",
    "lr_sensitivity": ".3f",
    "best_val_loss": ".3f",
}


def summary_for_html(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with each interval folded into its value's cell, and escape steps as text."""
    shown = summary.copy()
    for column, fmt in SUMMARY_INTERVALS.items():
        shown[column] = [
            ""
            if pd.isna(value)
            else f"{value:{fmt}}" + ("" if pd.isna(low) else f" [{low:{fmt}}, {high:{fmt}}]")
            for value, low, high in zip(
                summary[column], summary[f"{column}_lo"], summary[f"{column}_hi"], strict=True
            )
        ]
        shown = shown.drop(columns=[f"{column}_lo", f"{column}_hi"])
    shown["median_escape_step"] = [
        escape_label(step, steps)
        for step, steps in zip(summary["median_escape_step"], summary["steps"], strict=True)
    ]
    return shown


DIAGNOSTICS_FORMATS = {**FORMATS, "diagnostics_%": ".1f"}
PER_LR_FORMATS = {
    "converged": ".2f",
    "divergence_rate": ".2f",
    "final_loss_mean": ".3f",
    "final_loss_std": ".3f",
}


def per_lr_for_html(runs: pd.DataFrame) -> pd.DataFrame:
    table = per_lr_table(runs).reset_index()
    table["median_escape_step"] = [
        escape_label(step, steps)
        for step, steps in zip(table["median_escape_step"], table["steps"], strict=True)
    ]
    return table


# The table of runs: the schema's report columns, then each row's status and id.
RUN_COLUMNS = [*REPORT_COLUMNS, "status", "cell_id"]


def render(
    runs: pd.DataFrame,
    store: Path,
    benchmarks: pd.DataFrame | None = None,
    curves_cell: tuple[int, float] | None = None,
    baseline_note: str = "",
) -> str:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=jinja2.select_autoescape(),
        undefined=jinja2.StrictUndefined,
    )
    boards = leaderboards(runs)  # labels the arms itself
    board_figure = figures.rank_intervals(boards) if boards else None
    runs = with_arm_labels(runs)  # a variant under Muon or CompleteP is its own row and line
    errored = runs[runs["status"] != "ok"]
    summary = summarize(runs)
    return environment.get_template("report.html.j2").render(
        header=header(runs) | ({"Baseline arms": baseline_note} if baseline_note else {}),
        counts={
            "runs": len(runs),
            "finished": int((runs["status"] == "ok").sum()),
            "errors": len(errored),
        },
        summary_table=_table_html(
            summary_for_html(summary).reset_index(), "summary", SUMMARY_FORMATS
        ),
        diagnostics_table=_table_html(
            diagnostics_table(runs).reset_index(), "diagnostics", DIAGNOSTICS_FORMATS
        ),
        per_lr_table=_table_html(per_lr_for_html(runs), "per-lr", {"lr": "g", **PER_LR_FORMATS}),
        leaderboard_table=_leaderboard_html(boards),
        leaderboard_notes=[note for board in boards for note in board.attrs.get("notes", [])],
        leaderboard_image=png_data_uri(board_figure) if board_figure else "",
        mechanism_table=_mechanism_counts_html(runs),
        remedy_table=_table_html(remedy_table(runs), "remedies", {"in_converged_%": ".0f"}),
        sections=build_sections(runs, store, benchmarks, curves_cell),
        benchmark_table=(
            _table_html(
                step_time_vs_preln(benchmarks),
                "benchmarks",
                {"step_ms": ".2f", "vs_preln": ".2f"},
            )
            if benchmarks is not None
            else ""
        ),
        errored=[
            (r.cell_id, r.status, ((r.error or "").strip().splitlines() or [""])[-1])
            for r in errored.itertuples()
        ],
        runs_table=_table_html(runs[RUN_COLUMNS], "runs", FORMATS),
        console_summary=format_summary(summary),
    )


def _leaderboard_html(boards: list[pd.DataFrame]) -> str:
    if not boards:
        return ""
    shown = pd.concat([display(board).assign(preset=board["sweep"].to_numpy()) for board in boards])
    shown = shown[["preset", *[c for c in shown.columns if c != "preset"]]]
    return _table_html(shown.reset_index(drop=True), "leaderboard", {})


def _mechanism_counts_html(runs: pd.DataFrame) -> str:
    counts = mechanism_counts(runs)
    return _table_html(counts.reset_index(), "mechanisms", {}) if not counts.empty else ""


def write_report(html: str, out: Path) -> Path:
    """Write the report atomically (a temporary file beside it, then a rename); a target that
    is a folder is refused before anything is written."""
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give the HTML file's path", str(out))
    atomic_write(out, lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
    return out


def _csv(kind):
    return lambda text: [kind(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m suite.report",
        description="Turn every run in the results store into one self-contained HTML report.",
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=Path("results"),
        help="results store to read (default: results)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"HTML file to write (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--variants", type=_csv(str), help="only these variants, e.g. preln,postln")
    parser.add_argument("--depths", type=_csv(int), help="only these depths, e.g. 6,24")
    parser.add_argument("--sweep", help="only runs of this sweep preset, e.g. quick")
    parser.add_argument(
        "--benchmark", type=Path, help="pytest-benchmark JSON to fold into the throughput figure"
    )
    parser.add_argument(
        "--reference",
        nargs="?",
        const="reference",
        metavar="STORE",
        help="add the arms of the shipped reference (or of STORE) the store lacks, as baselines",
    )
    parser.add_argument("--curves-depth", type=int, help="depth of the training-curves figure")
    parser.add_argument("--curves-lr", type=float, help="LR of the training-curves figure")
    add_verdict_arguments(parser)
    args = parser.parse_args(argv)
    if (args.curves_depth is None) != (args.curves_lr is None):
        parser.error("--curves-depth and --curves-lr go together")
    verdict = parse_verdict(parser, args.verdict)
    if args.reference and (args.verdict or "=" in args.reference):
        parser.error(
            "--reference: the shipped reference is judged by the default verdict rule "
            "(its curves are not shipped); drop the verdict.* overrides"
        )
    runs = filter_runs(
        collect(args.store, write=False, verdict=verdict), args.variants, args.depths, args.sweep
    )
    baseline_note = ""
    if args.reference:
        try:
            runs, baseline_note = with_reference(
                runs,
                args.reference,
                lambda shipped: filter_runs(shipped, args.variants, args.depths, args.sweep),
            )
        except (FileNotFoundError, BaselineError) as error:
            raise SystemExit(f"report: --reference: {error}") from None
    if runs.empty:
        raise SystemExit(
            f"no runs in {args.store} match the filters; run a sweep first "
            "(python -m suite +variant=preln)"
        )
    curves_cell = (args.curves_depth, args.curves_lr) if args.curves_depth is not None else None
    if args.out.is_dir():
        parser.exit(2, f"config error: --out: {args.out} is a folder; give the HTML file's path\n")
    html = render(runs, args.store, load_benchmarks(args.benchmark), curves_cell, baseline_note)
    try:
        out = write_report(html, args.out)
    except OSError as error:
        raise SystemExit(f"report: cannot write {args.out}: {error.strerror or error}") from None
    errors = int((runs["status"] != "ok").sum())
    print(f"report: {out} ({len(runs)} runs, {errors} errored)")


if __name__ == "__main__":
    main()
