"""Tables from the results store: the leaderboard (Markdown, CSV, LaTeX), Pareto marks, matched-FID tables.

Everything here reads result rows only. A leaderboard row is one method setting (method, knobs, solver,
steps; with several runs, also the run), aggregated over seeds as each metric's spec says (mean or
median), with each quality metric's std across seeds. What a column is called, which way is better and
how many decimals it shows come from the metric specs (`adadiff_bench.metrics.specs`), so a newly
registered metric appears here without an edit.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError, did_you_mean
from ..metrics.bootstrap import mean_bootstrap_interval
from ..metrics.specs import (CI_HIGH, CI_LOW, SEED_STD, delta_column, delta_quantity, is_value_column, parse_column,
                             primary_column, ranking_label)
from ..results import BUSY_ELSEWHERE, OTHER_CORES, atomic_write_bytes
from .groups import (BACKBONE_HASH, PairedDifference, group_keys, group_label, includes_zero, is_unknown, overlaps,
                     paired_interval, reference_of_groups, unresolved_pareto)
from .view import ReportView, reference_cost


def knobs_of(row: pd.Series) -> dict:
    """A row's knobs, from its JSON `params` ({} when it has none)."""
    params = row.get("params", "")
    return json.loads(params) if isinstance(params, str) and params else {}


def swept_of(row: pd.Series) -> list[str]:
    """The knobs a row's [[methods]] entry sweeps, from its JSON `swept` ([] when it has none)."""
    swept = row.get("swept", "")
    return json.loads(swept) if isinstance(swept, str) and swept else []


def setting_label(row: pd.Series) -> str:
    knobs = knobs_of(row)
    shown = {k: (Path(v).stem if k == "checkpoint" else v) for k, v in knobs.items() if not k.startswith("map_")}
    parts = [f"{k}={v}" for k, v in shown.items()] + [f"{row['solver']} {row['num_steps']} steps"]
    label = f"{row['method']} ({', '.join(parts)})" + (" [ceiling, not a method]" if is_ceiling(row) else "")
    if "valid" in row and not bool(row["valid"]):
        label += f" [invalid: {row.get('invalid_reason', '')}]"
    return f"[{row['run']}] {label}" if row.get("several_runs", False) else label


def is_ceiling(row: pd.Series) -> bool:
    """An oracle's row: a bound on what exits could do, not a competitor (older runs lack the column)."""
    return bool(row.get("ceiling", False)) if pd.notna(row.get("ceiling", False)) else False


def seed_aggregation(column: str) -> str:
    """How a column's values over seeds become one: its metric's spec says (mean or median); costs: mean."""
    parsed = parse_column(column)
    return parsed.metric.seeds if parsed is not None else "mean"


def leaderboard(frame: pd.DataFrame, sort_by: str | None = None, level: float = 0.95,
                fid_replicates: dict | None = None) -> pd.DataFrame:
    """One row per method setting: aggregated over seeds, each quality metric's std across seeds, rows grouped by
    backbone (each group's dFID against its own `full`, Pareto marks within it), and FID's seed interval.

    `fid_replicates`: per `frame` index, the cell's FID bootstrap over its samples as (point, replicates) (None or
    absent where it kept none); settings of one seed are then compared over samples (`groups.PairedDifference`)."""
    several = frame["run"].nunique() > 1 if "run" in frame.columns else False
    frame = frame.assign(several_runs=several, group=group_keys(frame))
    frame = frame.assign(setting=frame.apply(setting_label, axis=1))
    metric_columns = [c for c in frame.columns if is_value_column(c)]
    numeric = metric_columns + ["gflops_per_image", "layer_ratio"] + [
        c for c in ("time_per_image_s", "reference_time_per_image_s", "speedup", "cache_bytes", "peak_mem_mb")
        if c in frame.columns]
    bounds = [c for c in frame.columns if c.endswith((CI_LOW, CI_HIGH))]
    kept = [c for c in ("method", "params", "at_reference", BACKBONE_HASH, "training_budget") if c in frame.columns]
    busy = {}
    if OTHER_CORES in frame.columns:  # the worst seed's timing conditions (a number where the file holds one)
        frame = frame.assign(**{OTHER_CORES: pd.to_numeric(frame[OTHER_CORES], errors="coerce")})
        busy = {OTHER_CORES: "max"}
    grouped = frame.groupby(["setting", "group"], sort=False)  # (one setting on two backbones: two rows)
    warnings = {EXIT_WARNING: first_text} if EXIT_WARNING in frame.columns else {}
    board = grouped.agg({**{c: seed_aggregation(c) for c in numeric}, **{c: "first" for c in bounds + kept},
                         **warnings, **busy, "num_samples": "first", "seed": "count"}).rename(columns={"seed": "seeds"})
    spread = grouped[metric_columns].std(ddof=1).add_suffix(SEED_STD)  # NaN with one seed
    board = board.join(spread)
    board.loc[board["seeds"] > 1, bounds] = np.nan  # a bootstrap interval belongs to one seed's samples
    board = board.reset_index()
    if warnings:  # a degenerate exit setting says so beside its name
        board["setting"] += board[EXIT_WARNING].map(lambda text: f" [{text.split(' (')[0]}]" if text else "")
    labels = {key: group_label(key, rows, several) for key, rows in frame.groupby("group", sort=False)}
    board.insert(1, "backbone", board["group"].map(labels))
    fid = primary_column(board.columns)
    board["competitor"] = ~grouped["ceiling"].first().fillna(False).astype(bool).values \
        if "ceiling" in frame.columns else True
    board.insert(1, "pareto", group_pareto(board, fid) if fid else False)
    if fid:
        board = with_comparisons(board, grouped, fid, level, fid_replicates or {})
    order = list(dict.fromkeys(board["group"]))  # groups in the order the runs list them
    return sort_board(board, sort_by) if sort_by else by_group(sort_board(board, fid), order)


EXIT_WARNING = "exit_warning"  # why an adaptive exit setting did not adapt (`harness.exit_warning`), "" when it did


def first_text(values: pd.Series) -> str:
    """The first non-empty text among a setting's seeds ("" when none)."""
    return next((v for v in values if isinstance(v, str) and v), "")


def group_pareto(board: pd.DataFrame, fid: str) -> np.ndarray:
    """Pareto marks computed among the competitors of each backbone group separately."""
    mask = np.zeros(len(board), dtype=bool)
    for _, rows in board.groupby("group", sort=False):
        at = board.index.get_indexer(rows.index)
        mask[at] = pareto_mask(rows, fid, rows["competitor"].to_numpy(bool))
    return mask


def with_comparisons(board: pd.DataFrame, grouped, fid: str, level: float, fid_replicates: dict) -> pd.DataFrame:
    """dFID against the group's `full`, FID's bootstrap interval over seeds where a setting has >= 2, and marks
    where the intervals do not separate a row from its `full` (`vs_full_unresolved`) or its Pareto place from a
    cheaper row (`pareto_unresolved`).

    Every cell of a seed starts from the same noise (it depends on the seed and the sample's index alone), so
    two settings that share >= 2 seeds are compared by their per-seed differences, and two settings of one seed
    whose cells kept FID bootstrap replicates by their differences over samples (`PairedDifference`): what the
    noise does to every method cancels. Other settings fall back to whether their own intervals overlap."""
    low, high = fid + CI_LOW, fid + CI_HIGH
    board = board.assign(**{c: board.get(c, np.nan) for c in (low, high)})
    per_seed = [dict(zip(rows["seed"], rows[fid].astype(float))) for _, rows in grouped]  # board order
    difference = PairedDifference(per_seed, [one_seed_kept(rows, fid_replicates) for _, rows in grouped], level)
    intervals = np.array([mean_bootstrap_interval(list(v.values()), level) for v in per_seed]).reshape(-1, 2)
    several = board["seeds"].to_numpy() > 1
    board.loc[several, low] = intervals[several, 0]
    board.loc[several, high] = intervals[several, 1]
    reference = reference_of_groups(board)
    has_full = (reference >= 0).to_numpy()
    ref = reference.clip(lower=0).to_numpy()
    delta = np.where(has_full, board[fid].to_numpy(float) - board[fid].to_numpy(float)[ref], np.nan)
    dfid = delta_column(fid)
    board.insert(board.columns.get_loc(fid) + 1, dfid, delta)
    others = [c for c in board.columns if c not in (low, high)]
    at = others.index(dfid) + 1
    board = board[others[:at] + [low, high] + others[at:]]  # FID's interval shown beside dFID
    same = has_full & (ref != np.arange(len(board)))
    paired = np.array([difference(i, ref[i]) if same[i] else (np.nan, np.nan)
                       for i in range(len(board))]).reshape(-1, 2)
    board[dfid + CI_LOW], board[dfid + CI_HIGH] = paired[:, 0], paired[:, 1]
    unpaired = overlaps(board[low], board[high], board[low].to_numpy()[ref], board[high].to_numpy()[ref])
    board["vs_full_unresolved"] = same & np.where(np.isfinite(paired[:, 0]), includes_zero(paired), unpaired)
    board["pareto_unresolved"] = unresolved_pareto(board, low, high, difference)
    return board


def one_seed_kept(rows: pd.DataFrame, kept: dict) -> tuple | None:
    """A setting of one seed: ((run, seed), point, replicates) of its cell's FID bootstrap; None otherwise."""
    if len(rows) != 1 or kept.get(rows.index[0]) is None:
        return None
    row = rows.iloc[0]
    return ((row.get("run", ""), row["seed"]), *kept[rows.index[0]])


def sort_board(board: pd.DataFrame, column: str | None) -> pd.DataFrame:
    """Rows best first by `column` (its better direction from the metric); UserError for an unknown column."""
    if column is None:
        return board
    if column not in board.columns:
        valid = [c for c in board.columns if c not in HIDDEN and not c.endswith(SEED_STD)]
        raise UserError(f"cannot sort by {column!r}{did_you_mean(column, valid)}: not a leaderboard column; "
                        f"valid: {', '.join(valid)}")
    return board.sort_values(column, ascending=not higher_is_better(column), kind="stable").reset_index(drop=True)


def by_group(board: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Rows of one backbone group together, groups in `order`, the order inside each group kept."""
    rank = board["group"].map({key: i for i, key in enumerate(order)})
    return board.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)


def pareto_mask(board: pd.DataFrame, fid: str, competitors: np.ndarray, cost: str = "gflops_per_image") -> np.ndarray:
    """Rows no other competitor beats on both FID and `cost` (lower is better for both)."""
    quality, cost = board[fid].to_numpy(float), board[cost].to_numpy(float)
    usable = competitors & np.isfinite(quality) & np.isfinite(cost)
    mask = np.zeros(len(board), dtype=bool)
    for i in np.flatnonzero(usable):
        others = usable & (quality <= quality[i]) & (cost <= cost[i]) & ((quality < quality[i]) | (cost < cost[i]))
        mask[i] = not others.any()
    return mask


def metric_label(column: str, num_samples: int | None = None) -> str:
    """A quality column's name for people: its quantity and feature space, and n where the metric depends on it,
    as in "FID [digits_cnn, n=1000]"."""
    parsed = parse_column(column)
    n = f", n={num_samples}" if parsed.quantity.states_n and num_samples is not None else ""
    return f"{parsed.quantity.label} [{parsed.space}{n}]"


def higher_is_better(column: str) -> bool:
    """Which way a column is better: the metric's spec says for quality columns; of the costs, only the speed-up."""
    parsed = parse_column(column)
    return parsed.quantity.higher_is_better if parsed is not None else column == "speedup"


def axis_label(column: str, num_samples: int | None = None) -> str:
    """A figure axis for a quality column: "FID [digits_cnn, n=1000] (lower is better)"."""
    return f"{metric_label(column, num_samples)} ({'higher' if higher_is_better(column) else 'lower'} is better)"


COLUMN_HEADERS = {"gflops_per_image": "GFLOPs/image ↓", "layer_ratio": "layer ratio ↓",
                  "time_per_image_s": "time/image (ms) ↓", "reference_time_per_image_s": "reference time/image (ms)",
                  "speedup": "speed-up vs full ↑",
                  "cache_bytes": "cache (KB/batch) ↓", "peak_mem_mb": "peak mem (MB) ↓", "pareto": "Pareto",
                  "backbone": "backbone",
                  "training_budget": "training budget (steps x batch, wall-clock, device)"}
UNRESOLVED = "≈"  # the intervals do not separate this comparison
HIDDEN = ("setting", "num_samples", "seeds", "method", "params", "at_reference", "group", "exit_warning", BACKBONE_HASH,
          "competitor", "vs_full_unresolved", "pareto_unresolved", OTHER_CORES)  # in the CSV, not in the shown table


def _header(column: str, num_samples: int) -> str:
    """A column's header: the metric, its feature space (and n for FID), an arrow for which way is better."""
    if column.endswith("_ci") and parse_column(column + "_low") is not None:
        parsed = parse_column(column + "_low")
        return f"{parsed.quantity.label} {parsed.space} bootstrap CI"
    if parse_column(column) is not None:
        return f"{metric_label(column, num_samples)} {'↑' if higher_is_better(column) else '↓'}"
    if (quantity := delta_quantity(column)) is not None:
        return f"d{quantity.label} vs group's full ↓"
    return COLUMN_HEADERS.get(column, column)


def _number(column: str, value: float) -> str:
    """A table cell: ms for times, KB for caches, MB without decimals, a metric's own decimals, 3 otherwise."""
    if column in ("time_per_image_s", "reference_time_per_image_s"):
        value = value * 1e3
    if column == "cache_bytes":
        value = value / 1e3
    parsed = parse_column(column)
    decimals = parsed.quantity.decimals if parsed is not None else (0 if column == "peak_mem_mb" else 3)
    return f"{value:.{decimals}f}"


def _cell(row: pd.Series, column: str) -> str:
    """A value, with ± its std across seeds when there are several, or its bootstrap interval."""
    if column == "pareto":
        return ("★" + (UNRESOLVED if row.get("pareto_unresolved", False) else "")) if row[column] else ""
    if column in ("backbone", "training_budget"):
        return "" if pd.isna(row[column]) else str(row[column])
    if delta_quantity(column) is not None:
        mark = f" {UNRESOLVED}" if row.get("vs_full_unresolved", False) else ""
        low, high = row.get(column + CI_LOW, np.nan), row.get(column + CI_HIGH, np.nan)
        paired = "" if pd.isna(low) else f" [{low:+.2f}, {high:+.2f}]"
        return "n/a" if pd.isna(row[column]) else f"{row[column]:+.3f}{paired}{mark}"
    if column.endswith("_ci"):
        low, high = row[column + "_low"], row[column + "_high"]
        return "" if pd.isna(low) else f"[{low:.2f}, {high:.2f}]"
    value = row[column]
    if pd.isna(value):
        return "n/a"
    spread = row.get(column + SEED_STD, np.nan)
    return _number(column, value) + ("" if pd.isna(spread) else f" ± {_number(column, spread)}")


def shown_columns(board: pd.DataFrame) -> list[str]:
    """The leaderboard's displayed columns after the setting (a bootstrap interval as one `<fid>_ci` column)."""
    columns = []
    for c in board.columns:
        if c.endswith(CI_LOW) and parse_column(c) is not None and board[c].notna().any():
            columns.append(c.removesuffix("_low"))
        elif c not in HIDDEN and not c.endswith((SEED_STD, CI_LOW, CI_HIGH)):
            columns.append(c)
    return columns


def display_table(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as text cells under human-readable headers (what Markdown, LaTeX and HTML show)."""
    n = int(board["num_samples"].iloc[0]) if len(board) else 0
    columns = shown_columns(board)
    cells = {"method setting": board["setting"]}
    cells.update({_header(c, n): [_cell(row, c) for _, row in board.iterrows()] for c in columns})
    return pd.DataFrame(cells)


def to_markdown(board: pd.DataFrame) -> str:
    """The leaderboard as Markdown: one column per metric, headers with units, n and arrows."""
    table = display_table(board)
    lines = ["| " + " | ".join(table.columns) + " |", "|---|" + "---:|" * (len(table.columns) - 1)]
    lines += ["| " + " | ".join(map(markdown_text, row)) + " |" for row in table.astype(str).itertuples(index=False)]
    return "\n".join(lines) + "\n"


MARKDOWN_SPECIAL = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|"}


def markdown_text(text: str) -> str:
    """A name or setting shown as typed where Markdown renders it: raw HTML inert, '|' not a column break."""
    return "".join(MARKDOWN_SPECIAL.get(ch, ch) for ch in str(text))


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
LATEX_SYMBOLS = {"↓": r"$\downarrow$", "↑": r"$\uparrow$", "±": r"$\pm$", "★": r"$\star$"}


def latex_escape(text: str) -> str:
    """Text safe in a LaTeX table cell; arrows, ± and ★ as math symbols."""
    text = "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    for symbol, latex in LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


def to_latex(board: pd.DataFrame, caption: str = "", label: str = "tab:leaderboard") -> str:
    """The leaderboard as a booktabs table (needs \\usepackage{booktabs}), ready to paste into a paper."""
    table = display_table(board)
    align = "l" + "r" * (len(table.columns) - 1)
    lines = [r"\begin{table*}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.astype(str).itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    lines += [rf"\label{{{label}}}", r"\end{table*}"]
    return "\n".join(lines) + "\n"


def knob_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One column per setting of each row: its knobs (from the JSON `params`), solver and num_steps."""
    knobs = pd.DataFrame([knobs_of(row) for _, row in frame.iterrows()], index=frame.index)
    return knobs.assign(solver=frame["solver"], num_steps=frame["num_steps"])


def _plain(value):
    """A knob value as written: 2, not the 2.0 that a column shared with missing values turns it into."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def short_value(value):
    """A knob value for a legend: a path by its file stem, a number as written."""
    return Path(value).stem if isinstance(value, str) and "/" in value else _plain(value)


def short_setting(row: pd.Series) -> str:
    """A compact label of a row's setting for figures: knob values shortened, the checkpoint by its stem."""
    knobs = knobs_of(row)
    parts = [str(short_value(v)) if k == "checkpoint" else f"{k}={short_value(v)}" for k, v in knobs.items()
             if not k.startswith("map_")]
    return f"{row['method']} ({', '.join(parts + [f'{row.solver} {row.num_steps}'])})"


def curves(frame: pd.DataFrame):
    """(legend, point labels, rows) per curve: one curve per [[methods]] entry, points along its swept numeric
    knobs. A swept solver or a swept knob of names (an estimator, a loss form) makes a variant, not a point
    along the curve: each variant is a curve of its own, named in its legend."""
    knobs = knob_table(frame)
    keys = ["run", "entry", "solver"] if "run" in frame.columns else ["entry", "solver"]
    several = "run" in frame.columns and frame["run"].nunique() > 1
    for _, entry in frame.groupby(keys, sort=True):
        swept = [k for k in swept_of(entry.iloc[0]) if k != "solver"]
        variants = [k for k in swept if not is_numeric_knob(knobs.loc[entry.index, k])]
        along = [k for k in swept if k not in variants]
        for group in (g for _, g in entry.groupby([knobs.loc[entry.index, k] for k in variants], sort=False,
                                                   dropna=False)) if variants else [entry]:
            first = knobs.loc[group.index[0]]
            fixed = [f"{k}={short_value(v)}" for k, v in first.items()
                     if k not in along and k not in ("num_steps", "solver") and not k.startswith("map_") and pd.notna(v)]
            legend = f"{group['method'].iloc[0]} / {first['solver']}" + (f" ({', '.join(fixed)})" if fixed else "")
            legend += " [ceiling]" if is_ceiling(group.iloc[0]) else ""
            legend = f"[{group['run'].iloc[0]}] {legend}" if several else legend
            labels = knobs.loc[group.index, along].map(_plain).astype(str).agg("/".join, axis=1) if along \
                else pd.Series("", group.index)
            yield legend, labels, group


def is_numeric_knob(values: pd.Series) -> bool:
    """Whether a swept knob's values are numbers (points along a curve) rather than names or switches."""
    return all(isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)) for v in values.dropna())


MATCHED_TARGETS = (0.5, 0.6, 0.7, 0.8)


def cost_fraction(frame: pd.DataFrame, info: dict | None = None) -> pd.Series:
    """GFLOPs per image relative to the run's reference (`full` at the default solver and steps)."""
    reference = frame["reference_gflops"] if "reference_gflops" in frame.columns else reference_cost(frame, info)
    return frame["gflops_per_image"] / reference


def interpolate_at(x: np.ndarray, y: np.ndarray, targets) -> list[float]:
    """y at each target by linear interpolation along the curve; NaN outside the measured range of x."""
    order = np.argsort(x)
    x, y = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order]
    return [float(np.interp(t, x, y)) if len(x) > 1 and x[0] <= t <= x[-1] else
            (float(y[0]) if len(x) == 1 and np.isclose(x[0], t) else np.nan) for t in targets]


def matched_per_seed(group: pd.DataFrame, fid: str, axis: str, targets) -> pd.DataFrame:
    """(seeds x targets) FID of one curve interpolated along each seed's own sweep: an adaptive method's
    layer ratio moves a little from seed to seed, so seeds are matched before they are averaged."""
    seeds = group.groupby("seed") if "seed" in group.columns else [(0, group)]
    return pd.DataFrame({seed: interpolate_at(rows[axis], rows[fid], targets) for seed, rows in seeds},
                        index=list(targets)).T


def matched_summary(values: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Mean, std and seed interval of one target's per-seed values; NaN when any seed misses the target."""
    if np.isnan(values).any():
        return {"mean": np.nan, "std": np.nan, "low": np.nan, "high": np.nan}
    low, high = mean_bootstrap_interval(values, level)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else np.nan,
            "low": low, "high": high}


def matched_points(frame: pd.DataFrame, info: dict | None = None, targets=MATCHED_TARGETS) -> pd.DataFrame:
    """One row per curve, axis ("layer ratio" or "cost"), target and seed: the curve's FID interpolated along
    that seed's own sweep (NaN where it does not reach the target) beside the same seed's FID of its backbone
    group's `full` (`full_value`). Every method of a seed starts from the same noise, so paired comparisons
    between any two curves are a subtraction away in pandas."""
    fid = primary_column(frame.columns)
    columns = ["curve_index", "curve", "backbone", "axis", "target", "seed", "value", "full_value"]
    if fid is None:
        return pd.DataFrame(columns=columns)
    frame = frame[frame["valid"]].assign(cost_fraction=cost_fraction(frame[frame["valid"]], info))
    keys = group_keys(frame)
    several = "run" in frame.columns and frame["run"].nunique() > 1
    labels = {key: group_label(key, rows, several) for key, rows in frame.groupby(keys, sort=False)}
    references = reference_per_seed(frame, keys, fid)
    points = []
    for index, (legend, _, group) in enumerate(curves(frame)):
        key = keys[group.index[0]]
        for axis, name in (("layer_ratio", "layer ratio"), ("cost_fraction", "cost")):
            for target, values in matched_per_seed(group, fid, axis, targets).items():
                points += [(index, legend, labels[key], name, target, seed, value,
                            references.get(key, {}).get(seed, np.nan)) for seed, value in values.items()]
    return pd.DataFrame(points, columns=columns)


def matched_table(frame: pd.DataFrame, info: dict | None = None, targets=MATCHED_TARGETS,
                  level: float = 0.95) -> pd.DataFrame:
    """FID of every curve at matched layer ratios and matched cost fractions (interpolated along each seed's
    sweep, then mean, std and seed interval over seeds), with the backbone each curve ran on, and the paired
    interval of its per-seed difference to the group's `full` ("dlow", "dhigh")."""
    return summarise_points(matched_points(frame, info, targets), primary_column(frame.columns), level)


def summarise_points(points: pd.DataFrame, fid: str, level: float = 0.95) -> pd.DataFrame:
    """`matched_table` from `matched_points`: one row per curve, a mean, std, interval and paired interval per target
    (both intervals at `level`)."""
    rows = []
    for _, curve in points.groupby("curve_index", sort=True):
        row = {"curve": curve["curve"].iloc[0], "backbone": curve["backbone"].iloc[0]}
        for (name, target), at_target in curve.groupby(["axis", "target"], sort=False):
            column = f"{fid} at {name} {target:g}"
            summary = matched_summary(at_target["value"].to_numpy(float), level)
            row[column] = summary["mean"]
            for part in ("std", "low", "high"):
                row[f"{column} {part}"] = summary[part]
            row[f"{column} dlow"], row[f"{column} dhigh"] = paired_interval(
                dict(zip(at_target["seed"], at_target["value"])),
                dict(zip(at_target["seed"], at_target["full_value"])), level)
        rows.append(row)
    return pd.DataFrame(rows)


def reference_per_seed(frame: pd.DataFrame, keys: pd.Series, fid: str) -> dict[str, dict]:
    """Per backbone group, its `full` reference's FID per seed (the setting the leaderboard compares against)."""
    chosen = reference_of_groups(frame.assign(group=keys))
    same = [c for c in ("run", "method", "params", "solver", "num_steps") if c in frame.columns]
    texts = frame[same].astype(str)
    references = {}
    for key, label in chosen.groupby(keys, sort=False).first().items():
        if label in frame.index:
            rows = frame[(keys == key) & (texts == texts.loc[label]).all(axis=1)]
            references[key] = dict(zip(rows["seed"] if "seed" in rows.columns else [0], rows[fid].astype(float)))
    return references


def matched_markdown(matched: pd.DataFrame) -> pd.DataFrame:
    """The matched table for reading: each target's mean ± std (and [seed interval]) in one cell, ≈ where the
    paired interval of the difference to the group's `full` holds 0."""
    shown = matched[["curve", "backbone"]].copy()
    for column in [c for c in matched.columns if f"{c} std" in matched.columns]:
        unresolved = includes_zero(matched[[f"{column} dlow", f"{column} dhigh"]].to_numpy(float)) \
            if f"{column} dlow" in matched.columns else np.zeros(len(matched), dtype=bool)
        shown[column] = [matched_cell(*values) for values in zip(
            matched[column], matched[f"{column} std"], matched[f"{column} low"], matched[f"{column} high"],
            unresolved)]
    return shown


def matched_cell(mean: float, std: float, low: float, high: float, unresolved: bool = False) -> str:
    if np.isnan(mean):
        return ""
    mark = f" {UNRESOLVED}" if unresolved else ""
    return (f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f} [{low:.2f}, {high:.2f}]") + mark


def frame_to_markdown(frame: pd.DataFrame) -> str:
    """A plain Markdown table; numbers to 2 decimals, NaN left blank."""
    def cell(value) -> str:
        return "" if isinstance(value, float) and np.isnan(value) else (f"{value:.2f}" if isinstance(value, float) else str(value))
    lines = ["| " + " | ".join(frame.columns) + " |", "|---|" + "---:|" * (len(frame.columns) - 1)]
    lines += ["| " + " | ".join(markdown_text(cell(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ---- writing the table files ---------------------------------------------------------------------

def seeds_note(board: pd.DataFrame, seeds: int) -> str:
    """How the leaderboard's quality values combine several seeds (each metric's spec says mean or median)."""
    medians = sorted({parsed.quantity.label for parsed in map(parse_column, board.columns)
                      if parsed is not None and parsed.is_value and parsed.metric.seeds == "median"})
    how = "means" + (f" ({', '.join(medians)}: medians)" if medians else "")
    return f"Quality values are {how} over {seeds} seeds ± their standard deviation across seeds."


SPEEDUP_NOTE = ("Each row is timed against its own interleaved run of `full`, so time/image of two rows may "
                "disagree with their speed-ups when the machine's speed drifts between cells: speed-up = reference "
                "time/image / time/image, both from the same timed pass (per seed; means over seeds).")


INCEPTION_SPACE = "inception"  # metrics.extractors.INCEPTION, not imported here: that module loads torch
INCEPTION_FIX = ("pass --inception-weights PATH to `adadiff-bench run`, put torch-fidelity's Inception file in "
                 "$TORCH_HOME/hub/checkpoints, or set [metrics] inception = \"download\"; then rerun with --overwrite")


def inception_skipped(metrics: dict) -> str:
    """Why a run has no Inception metrics, and what brings them in."""
    if metrics.get("inception") == "off":
        return ('Inception metrics skipped: [metrics] inception = "off". Fix: set inception = "auto" (with the '
                'weights on disk) or "download", and rerun with --overwrite.')
    return f"Inception metrics skipped: no Inception weights were on disk when the run ran. Fix: {INCEPTION_FIX}."


NO_SPACE = ("No feature space read these images: the built-in digits-cnn reads only 1x8x8 grey images, and Inception "
            "was skipped (above). Fix: Inception, a feature space trained on your data (`adadiff-bench "
            "train-extractor --config RUN.toml`, then [metrics] extractor = the file it writes), or one registered by "
            "a plugin (ExtractorSpec in adadiff_bench/metrics/extractors.py).")


def skipped_metrics(board: pd.DataFrame, infos: dict[str, dict]) -> list[str]:
    """One line per quality metric or feature space a run left out (reason and fix), headed by what a report
    without any quality metric lacks; empty when nothing was skipped."""
    lines = []
    ranking = primary_column(board.columns)
    if ranking is None:
        lines.append("No FID was computed, so this report has no FID column, no Pareto marks and no FID-vs-cost "
                     "figures.")
    elif not parse_column(ranking).metric.primary:
        lines.append(f"No FID was computed: Pareto marks, d{ranking_label(ranking)}, the matched tables and the "
                     f"quality-vs-cost figures use {metric_label(ranking)} instead, a distance between the images' "
                     "pixel patches that no network trained on other data colours; its values are not comparable "
                     "with published FIDs.")
    for info in infos.values():
        metrics = info["config"].get("metrics", {})
        used = set(info.get("feature_extractors", []))
        if INCEPTION_SPACE not in used:
            lines.append(inception_skipped(metrics))
        if not used:
            lines.append(NO_SPACE)
        if metrics.get("prc") is False:
            lines.append("Precision/recall skipped: [metrics] prc = false. Fix: set prc = true and rerun with "
                         "--overwrite.")
    return list(dict.fromkeys(lines))  # merged runs skip alike: each line once


def skipped_note(board: pd.DataFrame, infos: dict[str, dict]) -> str:
    """The skipped-metrics lines as a Markdown block for the top of leaderboard.md ("" when none)."""
    lines = skipped_metrics(board, infos)
    return "\n>\n".join(f"> **{markdown_text(line)}**" for line in lines) + "\n" if lines else ""


def quality_note(ranking: str | None, metrics: dict) -> str:
    """What the quality column the board ranks by is, and what the Pareto marks compare."""
    if ranking is None:
        return "No FID (see the top of the report)."
    name = ranking_label(ranking)
    backend = f"; FID by {metrics.get('fid_backend', 'torch-fidelity')}" if parse_column(ranking).metric.primary else ""
    return (f"{name}'s n = samples per cell{backend}. ★ = Pareto-optimal in {name} and GFLOPs/image among the "
            "competitors of its backbone group (ceilings excluded).")


def leaderboard_notes(board: pd.DataFrame, infos: dict[str, dict]) -> str:
    """What the leaderboard's numbers are: data, n, seeds, intervals, timing and FLOPs conventions."""
    info = next(iter(infos.values()))
    metrics = info["config"].get("metrics", {})
    seeds = int(board["seeds"].max()) if len(board) else 0
    fid = quality_note(primary_column(board.columns), metrics)
    lines = [f"Data: {info['data']['name']} ({info['data']['num_images']} reference images); {fid}"]
    if len(infos) > 1:
        lines.append(f"Merged runs: {', '.join(infos)} (same data and n); speed-ups are each against its own run's "
                     "`full` reference.")
    if seeds > 1:
        lines.append(seeds_note(board, seeds))
    if metrics.get("fid_bootstrap"):
        lines.append(f"FID bootstrap CI of one-seed rows: basic bootstrap interval at level {metrics['fid_ci']} over "
                     f"{metrics['fid_bootstrap']} resamples of the generated samples (reference fixed). It estimates "
                     "the FID of unlimited samples, so where FID's small-n bias is as large as FID itself (FID near "
                     "0) it lies below the point estimate; differences between cells are read in "
                     "paired_samples.md, where that bias cancels.")
    lines += group_notes(board)
    if EXIT_WARNING in board.columns and (board[EXIT_WARNING] != "").any():
        lines.append("[never exits] / [always exits at block ...]: an adaptive exit setting that in at least one "
                     "seed's cell never left before full depth, or left at one and the same block for every sample "
                     "and step (`run` warned about it): its knob lies outside the range where the method adapts, so "
                     "the row says nothing about how well the method decides where to exit.")
    lines.append(f"Speed-up is the ratio of median times against `full` at {info['reference']['solver']} "
                 f"{info['reference']['num_steps']} steps, timed interleaved on {info['machine']['torch_threads']} "
                 f"threads ({info['machine'].get('device', 'cpu')}); FLOPs = 2 x MACs (fvcore); peak memory: "
                 "the process's peak resident set on the CPU, peak allocated on CUDA.")
    if "reference_time_per_image_s" in board.columns:
        lines.append(SPEEDUP_NOTE)
    shared = board.loc[board[OTHER_CORES] >= BUSY_ELSEWHERE, "setting"] if OTHER_CORES in board.columns else []
    if len(shared):
        lines.append(f"Timed while other processes kept at least {BUSY_ELSEWHERE} cores busy (`timing_other_cores`, "
                     f"in some seed's cell), so their times and speed-ups are suspect: {', '.join(shared)}.")
    return "\n" + "\n\n".join(lines) + "\n"


def group_notes(board: pd.DataFrame) -> list[str]:
    """What the backbone groups, dFID and the ≈ marks mean, and each group without a `full` row."""
    if "group" not in board.columns:
        return []
    ranking = primary_column(board.columns)
    name = ranking_label(ranking) if ranking else "FID"
    lines = ["Rows are grouped by backbone (`backbone`: checkpoint name and the first 8 hex digits of a hash of the "
             "backbone's weights alone; estimators, exit heads, routers, regressors and second models are not part "
             f"of it). Comparisons stay inside a group: d{name} = {name} minus the group's `full` {name}."]
    if (board["seeds"] > 1).any() and ranking and delta_column(ranking) in board.columns:
        lines.append(f"{name} bootstrap CI of rows with >= 2 seeds: percentile bootstrap of the mean over seeds at "
                     f"level 0.95 (with 3 seeds it spans the lowest to the highest seed's {name}). Every method of a "
                     "seed starts from the same noise, so a comparison is paired: the [interval] after a "
                     f"d{name} is the bootstrap interval of the mean of its per-seed differences to the group's "
                     f"`full` (with 3 seeds, the smallest to the largest difference). ≈ after a d{name}: that "
                     "interval holds 0, so the difference is not resolved; ★≈: the paired interval against some "
                     "cheaper row of the group does not lie below 0, so the row's place on the front is not "
                     "resolved. Rows without shared seeds fall back to whether their own intervals overlap. With 3 "
                     "seeds a resolved difference means every seed agrees on its sign: evidence, not proof (a "
                     "difference of zero does that 1 time in 4).")
    if ranking and paired_over_samples(board, ranking).any():
        lines.append(f"Rows of one seed whose cells kept their {name} bootstrap replicates (`fid_bootstrap`) are "
                     f"compared over samples: the [interval] after such a row's d{name} is the basic bootstrap "
                     f"interval of its {name} difference to the group's `full`, both cells resampled on the same "
                     "sample rows (their noise is shared, so what it does to both cancels, and so does FID's small-n "
                     f"bias). ≈ after a d{name}: that interval holds 0 (the difference is not resolved); ★≈: the "
                     "interval against some cheaper row of the same seed does not lie below 0. It covers the sampling "
                     "of these images at this seed, not what another seed would give.")
    unknown = [key for key in dict.fromkeys(board["group"]) if is_unknown(key)]
    if unknown:
        lines.append("Rows of a run that recorded no backbone hash (made before it was recorded) form one group per "
                     "run, which may hold several backbones: compare their rows with care.")
    for key, rows in board.groupby("group", sort=False):
        if not (rows["method"] == "full").any():
            lines.append(f"Backbone group {rows['backbone'].iloc[0]} has no `full` row: its d{name} is blank (n/a); "
                         "compare its rows only with each other, not with another group's `full`.")
    return lines


def paired_over_samples(board: pd.DataFrame, ranking: str) -> np.ndarray:
    """Rows of one seed whose difference to `full` has an interval: one paired over samples."""
    low = delta_column(ranking) + CI_LOW
    return (board["seeds"] == 1).to_numpy() & np.isfinite(board[low].to_numpy(float)) if low in board.columns \
        else np.zeros(len(board), dtype=bool)


def write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode())
    return path


def leaderboard_files(view: ReportView, out: Path, sort_by: str | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """leaderboard.md, .csv and .tex under `out`; returns (the board, the paths)."""
    fid = primary_column(view.frame.columns)
    replicates = {index: view.fid_replicates(row, fid) for index, row in view.frame.iterrows()} if fid else {}
    board = leaderboard(view.frame, sort_by, fid_replicates=replicates)
    title = f"Leaderboard: {', '.join(view.infos)}"
    notes = leaderboard_notes(board, view.infos)
    skipped = skipped_note(board, view.infos)
    paths = [write_text(out / "leaderboard.md", f"# {markdown_text(title)}\n\n" + (skipped and skipped + "\n")
                        + to_markdown(board) + markdown_text(notes)),
             write_text(out / "leaderboard.csv", board.to_csv(index=False)),
             write_text(out / "leaderboard.tex", to_latex(board, caption=title + ". " + " ".join(notes.split())))]
    return board, paths


def matched_files(frame: pd.DataFrame, out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """matched.md and .csv: FID of every curve at matched layer ratios and cost fractions; matched_per_seed.csv:
    the same, seed by seed, beside each seed's `full`."""
    ranking = primary_column(frame.columns)
    points = matched_points(frame)
    matched = summarise_points(points, ranking)
    if matched.empty:
        return matched, []
    header = (f"# {ranking_label(ranking)} at matched layer ratio and matched cost\n\n{ranking} with n = "
              f"{int(frame['num_samples'].iloc[0])} samples per cell, interpolated linearly along each curve's "
              "sweep (each seed's own, then mean ± std over seeds [bootstrap interval of the mean]); blank where the "
              "curve, at any seed, does not reach the target. Cost = GFLOPs/image over the reference `full`'s. "
              "≈: the paired bootstrap interval of the per-seed difference to the group's `full` holds 0 (every "
              "seed starts from the same noise, so a difference is read seed by seed; the interval's bounds are "
              "the CSV's `dlow` and `dhigh`).\n\n")
    return matched, [write_text(out / "matched.csv", matched.to_csv(index=False)),
                     write_text(out / "matched_per_seed.csv", points.drop(columns="curve_index").to_csv(index=False)),
                     write_text(out / "matched.md", header + frame_to_markdown(matched_markdown(matched)))]
