"""Summaries of collected runs (definitions in docs/results.md: Verdicts, Summary columns,
Uncertainty).

All functions take the DataFrame that :func:`suite.analyze.collect.collect` returns and are pure.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from suite.verdict import CONVERGED, DIVERGED, STALLED

CELL = ["variant", "depth"]

# What a run was trained with besides its variant, and the value that leaves its name alone.
ARM_DEFAULTS = {
    "backbone": "gpt2",
    "recipe": "controlled",
    "optimizer": "adamw",
    "parametrization": "sp",
    "weight_decay_mode": "coupled",
    "no_decay": "no_decay=biases,gains",  # the default exemptions, as _no_decay_label words them
}
# Flags that make an arm when true, and the word the label gets for them.
ARM_FLAGS = {"packed": "packed"}
BASE_DEPTH_DEFAULT = 4  # model.base_depth's default (suite/config.py)


def with_arm_labels(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with ``variant`` naming the arm too, where it is not the default: "preln" for
    the gpt2 backbone, the controlled recipe, AdamW under sp (and every row of a table written
    before these columns existed), "preln · llama", "dyt · authors", "preln · muon", "preln ·
    completep", "preln · muon · completep" ("completep N₀=8" for another base depth), "preln ·
    packed". Every summary groups by (variant, depth), so without the label a store holding a
    variant under two optimizers or parametrizations would merge them into one row."""
    if runs.empty or "variant" not in runs:
        return runs
    labels = runs["variant"]
    for column, default in ARM_DEFAULTS.items():
        if column not in runs:
            continue
        values = runs[column].map(_no_decay_label) if column == "no_decay" else runs[column]
        other = values.notna() & (values != default)
        suffix = " · " + values.astype(str)
        if column == "parametrization" and "base_depth" in runs:
            moved = runs["base_depth"].notna() & (runs["base_depth"] != BASE_DEPTH_DEFAULT)
            base = " N₀=" + runs["base_depth"].astype("Int64").astype(str)
            suffix = suffix.where(~moved, suffix + base)
        labels = labels.where(~other, labels + suffix)
    for column, word in ARM_FLAGS.items():
        if column in runs:
            labels = labels.where(runs[column] != True, labels + " · " + word)  # noqa: E712
    return runs.assign(variant=labels + _varying_settings(runs))


def _no_decay_label(value: object) -> str | None:
    """The decay exemptions as a label, whatever order the record lists them in."""
    try:
        groups = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        return str(value)
    if not isinstance(groups, list):
        return None
    return "no_decay=" + ",".join(sorted(str(group) for group in groups))


# Settings beside the variant's own parameters that make an arm (Muon's knobs).
ARM_SETTINGS = ("optim.momentum", "optim.nesterov", "optim.ns_steps")


def _varying_settings(runs: pd.DataFrame) -> pd.Series:
    """ " · name=value" for every parameter of a variant (``variant.alpha_init=4``) and Muon
    knob whose value differs among that variant's runs in this table: runs of one variant
    under two settings are two arms, never one row (a setting all its runs share is left
    out, to keep labels short)."""
    labels = np.full(len(runs), "", dtype=object)
    if "config" in runs:
        settings = pd.DataFrame([_arm_settings(config) for config in runs["config"]])
        variant = runs["variant"].to_numpy()
        for name in settings.columns:
            values = settings[name]
            for arm in pd.unique(runs["variant"].dropna()):
                rows = (variant == arm) & values.notna().to_numpy()
                if values[rows].astype(str).nunique() > 1:
                    labels[rows] += " · " + name + "=" + values[rows].astype(str).to_numpy()
    return pd.Series(labels, index=runs.index)


def stored_config(config: object) -> dict[str, object]:
    """A run's config as its table stores it (JSON text, or a dict), as a dict; {} when damaged."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return {}
    return config if isinstance(config, dict) else {}


def _arm_settings(config: object) -> dict[str, object]:
    """A run's variant parameters and Muon knobs, from its stored config (JSON or dict)."""
    config = stored_config(config)
    found = dict(config.get("variant_params") or {})
    muon = (config.get("optim") or {}).get("name") == "muon"
    for key in ARM_SETTINGS if muon else ():
        section, name = key.split(".")
        value = (config.get(section) or {}).get(name)
        if value is not None:
            found[name] = value
    return found


def ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that finished (any verdict); errored cells are reported separately."""
    return runs[runs["status"] == "ok"]


def _lr_stable(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth, LR): whether every seed converged."""
    finished = ok_runs(runs)
    return (
        finished.assign(stable=finished["verdict"] == CONVERGED)
        .groupby([*CELL, "lr"])["stable"]
        .all()
        .reset_index()
    )


def max_stable_lr(runs: pd.DataFrame) -> pd.Series:
    """Per (variant, depth): the largest LR at which every seed converged (NaN if none did).

    Lower LRs that failed do not lower it (a grid can fail at 3e-3 and train at 1e-2, e.g. a run
    still on the plateau at a small LR); :func:`unstable_below` lists them, so it is never hidden.
    """
    stable = _lr_stable(runs)
    stable["stable_lr"] = stable["lr"].where(stable["stable"])
    return stable.groupby(CELL)["stable_lr"].max().rename("max_stable_lr")


def unstable_below(runs: pd.DataFrame) -> pd.Series:
    """Per (variant, depth): the LRs below the max stable LR where not every seed converged,
    e.g. "0.0003 0.003" (empty when the grid is stable all the way up to it)."""
    stable = _lr_stable(runs).join(max_stable_lr(runs), on=CELL)
    gaps = stable[~stable["stable"] & (stable["lr"] < stable["max_stable_lr"])]
    listed = gaps.groupby(CELL)["lr"].agg(lambda lrs: " ".join(f"{lr:g}" for lr in sorted(lrs)))
    return listed.rename("unstable_below")


def wilson_interval(successes: float, trials: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (Wilson 1927), as fractions; (nan, nan) for no
    trials. Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate_columns(verdicts: pd.Series, verdict: str, name: str) -> pd.Series:
    """Percentage of ``verdict`` among ``verdicts`` with its Wilson interval, in percent."""
    hits, n = int((verdicts == verdict).sum()), len(verdicts)
    low, high = wilson_interval(hits, n)
    return pd.Series(
        {name: 100 * hits / n if n else math.nan, f"{name}_lo": 100 * low, f"{name}_hi": 100 * high}
    )


def kaplan_meier(escape_steps: pd.Series, budgets: pd.Series) -> pd.DataFrame:
    """Fraction of runs still on the plateau after each step: Kaplan–Meier estimate, a run that
    never escaped counting as censored at its budget N (observed through step N − 1). A run that
    diverged before escaping never escaped within its budget and counts so: the curve is the
    fraction of runs that had not (yet) learned. Columns ``step`` and ``on_plateau``, starting
    at (0, 1.0); one row per step where a run escaped or was censored."""
    escaped = escape_steps.notna().to_numpy()
    times = np.where(escaped, escape_steps.fillna(0).to_numpy(float), budgets.to_numpy(float))
    steps, on_plateau, surviving = [0.0], [1.0], 1.0
    for time in np.unique(times):
        at_risk = int((times >= time).sum())
        events = int(((times == time) & escaped).sum())
        if at_risk:
            surviving *= 1 - events / at_risk
        steps.append(float(time))
        on_plateau.append(surviving)
    return pd.DataFrame({"step": steps, "on_plateau": on_plateau})


def with_escape_known(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs whose escape step is known: trained (budget > 0) and judged from their
    curve (not from a record whose curve could not be read)."""
    finished = ok_runs(with_optional_columns(runs))
    finished = finished[finished["steps"].fillna(0) > 0]
    return finished[finished["judged_from"] != "record"]


def median_escape_step(runs: pd.DataFrame) -> float:
    """The Kaplan–Meier median escape step: the first step by which half the runs had left the
    plateau; inf when more than half were still on it at their budget (shown as "> N"); NaN when
    no run's escape step is known (see :func:`with_escape_known`)."""
    known = with_escape_known(runs)
    if known.empty:
        return math.nan
    curve = kaplan_meier(known["escape_step"], known["steps"])
    reached = curve[curve["on_plateau"] <= 0.5]
    return float(reached["step"].iloc[0]) if not reached.empty else math.inf


def seed_resamples(finished: pd.DataFrame, metric, resamples: int = 400, seed: int = 0) -> list:
    """``metric`` of each of ``resamples`` resamples of the seeds with replacement, in draw order:
    each resample keeps every run of the drawn seeds, a seed drawn twice counting twice.
    Deterministic (fixed RNG), so the same table gives the same resamples on any machine."""
    seeds = np.sort(finished["seed"].unique())
    by_seed = {s: finished[finished["seed"] == s] for s in seeds}
    rng = np.random.default_rng(seed)
    # A resample's metric depends only on which seeds it drew, not their order: with 2 seeds
    # there are 3 such draws, with 3 seeds 10, so each is computed once, not once per resample.
    draws = [tuple(sorted(rng.choice(seeds, size=len(seeds)))) for _ in range(resamples)]
    computed = {
        draw: metric(pd.concat([by_seed[s] for s in draw])) for draw in dict.fromkeys(draws)
    }
    return [computed[draw] for draw in draws]


def seed_bootstrap(runs: pd.DataFrame, metric, resamples: int = 400, seed: int = 0) -> pd.DataFrame:
    """Per (variant, depth): a 95% percentile interval of ``metric`` (a function of runs giving a
    Series per (variant, depth)) over :func:`seed_resamples`. Columns ``lo`` and ``hi``."""
    finished = ok_runs(runs)
    if finished["seed"].nunique() < 2:
        return pd.DataFrame(columns=["lo", "hi"], dtype=float)
    table = pd.concat(seed_resamples(finished, metric, resamples, seed), axis=1)
    return pd.DataFrame(
        {
            "lo": table.quantile(0.025, axis=1, interpolation="lower"),
            "hi": table.quantile(0.975, axis=1, interpolation="higher"),
        }
    )


OPTIONAL_COLUMNS = ("steps", "escape_step", "borderline", "relapsed", "judged_from")


def with_optional_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """Tables collected before the escape step and its flags existed: those columns empty."""
    missing = [column for column in OPTIONAL_COLUMNS if column not in runs]
    return runs.assign(**{column: np.nan for column in missing}) if missing else runs


def count_true(flags: pd.Series) -> int:
    """How many values are True (missing values are not)."""
    return int(flags.eq(True).sum())


RATES = ("converged_%", "stalled_%", "diverged_%")
SUMMARY_COLUMNS = [
    "runs",
    "steps",
    *[f"{rate}{part}" for rate in RATES for part in ("", "_lo", "_hi")],
    "borderline",
    "relapsed",
    "median_escape_step",
    "errors",
    "max_stable_lr",
    "unstable_below",
    "lr_sensitivity",
    "lr_sensitivity_lo",
    "lr_sensitivity_hi",
    "best_val_loss",
    "best_val_loss_lo",
    "best_val_loss_hi",
    "best_lr",
    "median_tokens_per_s",
    "tokens_per_s_vs_preln",
]
CONSOLE_COLUMNS = [
    "runs",
    "steps",
    *RATES,
    "borderline",
    "median_escape_step",
    "errors",
    "max_stable_lr",
    "lr_sensitivity",
    "best_val_loss",
    "median_tokens_per_s",
]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth): runs, verdict percentages, errors, max stable LR, LR sensitivity,
    best val loss and its LR, median tokens/s and its ratio to Pre-LN at the same depth."""
    if runs.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    runs = with_optional_columns(runs)
    finished = ok_runs(runs)
    grouped = finished.groupby(CELL)
    cells = pd.MultiIndex.from_frame(runs[CELL].drop_duplicates())
    rates = [
        grouped["verdict"].apply(_rate_columns, verdict, name).unstack()
        for verdict, name in zip((CONVERGED, STALLED, DIVERGED), RATES, strict=True)
    ]
    parts = [
        grouped.size().rename("runs"),
        grouped["steps"].agg(step_budget).rename("steps"),
        *rates,
        grouped["borderline"].agg(count_true).rename("borderline"),
        grouped["relapsed"].agg(count_true).rename("relapsed"),
        _per_group(grouped, median_escape_step, "median_escape_step"),
        runs[runs["status"] == "error"].groupby(CELL).size().rename("errors"),
        max_stable_lr(runs),
        unstable_below(runs),
        lr_sensitivity(runs),
        seed_bootstrap(runs, lr_sensitivity).add_prefix("lr_sensitivity_"),
        best_val(runs),
        seed_bootstrap(runs, lambda r: best_val(r)["best_val_loss"]).add_prefix("best_val_loss_"),
        grouped["tokens_per_s"].median().rename("median_tokens_per_s"),
        throughput_vs_preln(runs),
    ]
    table = pd.concat([part.reindex(cells) for part in parts], axis=1)
    for count in ("runs", "errors", "borderline", "relapsed"):
        table[count] = table[count].fillna(0).astype(int)
    for text in ("steps", "unstable_below"):
        table[text] = [value if isinstance(value, str) else "" for value in table[text]]
    return table.reindex(columns=SUMMARY_COLUMNS).sort_index()


def step_budget(steps: pd.Series) -> str:
    """The step budget N of some runs: "200", or "200–400" when they differ ("" for none)."""
    values = sorted({int(v) for v in steps.dropna()})
    if not values:
        return ""
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def _per_group(grouped, function, name: str) -> pd.Series:
    """``function(group)`` for every group, as a float Series on the groups' index."""
    index = grouped.size().index
    return pd.Series([function(group) for _, group in grouped], index=index, dtype=float, name=name)


def _fmt(fmt: str, missing: str = ""):
    return lambda v: missing if pd.isna(v) else format(v, fmt)


def escape_label(step: float, steps: str) -> str:
    """A median escape step for display: the step, or "> N" when censored at the budget N."""
    if pd.isna(step):
        return ""
    return f">{steps.split('–')[-1]}" if math.isinf(step) else f"{step:.0f}"


def format_summary(table: pd.DataFrame) -> str:
    """The console rendering of :func:`summarize`; intervals are in the report and the Parquet
    summary, and a max stable LR with a failing LR below it is marked with *."""
    if table.empty:
        return "(no runs)"
    shown = table[CONSOLE_COLUMNS].copy()
    for column in RATES:
        shown[column] = shown[column].map(_fmt(".0f"))
    shown["median_escape_step"] = [
        escape_label(step, steps)
        for step, steps in zip(table["median_escape_step"], table["steps"], strict=True)
    ]
    shown["max_stable_lr"] = [
        _fmt("g", "none")(lr) + ("*" if gaps else "")
        for lr, gaps in zip(table["max_stable_lr"], table["unstable_below"], strict=True)
    ]
    shown["lr_sensitivity"] = shown["lr_sensitivity"].map(_fmt(".3f"))
    shown["best_val_loss"] = shown["best_val_loss"].map(_fmt(".3f"))
    shown["median_tokens_per_s"] = shown["median_tokens_per_s"].map(_fmt(",.0f"))
    text = shown.rename(
        columns={"median_tokens_per_s": "tokens/s", "median_escape_step": "median_escape"}
    ).to_string()
    notes = [
        "stalled = not below the unigram entropy − stall margin within `steps`; "
        "median_escape = median step the smoothed loss got there (>N: half never did); "
        "borderline = runs whose verdict sits near a boundary"
    ]
    if (table["unstable_below"] != "").any():
        notes.append("* a lower LR on the grid did not converge for every seed (see the report)")
    return "\n".join([text, *notes])


def capped_loss(runs: pd.DataFrame) -> pd.Series:
    """Per run: min(val loss, initial loss), with diverged/missing losses counted as the initial
    loss, as in Wortsman et al. (2023)'s LR-sensitivity definition."""
    loss = runs["val_loss"].astype(float)
    initial = runs["initial_loss"].astype(float)
    return loss.where(loss.notna() & (loss < initial), initial)


def lr_sensitivity(runs: pd.DataFrame) -> pd.Series:
    """Per (variant, depth): E_η[min(ℓ(η), ℓ0) − ℓ*] over the LR grid (Wortsman et al. 2023).

    ℓ(η) is the seed-mean of the capped final validation loss at LR η, ℓ0 the loss at init and
    ℓ* the best ℓ(η) on the grid. 0 means every LR is as good as the best one.
    """
    finished = ok_runs(runs)
    per_lr = finished.assign(capped=capped_loss(finished)).groupby([*CELL, "lr"])["capped"].mean()
    best = per_lr.groupby(level=CELL).transform("min")
    return (per_lr - best).groupby(level=CELL).mean().rename("lr_sensitivity")


def best_val(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth): the best seed-mean validation loss and the LR that gave it."""
    finished = ok_runs(runs)
    per_lr = finished.groupby([*CELL, "lr"])["val_loss"].mean().dropna().reset_index()
    if per_lr.empty:
        empty = pd.MultiIndex.from_tuples([], names=CELL)
        return pd.DataFrame(columns=["best_val_loss", "best_lr"], index=empty, dtype=float)
    best = per_lr.loc[per_lr.groupby(CELL)["val_loss"].idxmin()]
    return best.set_index(CELL).rename(columns={"val_loss": "best_val_loss", "lr": "best_lr"})


def throughput_vs_preln(runs: pd.DataFrame, baseline: str = "preln") -> pd.Series:
    """Per (variant, depth): median tokens/s divided by the baseline variant's at the same depth."""
    median = ok_runs(runs).groupby(CELL)["tokens_per_s"].median()
    if baseline not in median.index.get_level_values("variant"):
        return pd.Series(np.nan, index=median.index, name="tokens_per_s_vs_preln")
    reference = median.xs(baseline, level="variant")
    depths = median.index.get_level_values("depth")
    ratio = median.to_numpy() / reference.reindex(depths).to_numpy()
    return pd.Series(ratio, index=median.index, name="tokens_per_s_vs_preln")


def per_lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth, LR): seeds, converged and diverged fractions, borderline runs, the
    median escape step, mean ± std of the final training loss over the seeds that did not
    diverge."""
    finished = ok_runs(with_optional_columns(runs))
    diverged = finished["verdict"] == DIVERGED
    grouped = finished.assign(diverged=diverged).groupby([*CELL, "lr"])
    kept = finished[~diverged].groupby([*CELL, "lr"])["final_loss"]
    table = pd.DataFrame(
        {
            "seeds": grouped.size(),
            "converged": grouped["verdict"].apply(lambda v: (v == CONVERGED).mean()),
            "divergence_rate": grouped["diverged"].mean(),
            "borderline": grouped["borderline"].agg(count_true),
            "median_escape_step": _per_group(grouped, median_escape_step, "median_escape_step"),
            "steps": grouped["steps"].agg(step_budget),
            "final_loss_mean": kept.mean(),
            "final_loss_std": kept.std(ddof=0),
        }
    )
    return table.sort_index()


DIAGNOSTICS_COLUMNS = [
    "init_grad_norm_ratio",
    "max_attn_logit",
    "loss_spikes",
    "grad_spikes",
    "diagnostics_%",
]


def diagnostics_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth): median last/first-layer FFN gradient-norm ratio at init, the largest
    attention logit seen, loss and gradient spikes summed over runs, and the median share of
    wall time the diagnostics took (empty when no run recorded diagnostics)."""
    finished = ok_runs(runs)
    if "init_grad_norm_ratio" not in finished or finished["init_grad_norm_ratio"].isna().all():
        return pd.DataFrame(columns=DIAGNOSTICS_COLUMNS)
    finished = finished.dropna(subset=["init_grad_norm_ratio"])
    grouped = finished.assign(
        share=100 * finished["diagnostics_s"] / finished["wall_time_s"]
    ).groupby(CELL)
    table = pd.DataFrame(
        {
            "init_grad_norm_ratio": grouped["init_grad_norm_ratio"].median(),
            "max_attn_logit": grouped["max_attn_logit"].max(),
            "loss_spikes": grouped["loss_spikes"].sum().astype(int),
            "grad_spikes": grouped["grad_spikes"].sum().astype(int),
            "diagnostics_%": grouped["share"].median(),
        }
    ).sort_index()
    if "amax_gain_forward" in finished and finished["amax_gain_forward"].notna().any():
        # multi-stream variants only: the largest over runs, as the mHC paper plots it
        table["amax_gain_forward"] = grouped["amax_gain_forward"].max()
        table["amax_gain_backward"] = grouped["amax_gain_backward"].max()
    return table
