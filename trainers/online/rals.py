"""Reducible Anchor Loss Selection (RALS): train on the candidates whose loss rose most since the batch began.

At the start of each stream batch's local iteration the model is frozen as the *anchor*. At every step the
candidates are the stream batch followed by a memory batch (e.g. 128 + 256 rows); both the current model and the
anchor score every candidate without gradients, on the same augmented views, and the `k` candidates with the
largest increase (current - anchor) are trained on: what the current model has forgotten, or is getting worse
at, while it fits the new batch.

Usage::

    rals = RALS(k=256)                                   # part_size=16 for the part-wise methods (Barlow Twins)
    log = SelectionLog()
    for stream_batch in stream:
        rals.reset_anchor(method)                         # the anchor: the weights at the batch's start
        fractions = []
        for _ in range(steps_per_batch):
            batch = stream_batch.cat(memory.sample(256))  # the stream rows first
            views = make_view_set(batch.images, plan, generator)
            sel = rals.select(method, views, batch, ctx, new_rows=len(stream_batch))
            train_step(model, method, optimizer, views.map(lambda v: v[sel.rows]), batch.select(sel.rows), ctx)
            fractions.append(sel.new_fraction)            # and sel.seconds: RALS's cost of the step
        log.add_batch(fractions)                           # log.last, .running_mean, .profile (selection.py)

Selection units (`candidate_scores`, a registry keyed by `Method.name`):

- ``simclr``: one unit per image, its score l_ij + l_ji (the NT-Xent terms of its two views, the candidate batch
  the negatives; with more views, the mean of that sum over view pairs);
- ``barlow_twins``: the loss is a statistic of the batch, so a single image has none of its own. The candidates
  are permuted (a fresh permutation from `generator` at each `select`, shared by both models, so parts mix stream
  and memory rows) and cut into consecutive parts of `part_size` rows; a part's score is the Barlow Twins loss of
  that part alone, and whole parts are selected (`k // part_size` of them). Rows past the last whole part are not
  candidates at that step (the permutation changes which);
- any other method: one unit per image, its `StepOutput.per_sample`.

Side effects of scoring: the passes run in the model's own mode (train-mode BN normalises with the batch's
statistics, as in training, and the anchor is put in the same mode), so they would move BN running statistics;
`frozen_bn_stats` restores them on both models. The per_sample fallback calls `training_step`, which may also
update loss buffers (MoCo's queue, DINO's centre), so there every buffer is restored (`frozen_buffers`). Python
attributes a step may change are not covered (none of the registered methods keeps any).

Ties: at the first step of every stream batch the current model *is* the anchor, so every increase is exactly 0
and the ranking says nothing. Ties are broken uniformly at random (the RALS generator), so that step trains on a
uniform sample of the candidates (new share = stream rows / candidates on average), not on the lowest indices
(the stream rows, which a stable sort would pick).

DDP: pass the bare method (a DDP wrapper is unwrapped); all ranks call `select` together with equal candidate
counts, and `k` is the count over all ranks (it must divide by the world size: each rank trains on `k / world`
rows, the shapes the cross-rank gathers of the training step need). Per-image methods: each rank scores its own
candidates and picks its own top `k / world` (SimCLR's scoring loss still gathers every rank's projections as
negatives, as in training). Part-wise methods (Barlow Twins) choose *globally*: a part is `part_size // world`
rows (at least 1) of every rank's candidates, so it has `world * (part_size // world)` rows (`part_size` where
it divides); the parts' losses are computed over the gathered projections (identical on every rank), the top
`k // part rows` parts are chosen across ranks (rank 0's choice is broadcast), and every rank trains on its own
rows of the chosen parts: the same count on every rank. `new_fraction` is averaged over the ranks.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainers.engine.distributed import all_reduce_mean, gather, world
from trainers.engine.types import Batch, StepContext, ViewSet
from trainers.methods.barlow_twins import BN_EPS
from trainers.methods.simclr import nt_xent_loss
from trainers.online.selection import SelectionLog

DEFAULT_PART_SIZE = 16


# ---------------------------------------------------------------------------------------------- the top-k rule
def select_top_increase(current: Tensor, anchor: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices (ascending) of the `k` entries with the largest `current - anchor`; equal increases are broken
    uniformly at random (`generator`, else torch's global RNG), so when every increase ties (the first step of a
    batch, model == anchor) the choice is a uniform sample of `k` entries. NaN ranks last."""
    if current.dim() != 1 or current.shape != anchor.shape:
        raise ValueError(f"current and anchor must both be [n] with equal shapes, got {tuple(current.shape)} and "
                         f"{tuple(anchor.shape)}")
    n = current.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}], got {k!r}")
    increase = (current.float() - anchor.float()).nan_to_num(nan=-torch.inf)  # NaN ranks last
    # A stable descending sort of a random permutation: equal increases keep the permutation's (uniform) order.
    shuffle = torch.randperm(n, generator=generator).to(increase.device)
    order = torch.sort(increase[shuffle], descending=True, stable=True).indices
    return shuffle[order[:k]].sort().values


# ---------------------------------------------------------------------------------------------- scores
@dataclass
class Scores:
    """Per-unit scores of the candidates: `values` `[U]`, `rows` `[U, R]` the candidate rows of each unit."""

    values: Tensor
    rows: Tensor


Scorer = Callable[[nn.Module, ViewSet, Batch, StepContext, Tensor], Tensor]
# name -> (scorer, scores whole parts); a scorer maps (method, views, batch, ctx, rows [U, R]) to values [U].
SCORERS: dict[str, tuple[Scorer, bool]] = {}


def register_scorer(name: str, parts: bool = False) -> Callable[[Scorer], Scorer]:
    """Decorator: `fn` scores the candidates of methods called `name` (in parts of rows when `parts`)."""
    def add(fn: Scorer) -> Scorer:
        SCORERS[name] = (fn, parts)
        return fn
    return add


def part_rows(n: int, part_size: int, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> Tensor:
    """`[n // part_size, part_size]` candidate rows: consecutive rows of a random permutation (`generator`)."""
    if isinstance(part_size, bool) or not isinstance(part_size, int) or not 2 <= part_size <= n:
        raise ValueError(f"part_size must be an int in [2, {n}] (a part needs a variance), got {part_size!r}")
    return _cut(n, part_size, generator, device)


def _cut(n: int, rows: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    perm = torch.randperm(n, generator=generator).to(device)
    units = n // rows
    return perm[: units * rows].view(units, rows)


def rank_part_rows(part_size: int, world_size: int) -> int:
    """Rows each rank gives to a part under DDP: `part_size // world_size`, at least 1 (see the module docstring)."""
    return max(1, part_size // world_size)


def join_parts(local: Sequence[Tensor], n: int) -> Tensor:
    """Global parts from every rank's local parts: `local[r]` is rank r's `[U, s]` rows into its `n` candidates;
    part u of the result, `[U, W * s]`, is every rank's part u, rank r's rows offset by `r * n` (their place in
    the candidates gathered over the ranks, rank-major)."""
    if len({tuple(t.shape) for t in local}) != 1:
        raise ValueError(f"every rank needs the same parts, got shapes {[tuple(t.shape) for t in local]}")
    return torch.cat([t + r * n for r, t in enumerate(local)], dim=1)


def global_part_rows(n: int, part_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(this rank's `[U, s]` rows, the global `[U, W * s]` parts into the gathered candidates). A collective
    under DDP (every rank calls it with the same `n`); on one process both are `part_rows(n, part_size)`."""
    _, size = world()
    if size == 1:
        rows = part_rows(n, part_size, generator, device)
        return rows, rows
    s = rank_part_rows(part_size, size)
    if s > n:
        raise ValueError(f"a part needs {s} rows of each rank's {n} candidates")
    mine = _cut(n, s, generator, device)
    everyone = gather(mine).view(size, *mine.shape)
    return mine, join_parts(list(everyone), n)


def candidate_scores(method: nn.Module, views: ViewSet, batch: Batch, ctx: StepContext,
                     part_size: int | None = None, generator: torch.Generator | None = None,
                     rows: Tensor | None = None) -> Scores:
    """The selection units of `method` over the candidates and their scores, without gradients.

    `rows` fixes the units (`[U, R]`; RALS passes the same to both models); else part-wise methods get
    `global_part_rows(n, part_size or 16, generator)` and the others one unit per row. A part-wise method's rows
    index the candidates gathered over the ranks (its scorer gathers the projections; on one process they are the
    candidates); the others' index this rank's. BN running statistics (and, for the per_sample fallback, every
    buffer) are restored afterwards.
    """
    method = getattr(method, "module", method)  # DDP's wrapper: score with the bare method (no DDP forward)
    n = views.global_[0].shape[0]
    scorer, parted = SCORERS.get(getattr(method, "name", ""), (None, False))
    device = views.global_[0].device
    if rows is None:
        rows = (global_part_rows(n, part_size or DEFAULT_PART_SIZE, generator, device)[1] if parted
                else torch.arange(n, device=device).unsqueeze(1))
    with torch.no_grad():
        if scorer is None:
            with frozen_buffers(method):
                per_sample = method.training_step(views, batch, ctx).per_sample
            values = per_sample.float()[rows].mean(dim=1)
        else:
            with frozen_bn_stats(method):
                values = scorer(method, views, batch, ctx, rows).float()
    if values.shape != (rows.shape[0],):
        raise ValueError(f"{type(method).__name__} scores: expected [{rows.shape[0]}] values, got "
                         f"{tuple(values.shape)}")
    return Scores(values, rows)


def _projections(method: nn.Module, views: ViewSet) -> list[Tensor]:
    # One encoder pass per view, as the methods' training_step (BN statistics per view).
    return [method.projector(method.backbone(v)) for v in views.all]


@register_scorer("simclr")
def simclr_scores(method: nn.Module, views: ViewSet, batch: Batch, ctx: StepContext, rows: Tensor) -> Tensor:
    """l_ij + l_ji per candidate (mean over view pairs), all candidates the negatives."""
    z = _projections(method, views)
    # nt_xent_loss("none") is (l_ij + l_ji) / 2; doubling it is exact in floating point.
    pairs = [2 * nt_xent_loss(z[a], z[b], method.temperature, "none") for a, b in combinations(range(len(z)), 2)]
    per_sample = torch.stack(pairs).mean(dim=0)
    return per_sample[rows].mean(dim=1)


@register_scorer("barlow_twins", parts=True)
def barlow_twins_scores(method: nn.Module, views: ViewSet, batch: Batch, ctx: StepContext,
                        rows: Tensor) -> Tensor:
    """Each part's own Barlow Twins loss (mean over view pairs), with the method's lambd and scale_loss. `rows`
    index the projections gathered over the ranks (every rank computes the same scores)."""
    cfg = method.config
    z = [gather(p.float()) for p in _projections(method, views)]  # (float32: what the part losses compute in)
    pairs = [barlow_part_losses(z[a], z[b], rows, cfg.lambd, cfg.scale_loss)
             for a, b in combinations(range(len(z)), 2)]
    return torch.stack(pairs).mean(dim=0)


def barlow_part_losses(z1: Tensor, z2: Tensor, rows: Tensor, lambd: float, scale: float = 1.0) -> Tensor:
    """`[U]`: the Barlow Twins loss of each part `z[rows[u]]` alone (its own standardisation and C), locally.

    Equal to `barlow_twins_loss(z1[rows[u]], z2[rows[u]], lambd, scale=scale)` on one process, without the
    `[U, D, D]` cross-correlations: with A, B the standardised `[R, D]` part, sum_ij C_ij^2 = ||A^T B||^2 / R^2
    = sum(AA^T * BB^T) / R^2 (two R x R Gram matrices) and C_ii = sum_n A_ni B_ni / R.
    """
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        a, b = (_standardise_parts(z.to(dtype)[rows]) for z in (z1, z2))  # [U, R, D]
        r = rows.shape[1]
        diag = (a * b).sum(dim=1) / r  # [U, D]
        total = ((a @ a.transpose(1, 2)) * (b @ b.transpose(1, 2))).sum(dim=(1, 2)) / r ** 2
        on_diag = (1 - diag).pow(2).sum(dim=1)
        off_diag = total - diag.pow(2).sum(dim=1)
        return scale * (on_diag + lambd * off_diag)


def _standardise_parts(z: Tensor) -> Tensor:
    # As barlow_twins' _standardise, along each part's rows (biased variance + BN_EPS).
    return (z - z.mean(dim=1, keepdim=True)) / torch.sqrt(z.var(dim=1, unbiased=False, keepdim=True) + BN_EPS)


# ---------------------------------------------------------------------------------------------- buffers
def _bn_stats(module: nn.Module) -> list[Tensor]:
    stats = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            stats += [t for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
    return stats


@contextmanager
def _restored(tensors: list[Tensor]) -> Iterator[None]:
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """BN running_mean, running_var and num_batches_tracked of `module` are as before when the block exits."""
    with _restored(_bn_stats(module)):
        yield


@contextmanager
def frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Every buffer of `module` (BN statistics, loss queues, centres) is as before when the block exits."""
    with _restored(list(module.buffers())):
        yield


# ---------------------------------------------------------------------------------------------- the selector
@dataclass
class Selection:
    """The rows to train on (indices into this rank's candidate batch, ascending), the share of them from the
    stream batch (over all ranks), RALS's wall seconds for the step (both scorings and the top-k), and the scores
    (for logs and tests; a part-wise method's `rows` there index the candidates gathered over the ranks)."""

    rows: Tensor
    new_fraction: float
    seconds: float
    current: Scores | None = None
    anchor: Scores | None = None


class RALS:
    """Anchor-based selection: `reset_anchor` at each stream batch's start, `select` at each of its steps.

    Args:
        k: rows to train on per step over all ranks (256); part-wise methods get `k // part rows` whole parts.
        part_size: rows per part for part-wise methods (Barlow Twins), 16.
        generator: draws each step's part permutation and breaks ties (None: the global RNG).
    """

    def __init__(self, k: int = 256, part_size: int = DEFAULT_PART_SIZE,
                 generator: torch.Generator | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if isinstance(part_size, bool) or not isinstance(part_size, int) or part_size < 2:
            raise ValueError(f"part_size must be an int >= 2, got {part_size!r}")
        self.k, self.part_size, self.generator = k, part_size, generator
        self.anchor: nn.Module | None = None

    @torch.no_grad()
    def reset_anchor(self, method: nn.Module) -> None:
        """The anchor becomes a copy of `method`'s parameters and buffers (allocated once, then copied into)."""
        method = getattr(method, "module", method)
        if self.anchor is None:
            self.anchor = copy.deepcopy(method).requires_grad_(False)
            return
        for kind in ("parameters", "buffers"):
            mine, theirs = _named(self.anchor, kind), _named(method, kind)
            if mine.keys() != theirs.keys():
                raise ValueError(f"reset_anchor: the method's {kind} differ from the anchor's (another method?)")
            for name, t in mine.items():
                t.copy_(theirs[name])

    def rows_per_rank(self, world_size: int) -> int:
        """Rows each rank trains on per step for a per-image method: `k / world_size` (must divide evenly)."""
        if self.k % world_size:
            raise ValueError(f"RALS k ({self.k}) must be divisible by the world size ({world_size}): every rank "
                             f"trains on the same number of rows (online.rals_k)")
        return self.k // world_size

    def select(self, method: nn.Module, views: ViewSet, batch: Batch, ctx: StepContext,
               new_rows: int) -> Selection:
        """Score the candidates under the current model and the anchor; the top-k units by increase.

        The first `new_rows` candidates are the stream batch's; `new_fraction` is the share of selected rows
        among them (over all ranks). Train on `views.map(lambda v: v[rows])`: the scored views themselves. Under
        DDP a collective: every rank calls it with the same number of candidates.
        """
        if self.anchor is None:
            raise RuntimeError("RALS.select before reset_anchor: call reset_anchor(method) at the stream batch's start")
        method = getattr(method, "module", method)
        n = views.global_[0].shape[0]
        if not 0 <= new_rows <= n:
            raise ValueError(f"new_rows must be in [0, {n}], got {new_rows!r}")
        _, size = world()
        start = time.perf_counter()
        self.anchor.train(method.training)  # the same BN behaviour as the current model
        device = views.global_[0].device
        parted = SCORERS.get(getattr(method, "name", ""), (None, False))[1]
        if parted:
            # One permutation for both models: the increase compares the same parts.
            local, rows = global_part_rows(n, self.part_size, self.generator, device)
        else:
            local = rows = torch.arange(n, device=device).unsqueeze(1)
        current = candidate_scores(method, views, batch, ctx, rows=rows)
        anchor = candidate_scores(self.anchor, views, batch, ctx, rows=rows)
        if parted:  # whole parts, chosen over all ranks
            units = min(max(1, self.k // rows.shape[1]), rows.shape[0])
            chosen = select_top_increase(current.values, anchor.values, units, self.generator).to(device)
            if size > 1:  # every rank computed the same scores; rank 0's tie-break is everyone's
                dist.broadcast(chosen, src=0)
        else:
            units = min(self.rows_per_rank(size), n)
            chosen = select_top_increase(current.values, anchor.values, units, self.generator).to(device)
        selected = local[chosen].flatten().sort().values
        fraction = (selected < new_rows).float().mean().reshape(1)
        new_fraction = float(all_reduce_mean(fraction))  # .item() syncs the device before timing
        return Selection(selected, new_fraction, time.perf_counter() - start, current, anchor)


def _named(module: nn.Module, kind: str) -> dict[str, Tensor]:
    return dict(module.named_parameters() if kind == "parameters" else module.named_buffers())


__all__ = ["DEFAULT_PART_SIZE", "RALS", "SCORERS", "Scores", "Selection", "SelectionLog", "barlow_part_losses",
           "barlow_twins_scores", "candidate_scores", "frozen_bn_stats", "frozen_buffers", "global_part_rows",
           "join_parts", "part_rows", "rank_part_rows", "register_scorer", "select_top_increase", "simclr_scores"]
