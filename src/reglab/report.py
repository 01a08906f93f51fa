"""The comparison report of a sweep: one row per configuration, mean ± std over its seeds.

    python -m reglab.report outputs/multiruns/<date>/<time>   # or: make report DIR=...

A sweep directory holds one numbered directory per job (0, 1, 2, ...), each with `.hydra/overrides.yaml`,
`metrics.jsonl` (one line per epoch) and, once the job has ended, `summary.json`. Jobs are grouped by their
overrides without the seed (`trainer.seed=...`) and Hydra's own settings (`hydra.*`); only completed and early
stopped jobs enter the means, all others are listed with their reason. The report is read from disk only, never
from W&B, and written next to the jobs:

- report.md: the table with the selected configuration in bold (lowest mean validation loss, `SELECTION_METRIC`;
  its test accuracy is shown beside it, never used to select), then the failed, diverged or incomplete jobs;
- report.csv: one row per group with mean and std columns and a `selected` column, for scripts and W&B;
- report_strength.png: test accuracy, generalization gap and ECE against each technique's strength;
- report_val_loss.png: validation loss per epoch, mean over seeds, one line per group (at most 20).

`SweepReportCallback` writes it when a Hydra multirun ends (conf/hydra/default.yaml) and logs it to W&B.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from reglab.errors import FINISHED, override_key, run_only

log = logging.getLogger(__name__)

OK_STATUSES = FINISHED  # the jobs whose numbers enter the means
SELECTION_METRIC = "val/loss"  # a sweep's winner: lowest mean validation cross-entropy, never a test metric
SELECTION_RULE = "lowest mean validation loss (`val/loss`, the sweep's objective)"
SEED_KEY = "trainer.seed"
METRICS = (  # summary.json keys aggregated per group (report.csv has a mean and a std column for each)
    "train/acc",
    "val/acc",
    "test/acc",
    "gap/test_acc",
    "train/loss",
    "val/loss",
    "test/loss",
    "test/nll",
    "test/ece",
    "best_epoch",
    "overfit_onset_epoch",
    "epochs_run",
    "weights/zero_frac",
    "weights/small_frac",
    "weights/l2",
    "weights/l1",
    "wall_time_s",
)
MAX_CURVES = 20  # validation-loss lines in one plot; more are unreadable
MAX_SERIES = 10  # series per strength panel (other settings crossed with the strength)
STDOUT_ROWS = 15  # rows of the table printed on the terminal


class SweepReportError(ValueError):
    """The directory cannot be reported on (it does not exist or holds no job)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the jobs


def _override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _is_grouping_override(override: str) -> bool:
    """Whether an override tells configurations apart: not the seed, not Hydra's own settings, not how a job ran
    (resuming, logging, progress output and file writing do not change what was trained)."""
    key = override_key(override)
    return key not in (SEED_KEY, "hydra") and not key.startswith(("hydra.", "hydra/")) and not run_only(key)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return None


@dataclass
class Job:
    """One job directory of the sweep, as far as it could be read."""

    directory: Path
    overrides: list[str]
    summary: dict | None  # None: no (readable) summary.json yet

    @property
    def status(self) -> str:
        return "incomplete" if self.summary is None else str(self.summary.get("status") or "unknown")

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


def _read_job(directory: Path) -> Job:
    summary = _read_json(directory / "summary.json")
    overrides = summary.get("overrides") if summary else None
    if not isinstance(overrides, list):
        overrides = _read_yaml(directory / ".hydra" / "overrides.yaml")
    return Job(directory, [str(o) for o in overrides or []], summary)


def _job_directories(sweep_dir: Path) -> list[Path]:
    """The numbered job directories in job order; a single run's directory counts as a sweep of one."""
    with os.scandir(sweep_dir) as entries:
        numbered = [Path(e.path) for e in entries if e.name.isdigit() and e.is_dir()]
    if not numbered and ((sweep_dir / "summary.json").exists() or (sweep_dir / ".hydra").is_dir()):
        return [sweep_dir]
    return sorted(numbered, key=lambda path: int(path.name))


def read_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job of a sweep directory, in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepReportError(
            f"{sweep_dir} is not a directory: pass a multirun directory (outputs/multiruns/...)"
        )
    jobs = [_read_job(directory) for directory in _job_directories(sweep_dir)]
    if not jobs:
        raise SweepReportError(
            f"{sweep_dir} holds no job directories (0, 1, 2, ...): is it a Hydra multirun directory?"
        )
    return jobs


def read_history(path: Path, keys: Iterable[str] | None = None) -> list[dict]:
    """The per-epoch records of a metrics.jsonl (only `keys`, if given), up to the first unreadable line: a job
    killed mid-write leaves a truncated last line."""
    keys = tuple(keys) if keys is not None else None
    history = []
    try:
        with path.open() as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                history.append(record if keys is None else {key: record.get(key) for key in keys})
    except OSError:
        pass
    return history


def _last_logged_epoch(path: Path) -> int | None:
    """The epoch of the last complete line of a metrics.jsonl, reading only the file's tail."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 16384))
            tail = file.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        try:
            return int(json.loads(line)["epoch"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


# ----------------------------------------------------------------------------------------------------------------
# Grouping and aggregation


@dataclass
class Group:
    """The jobs that share a configuration (all overrides but the seed)."""

    overrides: tuple[str, ...]
    jobs: list[Job] = field(default_factory=list)
    techniques: tuple[str, ...] = ()
    label: str = ""
    stats: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # metric -> (mean, std, n)

    @property
    def ok_jobs(self) -> list[Job]:
        return [job for job in self.jobs if job.ok]

    def mean(self, metric: str) -> float:
        return self.stats.get(metric, (math.nan, math.nan, 0))[0]

    def regularizer_params(self, technique: str) -> dict[str, str]:
        """`regularizer.<technique>.<param>=<value>` overrides as {param: value}."""
        prefix = f"regularizer.{technique}."
        return {
            override_key(o)[len(prefix) :]: _override_value(o)
            for o in self.overrides
            if override_key(o).startswith(prefix)
        }

    def strength(self, technique: str) -> float | None:
        """The technique's strength (the `strength_key` its file declares): from the overrides, else from a job's resolved config."""
        key = strength_key(technique)
        if key is None:
            return None
        value = self.regularizer_params(technique).get(key)
        if value is None:
            config = _read_yaml(self.jobs[0].directory / ".hydra" / "config.yaml")
            value = (
                OmegaConf.select(OmegaConf.create(config), f"regularizer.{technique}.{key}")
                if config
                else None
            )
        return _as_float(value)


def _as_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _techniques(overrides: Sequence[str], jobs: Sequence[Job]) -> tuple[str, ...]:
    """Active techniques: as the jobs recorded them, else from `regularizer=...`, else from parameter keys."""
    for job in jobs:
        recorded = (job.summary or {}).get("regularizers")
        if isinstance(recorded, list):
            return tuple(str(name) for name in recorded)
    for override in overrides:
        if override_key(override) == "regularizer":
            names = _override_value(override).strip("[]").split(",")
            return tuple(n.strip() for n in names if n.strip() and n.strip() not in ("none", "null"))
    keys = [override_key(o).split(".") for o in overrides if override_key(o).startswith("regularizer.")]
    return tuple(dict.fromkeys(parts[1] for parts in keys if len(parts) > 2))


def strength_key(technique: str) -> str | None:
    """The parameter that sets how strongly a technique regularizes (the x axis of its strength plot)."""
    return declared(technique, "strength_key")


def declared(technique: str, attribute: str):
    """What a technique's own file declares about it (regularizers/base.py), None for an unknown technique."""
    from reglab.regularizers import technique_classes

    cls = technique_classes().get(technique)
    return getattr(cls, attribute, None)


def _label(group: Group, common: set[str], omit_strength_of: str | None = None) -> str:
    """`l2 weight_decay=1e-3 + dropout p=0.3, model=cnn`: techniques with their overridden parameters (strength
    first), then the overrides that are not the same in every job of the sweep. `omit_strength_of` leaves out
    that technique's strength (the name of a series in the strength plot)."""
    described = dict.fromkeys(group.techniques)
    for override in group.overrides:
        parts = override_key(override).split(".")
        if parts[0] == "regularizer" and len(parts) > 2:
            described.setdefault(parts[1])
    technique_parts = []
    for technique in described:
        params = group.regularizer_params(technique)
        if technique == omit_strength_of:
            params.pop(strength_key(technique) or "", None)
        strength_first = sorted(params, key=lambda param: param != strength_key(technique))
        technique_parts.append(" ".join([technique, *(f"{p}={params[p]}" for p in strength_first)]))
    others = [
        o
        for o in group.overrides
        if o not in common
        and override_key(o) != "regularizer"
        and not override_key(o).startswith("regularizer.")
    ]
    label = " + ".join(technique_parts) or "none"
    return f"{label}, {' '.join(others)}" if others else label


def _aggregate(values: Iterable[object]) -> tuple[float, float, int]:
    """(mean, sample std, n) of the finite numbers among `values`; std is NaN for fewer than 2."""
    numbers = [v for v in map(_finite_or_none, values) if v is not None]
    if not numbers:
        return math.nan, math.nan, 0
    std = statistics.stdev(numbers) if len(numbers) > 1 else math.nan
    return statistics.fmean(numbers), std, len(numbers)


def _finite_or_none(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _sort_key(group: Group) -> tuple:
    strengths = tuple(
        (s is None, s if s is not None else 0.0)
        for s in (_as_float(group.regularizer_params(t).get(strength_key(t) or "")) for t in group.techniques)
    )
    return (bool(group.techniques), group.techniques, strengths, group.label)


def group_jobs(jobs: Sequence[Job]) -> list[Group]:
    """Jobs grouped by their overrides without seed and Hydra settings, aggregated, sorted: no regularization
    first, then by technique and strength."""
    groups: dict[tuple[str, ...], Group] = {}
    for job in jobs:
        key = tuple(sorted(o for o in job.overrides if _is_grouping_override(o)))
        groups.setdefault(key, Group(key)).jobs.append(job)
    common = set.intersection(*(set(key) for key in groups)) if groups else set()
    for group in groups.values():
        group.techniques = _techniques(group.overrides, group.ok_jobs or group.jobs)
        group.label = _label(group, common)
        ok_summaries = [job.summary or {} for job in group.ok_jobs]
        group.stats = {metric: _aggregate(s.get(metric) for s in ok_summaries) for metric in METRICS}
        with_onset_key = [s for s in ok_summaries if "overfit_onset_epoch" in s]
        overfitting = sum(s["overfit_onset_epoch"] is not None for s in with_onset_key)
        overfit_frac = overfitting / len(with_onset_key) if with_onset_key else math.nan
        group.stats["overfit_frac"] = (overfit_frac, math.nan, len(with_onset_key))
    return sorted(groups.values(), key=_sort_key)


def _common_overrides(groups: Sequence[Group]) -> list[str]:
    shared = set.intersection(*(set(g.overrides) for g in groups)) if groups else set()
    return sorted(o for o in shared if not override_key(o).startswith("regularizer"))


def _failure_reason(job: Job) -> str:
    if job.summary is None:
        epoch = _last_logged_epoch(job.directory / "metrics.jsonl")
        reached = f", last logged epoch {epoch}" if epoch is not None else ", no epoch logged"
        present = (job.directory / "summary.json").exists()
        return ("unreadable summary.json" if present else "incomplete (no summary.json)") + reached
    error = job.summary.get("error")
    first_line = str(error).strip().splitlines()[0][:200] if error else ""
    if job.status == "interrupted":  # stopped by a signal and not requeued: how far it got, how to go on
        resume = job.summary.get("resume")
        return f"{job.summary.get('stop_reason')}" + (f"; resume: `{resume}`" if resume else "")
    if job.status == "diverged":
        return f"diverged after {job.summary.get('epochs_run')} epochs" + (
            f": {first_line}" if first_line else ""
        )
    return first_line or f"status {job.status!r}, no error message recorded"


# ----------------------------------------------------------------------------------------------------------------
# Writing report.csv and report.md


def _strength_columns(groups: Sequence[Group]) -> list[str]:
    techniques = dict.fromkeys(t for g in groups for t in g.techniques if strength_key(t))
    return list(techniques)


def write_csv(groups: Sequence[Group], path: Path) -> Path:
    """report.csv: group label, techniques, overrides, each technique's strength, n, `selected` (1 for the
    configuration `selected_group` picks by validation loss, else 0), then mean/std columns."""
    techniques = _strength_columns(groups)
    selected = selected_group(groups)
    header = ["group", "techniques", "overrides"]
    header += [f"{t}.{strength_key(t)}" for t in techniques]
    header += ["n", "n_not_ok", "selected"]
    header += [*(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "overfit_frac"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for group in groups:
            strengths = [group.strength(t) if t in group.techniques else None for t in techniques]
            row = [group.label, "+".join(group.techniques) or "none", " ".join(group.overrides), *strengths]
            row += [len(group.ok_jobs), len(group.jobs) - len(group.ok_jobs), int(group is selected)]
            row += [value for m in METRICS for value in group.stats[m][:2]]
            row.append(group.stats["overfit_frac"][0] if group.stats["overfit_frac"][2] else None)
            writer.writerow(["" if _is_missing(v) else v for v in row])
    return path


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _format(group: Group, metric: str, scale: float = 1.0, digits: int = 1) -> str:
    mean, std, n = group.stats[metric]
    if n == 0:
        return "-"
    text = f"{scale * mean:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {scale * std:.{digits}f}"


def _table_row(group: Group, selected: Group | None) -> str:
    n_not_ok = len(group.jobs) - len(group.ok_jobs)
    n = f"{len(group.ok_jobs)}" + (f" (+{n_not_ok} excluded)" if n_not_ok else "")
    label, val_loss = f"`{group.label}`", _format(group, "val/loss", digits=3)
    if group is selected:
        label, val_loss = f"**{label}**", f"**{val_loss}**"
    overfit_mean, _, overfit_n = group.stats["overfit_frac"]
    overfits = f"{round(overfit_mean * overfit_n)}/{overfit_n}" if overfit_n else "-"
    cells = [
        label,
        n,
        _format(group, "train/acc", 100),
        _format(group, "val/acc", 100),
        val_loss,
        _format(group, "test/acc", 100),
        _format(group, "gap/test_acc", 100),
        _format(group, "test/ece", digits=3),
        _format(group, "test/nll", digits=3),
        _format(group, "best_epoch"),
        overfits,
        _format(group, "weights/zero_frac", 100),
    ]
    return "| " + " | ".join(cells) + " |"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def selected_group(groups: Sequence[Group]) -> Group | None:
    """The configuration a sweep selects: lowest mean validation loss (SELECTION_METRIC, the objective that
    train.py returns to sweepers). Test accuracy is reported beside it, never used to choose: a winner picked
    on the test set makes its test score an optimistic estimate."""
    candidates = [g for g in groups if g.stats[SELECTION_METRIC][2] > 0]
    return min(candidates, key=lambda g: g.mean(SELECTION_METRIC)) if candidates else None


def _context_lines(sweep_dir: Path, jobs: Sequence[Job], groups: Sequence[Group]) -> list[str]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    status_text = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(counts.items()))
    lines = [f"`{sweep_dir}`: {len(jobs)} jobs in {len(groups)} groups ({status_text})."]
    first_ok = next((job for job in jobs if job.ok), None)
    config = _read_yaml(first_ok.directory / ".hydra" / "config.yaml") if first_ok else None
    if isinstance(config, dict):
        dataset = (config.get("dataset") or {}).get("name", "?")
        model = (config.get("model") or {}).get("name", "?")
        lines.append(f"Data set `{dataset}`, model `{model}`.")
    common = _common_overrides(groups)
    if common:
        lines.append(f"Overrides shared by every job: `{' '.join(common)}`.")
    return lines


def write_markdown(
    sweep_dir: Path, jobs: Sequence[Job], groups: Sequence[Group], path: Path, plots: Sequence[Path]
) -> Path:
    selected = selected_group(groups)
    lines = [f"# Sweep report: {sweep_dir.name}", "", *_context_lines(sweep_dir, jobs, groups), ""]
    if selected is not None:
        lines += [
            f"Selected by {SELECTION_RULE}: `{selected.label}`, val loss "
            f"{_format(selected, 'val/loss', digits=3)}; its test accuracy {_format(selected, 'test/acc', 100)}% "
            f"(n={len(selected.ok_jobs)}). Test numbers are never used to select.",
            "",
        ]
    lines += [
        "| group | n | train acc % | val acc % | val loss | test acc % | train-test gap (points) | test ECE "
        "| test NLL | best epoch | overfits | zero weights % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_table_row(group, selected) for group in groups),
        "",
        "Mean ± sample standard deviation over seeds. n counts the completed or early-stopped seeds; failed, "
        "diverged and incomplete seeds are excluded from the means (listed below). The selected configuration "
        f"(bold) has the {SELECTION_RULE}. val loss = cross-entropy of the evaluated model on the validation "
        "set; train-test gap = train accuracy - test accuracy in percentage points. overfits = seeds with an "
        "overfitting onset (`reglab.diagnostics.overfit_onset_epoch`).",
        "",
        *(f"![{plot.stem}]({plot.name})" for plot in plots),
        "",
        "## Failed, diverged or incomplete jobs",
        "",
    ]
    not_ok = [(job, group) for group in groups for job in group.jobs if not job.ok]
    if not_ok:
        lines += ["| job | group | status | reason |", "|---|---|---|---|"]
        not_ok.sort(key=lambda pair: _job_order(pair[0], sweep_dir))
        for job, group in not_ok:
            where = _markdown_cell(
                str(job.directory.relative_to(sweep_dir)) if job.directory != sweep_dir else "."
            )
            reason = _markdown_cell(_failure_reason(job))
            lines.append(f"| `{where}` | `{group.label}` | {job.status} | {reason} |")
    else:
        lines.append("None: every job completed.")
    path.write_text("\n".join(lines) + "\n")
    return path


def _job_order(job: Job, sweep_dir: Path) -> int:
    return int(job.directory.name) if job.directory != sweep_dir and job.directory.name.isdigit() else -1


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily; bare Figures, freed when the function returns)


def _strength_series(groups: Sequence[Group], technique: str) -> dict[str, list[tuple[float, Group]]]:
    """The groups that use `technique`, as series (the rest of their label) of (strength, group) points."""
    common = set(_common_overrides(groups))
    series: dict[str, list[tuple[float, Group]]] = {}
    for group in groups:
        if technique not in group.techniques or group.stats["test/acc"][2] == 0:
            continue
        strength = group.strength(technique)
        if strength is None:
            continue
        series.setdefault(_label(group, common, omit_strength_of=technique), []).append((strength, group))
    return series


def _set_strength_axis(axes, technique: str, strengths: Sequence[float]) -> None:
    positive = [s for s in strengths if s > 0]
    if declared(technique, "strength_scale") == "log" and positive:  # 0 sits a decade left of the rest
        if min(strengths) <= 0:
            axes.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
        else:
            axes.set_xscale("log")
    axes.margins(x=0.08)
    unique = sorted(set(strengths))
    if len(unique) <= 8:
        axes.set_xticks(unique, [f"{s:g}" for s in unique])
    axes.set_xlabel(f"{technique}.{strength_key(technique)}")


STRENGTH_PANELS = (  # (metric, scale, y label) of the rows of report_strength.png
    ("test/acc", 100, "test accuracy %"),
    ("gap/test_acc", 100, "train - test accuracy (points)"),
    ("test/ece", 1, "test ECE"),
)


def plot_strength(groups: Sequence[Group], path: Path) -> Path | None:
    """report_strength.png: per technique (columns), test accuracy, gap and ECE (rows) against the strength,
    error bars = std over seeds; no regularization as a grey dashed line. None if no strength varies."""
    columns = {t: s for t in _strength_columns(groups) if (s := _strength_series(groups, t))}
    if not columns:
        return None
    from matplotlib.figure import Figure

    baselines = [g for g in groups if not g.techniques and g.stats["test/acc"][2] > 0][:3]
    figure = Figure(figsize=(4.6 * len(columns), 8))
    # fixed margins: a layout engine measures every text box of every panel first (~3 s of `make sweep`'s report)
    _margins_in_inches(figure, len(STRENGTH_PANELS), len(columns), left=0.8, right=0.2, bottom=0.55, top=0.7)
    all_axes = figure.subplots(len(STRENGTH_PANELS), len(columns), squeeze=False)
    for column, (technique, series) in enumerate(columns.items()):
        shown = list(series.items())[:MAX_SERIES]
        strengths = [s for _, points in shown for s, _ in points]
        for row, (metric, scale, ylabel) in enumerate(STRENGTH_PANELS):
            axes = all_axes[row][column]
            for name, points in shown:
                points = sorted(points, key=lambda point: point[0])
                means = [scale * g.stats[metric][0] for _, g in points]
                stds = [
                    0.0 if math.isnan(g.stats[metric][1]) else scale * g.stats[metric][1] for _, g in points
                ]
                axes.errorbar([s for s, _ in points], means, yerr=stds, marker="o", capsize=3, label=name)
            for baseline in baselines:
                axes.axhline(
                    scale * baseline.mean(metric), color="grey", linestyle="--", label=baseline.label
                )
            _set_strength_axis(axes, technique, strengths)
            axes.set_ylabel(ylabel)
            axes.grid(alpha=0.3)
        capped = f" (first {MAX_SERIES} of {len(series)} series)" if len(series) > MAX_SERIES else ""
        all_axes[0][column].set_title(f"{technique}{capped}")
        all_axes[0][column].legend(fontsize="x-small")
    figure.suptitle("regularization strength: mean ± std over seeds")
    return _save(figure, path)


def _margins_in_inches(
    figure, rows: int, columns: int, left, right, bottom, top, gap_w=0.9, gap_h=0.65
) -> None:
    """A grid's margins and the gaps between its panels (room for the tick labels and axis labels of each) in
    inches, whatever the figure's size; subplots_adjust takes fractions of the figure and of a panel."""
    width, height = figure.get_size_inches()
    panel_w = (width - left - right - (columns - 1) * gap_w) / columns
    panel_h = (height - bottom - top - (rows - 1) * gap_h) / rows
    figure.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap_w / panel_w,
        hspace=gap_h / panel_h,
    )


def _mean_curve(group: Group) -> tuple[list[int], list[float]]:
    """Validation loss per epoch, mean over the group's seeds that reached the epoch (finite values only)."""
    sums: dict[int, list[float]] = {}
    for job in group.ok_jobs:
        for record in read_history(job.directory / "metrics.jsonl", ("epoch", "val/loss")):
            value = _finite_or_none(record["val/loss"])
            if value is not None and record["epoch"] is not None:
                sums.setdefault(int(record["epoch"]), []).append(value)
    epochs = sorted(sums)
    return epochs, [statistics.fmean(sums[e]) for e in epochs]


def _curve_groups(groups: Sequence[Group]) -> list[Group]:
    """The groups to draw: all, or the MAX_CURVES with the lowest mean validation loss (the selection rule),
    keeping the unregularized baseline."""
    reported = [g for g in groups if g.stats[SELECTION_METRIC][2] > 0]
    if len(reported) <= MAX_CURVES:
        return reported
    chosen = sorted(reported, key=lambda g: g.mean(SELECTION_METRIC))[:MAX_CURVES]
    baseline = next((g for g in reported if not g.techniques), None)
    if baseline is not None and baseline not in chosen:
        chosen[-1] = baseline
    return [g for g in groups if g in chosen]


def plot_val_loss(groups: Sequence[Group], path: Path) -> Path | None:
    """report_val_loss.png: validation loss per epoch, mean over seeds, one line per group (at most MAX_CURVES,
    the lowest validation loss, noted in the title). None if no group has a completed job."""
    chosen = _curve_groups(groups)
    if not chosen:
        return None
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 5.5), layout="constrained")
    axes = figure.subplots()
    colors = colormaps["tab20"].colors
    for index, group in enumerate(chosen):
        axes.plot(*_mean_curve(group), color=colors[index % len(colors)], label=group.label)
    reported = sum(g.stats[SELECTION_METRIC][2] > 0 for g in groups)
    capped = ""
    if reported > len(chosen):
        baseline = " and no regularization" if any(not g.techniques for g in chosen) else ""
        capped = f" ({len(chosen)} of {reported} groups: the lowest validation loss{baseline})"
    axes.set_title(f"validation loss, mean over seeds{capped}")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    # zlib level 1 (PIL's default is 6), as for the runs' figures: a 12-technique strength grid is 5520 x 800 pixels
    figure.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
    figure.clear()
    return path


# ----------------------------------------------------------------------------------------------------------------
# The report


def _print_summary(groups: Sequence[Group], written: Sequence[Path]) -> None:
    selected = selected_group(groups)
    print(f"  {'val loss':>15}  {'test acc %':>14}  {'gap':>11}  {'ECE':>13}  {'n':>3}  group")
    for group in groups[:STDOUT_ROWS]:
        print(
            f"{'*' if group is selected else ' '} {_format(group, 'val/loss', digits=3):>15}  "
            f"{_format(group, 'test/acc', 100):>14}  {_format(group, 'gap/test_acc', 100):>11}  "
            f"{_format(group, 'test/ece', digits=3):>13}  {len(group.ok_jobs):>3}  {group.label}"
        )
    if len(groups) > STDOUT_ROWS:
        print(f"... {len(groups) - STDOUT_ROWS} more groups in report.md")
    if selected is not None:
        print(f"* selected by {SELECTION_RULE.replace('`', '')}: {selected.label}")
    for path in written:
        print(f"wrote {path}")


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *, verbose: bool = True) -> Path:
    """Write report.md, report.csv and the plots of a sweep directory into `out_dir` (default: the sweep
    directory); print a short table unless `verbose` is False. Returns the path of report.md."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    jobs = read_jobs(sweep_dir)
    groups = group_jobs(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        plot
        for plot in (
            plot_strength(groups, out_dir / "report_strength.png"),
            plot_val_loss(groups, out_dir / "report_val_loss.png"),
        )
        if plot is not None
    ]
    csv_path = write_csv(groups, out_dir / "report.csv")
    markdown_path = write_markdown(sweep_dir, jobs, groups, out_dir / "report.md", plots)
    if verbose:
        _print_summary(groups, [markdown_path, csv_path, *plots])
    return markdown_path


# ----------------------------------------------------------------------------------------------------------------
# W&B and the Hydra callback


def _csv_cell(text: str) -> str | float | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def log_report_to_wandb(run: Any, report_dir: str | Path) -> None:
    """Log a written report into an already started W&B run: report.csv as a table, the plots as images and
    the selected group (report.csv's `selected` row: lowest mean validation loss) with its validation loss and
    test accuracy in the run summary. The caller finishes the run."""
    import wandb

    report_dir = Path(report_dir)
    with (report_dir / "report.csv").open(newline="") as file:
        header, *rows = list(csv.reader(file))
    data = [[_csv_cell(cell) for cell in row] for row in rows]
    payload: dict[str, Any] = {"report/table": wandb.Table(columns=header, data=data, allow_mixed_types=True)}
    for name in ("strength", "val_loss"):
        image = report_dir / f"report_{name}.png"
        if image.exists():
            payload[f"report/{name}"] = wandb.Image(str(image))
    run.log(payload)
    columns = {name: header.index(name) for name in ("group", "selected", "val/loss_mean", "test/acc_mean")}
    selected = next((row for row in data if row[columns["selected"]] == 1), None)
    if selected is not None:
        run.summary.update(
            {
                "selected/group": selected[columns["group"]],
                "selected/rule": SELECTION_RULE.replace("`", ""),
                "selected/val_loss": selected[columns["val/loss_mean"]],
                "selected/test_acc": selected[columns["test/acc_mean"]],
            }
        )


def _log_to_wandb(config: DictConfig, sweep_dir: Path) -> None:
    """Log the report as a W&B run (job_type "report", grouped with the sweep's jobs) when W&B is on."""
    if OmegaConf.select(config, "logger.name") != "wandb":
        return
    if OmegaConf.select(config, "logger.wandb.mode") == "disabled":
        return
    from reglab.tracking import start_wandb

    group = sweep_dir.name  # the W&B group of every job of the multirun
    run = start_wandb(
        config.logger,
        run_dir=sweep_dir,
        name=f"{group}-report",
        group=group,
        job_type="report",
        config={"sweep_dir": str(sweep_dir)},
        tags=["report"],
    )
    if run is None:
        return
    try:
        log_report_to_wandb(run, sweep_dir)
    finally:
        run.finish()


class SweepReportCallback(Callback):
    """Hydra callback: when a multirun ends, write the report into its sweep directory and, with the W&B
    logger, log it as a W&B run. It never raises: a failed report leaves the sweep's results as they are."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            write_report(sweep_dir)
        except Exception as error:
            log.warning(
                "no sweep report (%s: %s); the jobs' results are intact, retry with "
                "`python -m reglab.report <sweep dir>`",
                type(error).__name__,
                error,
            )
            return
        try:
            _log_to_wandb(config, sweep_dir)
        except Exception as error:
            log.warning(
                "the sweep report was written but not logged to W&B (%s: %s)", type(error).__name__, error
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reglab.report",
        description="Write the comparison report (report.md, report.csv, plots) of a Hydra multirun directory.",
    )
    parser.add_argument(
        "sweep_dir", type=Path, help="the multirun directory, e.g. outputs/multiruns/<date>/<time>"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the report here (default: the sweep dir)"
    )
    args = parser.parse_args(argv)
    try:
        write_report(args.sweep_dir, args.out)
    except SweepReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
