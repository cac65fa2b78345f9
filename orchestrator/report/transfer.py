"""Transfer evaluations in the report (orchestrator.report.collect.TransferEval: `streamssl eval`, a spec's
`eval.transfer`): a table per downstream set and score of each line's score after each chunk, the correlation of
upstream accuracy with each score, and a PNG per set and score.

    tables = transfer_tables(study)          # transfer.<set>.<score>, then transfer_correlation.<protocol>
    pngs = transfer_figures(study, out / "figures")   # [(path, plan run ids, what)]

"Transfer by chunk" (`transfer.<set>.<score>`): one row per line, one column per chunk, the score of the transfer
evaluation of that chunk run's checkpoint. A chunk no transfer evaluated is n/a (`eval.transfer` evaluates the
chunks it names, `[last]` by default; the record does not say which were asked for), one whose evaluation did not
finish is missing. A few-shot mean reads `mean ± ci95` with its `_ci95` score (which has no table of its own).
Several seeds: the mean over the seeds' plan runs with n and the 95% t-interval, as every other table.

Upstream vs downstream (`transfer_correlation.<protocol>`): per stream kind, set and score, the points are the
(line, chunk, seed) chunk runs with both numbers: the upstream accuracy is `<protocol>_top1` of the chunk's own
evaluation run (its accuracy on the pre-training data's eval split, the number the accuracy-by-chunk curves draw),
the downstream one the transfer score of the same chunk run. Pearson r and Spearman rho (Pearson r of the average
ranks, ties sharing theirs) for n >= 3, and Pearson r's 95% interval by the Fisher z transform,
tanh(atanh(r) -/+ z(0.975) / sqrt(n - 3)), for n >= 4.

When a set's evaluations carrying a score differ in their options (two label fractions giving the same score name
would not, a linear probe's epochs would), each option set is a table and a correlation row of its own, named by
the params that differ. Chunked streams only: an online line's transfer evaluations (of segment runs) are counted in
a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

from orchestrator.report.collect import Entry, Study, TransferEval
from orchestrator.report.model import Cell, ReportTable, Row
from orchestrator.report.seeds import over_seeds, seed_note
from orchestrator.report.transfer_runs import NOT_OPTIONS

Z_975 = NormalDist().inv_cdf(0.975)  # 1.959964...: the two-sided 95% normal quantile of the Fisher z interval
INDEX = ["method", "paradigm", "stream", "line", "strategy"]
# Params that never tell two option sets apart in a label: the seed (not an option at all) and where the set was read.
_NOT_OPTIONS = (*NOT_OPTIONS, "image_size", "data.url")


@dataclass(frozen=True)
class Score:
    """One transfer score as the tables show it: a set's score from evaluations with the same options."""

    data_set: str
    score: str  # without the set prefix: linear_top1, fewshot_5way5shot_mean
    task: str
    options: str  # the evaluations' transfer key
    variant: str = ""  # the params telling these options apart from the set's others with this score ("" if alone)
    init: str = "checkpoint"  # or random: the from-scratch baseline (`init=random`), which no upstream number belongs to

    @property
    def key(self) -> str:
        return f"{self.data_set}.{self.score}"

    @property
    def half_width(self) -> str | None:
        """The score logged as this one's ± (a few-shot mean's `_ci95`), None for other scores."""
        return self.score[: -len("_mean")] + "_ci95" if self.score.endswith("_mean") else None

    @property
    def name(self) -> str:
        return f"transfer.{self.key}" + (f".{self.options[:8]}" if self.variant else "")


def _chunked(study: Study) -> list[Entry]:
    return [e for e in study.entries if e.stream_kind != "online"]


def _reported(study: Study) -> list[TransferEval]:
    """The transfer evaluations of the chunk runs of the plan runs the report's lines come from."""
    plans = {part.plan.run_id for e in _chunked(study) for part in e.per_seed()}
    return [t for t in study.transfers if t.chunk is not None and t.plan_run in plans]


def _shown_beside(name: str, scores: dict[str, float]) -> bool:
    """Whether `name` is a half-width shown with its mean (`x_ci95` beside `x_mean`), not a score of its own."""
    return name.endswith("_ci95") and name[: -len("_ci95")] + "_mean" in scores


def scores_of(study: Study) -> list[Score]:
    """Every (set, score, options) of the reported transfer evaluations, by set, task and score."""
    found: dict[tuple[str, str, str], tuple[str, dict[str, str]]] = {}
    for t in _reported(study):
        for name in t.scores:
            if not _shown_beside(name, t.scores):
                found.setdefault((t.data_set, name, t.options), (t.task, t.params))
    out = []
    for (data_set, name, options), (task, params) in found.items():
        others = [p for (d, n, o), (_, p) in found.items() if (d, n) == (data_set, name) and o != options]
        variant = ""
        if others:
            differ = sorted(k for k in set(params) | {k for p in others for k in p}
                            if k not in _NOT_OPTIONS and any(p.get(k) != params.get(k) for p in others))
            variant = ", ".join(f"{k}={params.get(k, '-')}" for k in differ) or f"options {options[:8]}"
        out.append(Score(data_set, name, task, options, variant, params.get("init", "checkpoint")))
    return sorted(out, key=lambda s: (s.data_set, s.task, s.score, s.variant))


def _by_chunk_run(study: Study) -> dict[tuple[str, str, str], TransferEval]:
    """(evaluated chunk run, set, options) -> its transfer evaluation."""
    return {(t.evaluates, t.data_set, t.options): t for t in _reported(study)}


def _transfer_cell(entry: Entry, chunk: int, score: Score, found: dict) -> Cell:
    plan, source = entry.plan, score.key
    if chunk >= plan.num_chunks:
        return Cell(na=f"the plan has {plan.num_chunks} chunks")
    chunk_run = plan.slot(entry.line.id, chunk).chunk_run
    if chunk_run is None:
        return Cell(source=source, na="no chunk run")
    done = found.get((chunk_run.info.run_id, score.data_set, score.options))
    if done is None:  # (no runs named: a row's sources are the transfer evaluations its numbers come from)
        return Cell(source=source, na=f"chunk run {chunk_run.info.run_id} not evaluated ({score.task} on "
                    f"{score.data_set})")
    runs = (done.run_id,)
    if done.status != "FINISHED":
        return Cell(runs=runs, source=source, missing=f"transfer eval run {done.status}")
    cell = Cell.of(done.scores.get(score.score), runs, source, "not logged")
    half = done.scores.get(score.half_width) if score.half_width else None
    if cell.present and half is not None:
        return replace(cell, half_width=half, source=f"{source} ± {score.data_set}.{score.half_width}")
    return cell


def _has(entry: Entry, score: Score, found: dict) -> bool:
    """Whether some seed's chunk run of the line has a transfer evaluation logging `score`."""
    return any(t.data_set == score.data_set and t.options == score.options and score.score in t.scores
               and t.plan_run == part.plan.run_id and t.line == entry.line.id
               for part in entry.per_seed() for t in found.values())


def transfer_by_chunk_table(study: Study, score: Score) -> ReportTable:
    found = _by_chunk_run(study)
    entries = [e for e in _chunked(study) if _has(e, score, found)]
    T = max((part.plan.num_chunks for e in entries for part in e.per_seed()), default=0)
    what = f"{score.task} on downstream set {score.data_set}" + (f", {score.variant}" if score.variant else "")
    table = ReportTable(score.name, f"Transfer by chunk: {score.key} ({what}) of each chunk run's checkpoint "
                        "(transfer eval runs)", list(INDEX), [f"chunk {c}" for c in range(T)])
    if score.half_width:
        table.notes.append(f"{score.key} reads mean ± {score.data_set}.{score.half_width} (the 95% interval over "
                           "its episodes); a cell over several seeds shows the seeds' interval instead")
    for entry in entries:
        index = {"method": entry.line.method, "paradigm": entry.line.paradigm, "stream": entry.stream_kind,
                 "line": entry.line.id, "strategy": entry.line.label}
        table.rows.append(Row(index, over_seeds(entry, lambda e: {
            f"chunk {c}": _transfer_cell(e, c, score, found) for c in range(T)})))
    return seed_note(table)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r, None when either variable is constant (or there are under two points)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)))


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    return pearson(average_ranks(xs), average_ranks(ys))


def fisher_interval(r: float, n: int) -> tuple[float, float]:
    """Pearson r's 95% interval: tanh(atanh(r) -/+ z(0.975) / sqrt(n - 3)); needs n >= 4 (r = +/-1: itself)."""
    if n < 4:
        raise ValueError(f"the Fisher z interval needs n >= 4 points, got {n}")
    if abs(r) >= 1.0:
        return r, r
    z, half = math.atanh(r), Z_975 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def _points(entries: list[Entry], score: Score, name: str, found: dict) -> list[tuple[float, float, tuple[str, ...]]]:
    """(upstream, downstream, (eval run, transfer eval run)) of every (line, chunk, seed) with both numbers."""
    points = []
    for part in (p for e in entries for p in e.per_seed()):
        for chunk in range(part.plan.num_chunks):
            slot = part.plan.slot(part.line.id, chunk)
            if slot.chunk_run is None or slot.eval_run is None or slot.eval_run.info.status != "FINISHED":
                continue
            done = found.get((slot.chunk_run.info.run_id, score.data_set, score.options))
            upstream = slot.eval_run.data.metrics.get(f"{name}_top1")
            if done is None or done.status != "FINISHED" or upstream is None:
                continue
            downstream = done.scores.get(score.score)
            if downstream is not None and math.isfinite(upstream) and math.isfinite(downstream):
                points.append((float(upstream), float(downstream), (slot.eval_run.info.run_id, done.run_id)))
    return points


CORRELATION_COLUMNS = ["n", "pearson_r", "pearson_r_lo", "pearson_r_hi", "spearman_rho"]


def correlation_table(study: Study, name: str, scores: list[Score]) -> ReportTable:
    """Per stream kind and score: Pearson r (with its Fisher-z 95% interval) and Spearman rho of the chunk runs'
    upstream `{name}_top1` against the score."""
    found = _by_chunk_run(study)
    variants = any(s.variant for s in scores)
    table = ReportTable(f"transfer_correlation.{name}", f"Upstream vs downstream: {name} top-1 on the pre-training "
                        f"data's eval split (each chunk's eval run, {name}_top1) against each transfer score of the "
                        "same chunk run, over the (line, chunk, seed) points; Pearson r with its 95% interval "
                        "(Fisher z), Spearman rho (random-init baselines left out)", ["stream", "set", "score", *(["options"] if variants else [])],
                        list(CORRELATION_COLUMNS))
    for kind in dict.fromkeys(e.stream_kind for e in _chunked(study)):
        entries = [e for e in _chunked(study) if e.stream_kind == kind and name in e.plan.protocols]
        for score in scores:
            if score.init != "checkpoint" or not any(_has(e, score, found) for e in entries):
                continue  # a random-init baseline's score is not the chunk's weights': nothing to correlate
            points = _points(entries, score, name, found)
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            runs = tuple(r for p in points for r in p[2])
            n, source = len(points), f"{name}_top1 ~ {score.key}"
            cells = {"n": Cell(float(n), runs, source)}
            r = pearson(xs, ys) if n >= 3 else None
            rho = spearman(xs, ys) if n >= 3 else None
            why = "n < 3" if n < 3 else "constant scores: undefined"
            cells["pearson_r"] = Cell(r, runs, source) if r is not None else Cell(runs=runs, source=source, na=why,
                                                                                  shown=why)
            if r is not None and n >= 4:
                lo, hi = fisher_interval(r, n)
                cells["pearson_r_lo"], cells["pearson_r_hi"] = Cell(lo, runs, source), Cell(hi, runs, source)
            else:
                text = "n < 4" if n < 4 else why
                cells["pearson_r_lo"] = cells["pearson_r_hi"] = Cell(runs=runs, source=source, na=text, shown=text)
            cells["spearman_rho"] = Cell(rho, runs, source) if rho is not None else Cell(
                runs=runs, source=source, na=why, shown=why)
            index = {"stream": kind, "set": score.data_set, "score": score.score}
            if variants:
                index["options"] = score.variant
            table.rows.append(Row(index, cells))
    return table


def transfer_tables(study: Study) -> list[ReportTable]:
    """A by-chunk table per (set, score, options), then a correlation table per protocol; none without transfers."""
    scores = scores_of(study)
    if not scores:
        return []
    names = list(dict.fromkeys(n for e in _chunked(study) for part in e.per_seed() for n in part.plan.protocols))
    tables = [transfer_by_chunk_table(study, s) for s in scores] + [correlation_table(study, n, scores) for n in names]
    online = [t.run_id for t in study.transfers if t.segment is not None]
    if online:
        tables[0].notes.append(f"{len(online)} transfer evaluation(s) of online segment runs are not in these tables "
                               "(they are by chunk)")
    return tables


def transfer_figures(study: Study, folder: Path) -> list[tuple[Path, list[str], str]]:
    """One PNG per stream kind and by-chunk table: the score after each chunk, a curve per line (seeds: their
    mean), under `folder/<stream kind>/transfer.<set>.<score>.png`, for the plan runs of its lines."""
    from evaluators.report import plot_metric_curves

    out = []
    for score in scores_of(study):
        table = transfer_by_chunk_table(study, score)
        for kind in dict.fromkeys(row.index["stream"] for row in table.rows):
            rows = [row for row in table.rows if row.index["stream"] == kind]
            series = {row.index["line"]: [row.cells[c].value if row.cells[c].present else math.nan
                                          for c in table.value_columns] for row in rows}
            variant = f", {score.variant}" if score.variant else ""
            png = plot_metric_curves(series, folder / kind / f"{table.name}.png", ylabel=score.key,
                                     title=f"{score.key} after each chunk ({kind}{variant})")
            plans = list(dict.fromkeys(study.entry(kind, row.index["line"]).plan.run_id for row in rows))
            out.append((png, plans, f"{score.key} by chunk, stream {kind} ({score.task} transfer eval runs{variant})"))
    return out


__all__ = ["Score", "average_ranks", "correlation_table", "fisher_interval", "pearson", "scores_of", "spearman",
           "transfer_by_chunk_table", "transfer_figures", "transfer_tables"]
