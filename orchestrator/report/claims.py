"""The studies' claims, one record each (orchestrator.report.findings checks them against an experiment's runs).

Adding a claim is one `Claim(...)` here (its arms, measure, effect and test) and its test. The effect is signed so
that positive is what the paper claims; the measures and arms use the report's metric keys and line ids:
`{line}.{name}.st_jt_gap` and `{line}.{name}.bwt` on plan runs, `sharpness_eps{e}` and `{name}_top1` on the last
chunk's eval run, a transfer score of the last chunk's checkpoint (`eval.transfer`), `train_seconds` / `stored_bytes` / `steps` on chunk runs, `{line}.{name}_top1` on an online plan
run. Variants of one line (RALS on or off, a view recipe, a backbone) are told apart by the spec params their plan
runs log (`online.rals`, `views.global.scale`, `backbone.name`).

`paper` is the paper's own finding, for reference: its direction as the paper states it; exact figures are quoted
only where they were at hand (the paper's tables are the reference).
"""

from __future__ import annotations

from orchestrator.report.findings import Arm, Claim, Guard
from orchestrator.report.measures import (
    STEPS,
    chunk_total,
    final_accuracy,
    final_gap,
    last_chunk_transfer,
    last_eval_metric,
    plan_metric,
)

PROTOCOL = "linear"  # the probe the papers report; kNN is logged beside it
SSL, SL, BYOL = "moco_v2", "supervised", "byol"
STREAMS = ("instance", "random_class", "distant_class")
STREAMING = "streaming (Hu et al. 2022)"
ONLINE = "online (Mokhtarzadeh Azar & Timofte)"
VIEWS = "low-compute views (Tan et al. 2023)"

# How close BYOL's gap must be to MoCo-v2's (top-1, absolute) for "behaves like": a 95% interval of the difference
# inside +/- this margin. Chosen as twice the standard error of one accuracy on Imagenette's 3,925 val images.
EQUIVALENCE_MARGIN = 0.02
# SLCLRS+RALS >= SLCLRS: RALS may cost at most this much top-1 and still count as "at least as good".
NONINFERIOR_MARGIN = 0.01
# Sharpness is compared at comparable base accuracy: SSL and SL's linear top-1 of the same eval runs within this.
BASE_ACCURACY_TOLERANCE = 0.05
# Online and offline (or CaSSLe) at "the same number of steps": within 10% of each other.
STEPS_TOLERANCE = 0.10


def _gap_claims() -> list[Claim]:
    out = []
    for stream in STREAMS:
        ssl, sl = Arm("SSL ST", stream, SSL), Arm("SL ST", stream, SL)
        out.append(Claim(f"streaming.gap.{stream}", STREAMING,
                         f"On the {stream} stream the ST-JT gap of SSL (MoCo-v2) is much smaller than SL's.",
                         final_gap(PROTOCOL), ((1.0, sl), (-1.0, ssl)), "SL gap - SSL gap",
                         paper="SSL's ST-JT gap is small on every stream kind, SL's much larger (Hu et al.: MoCo-v2 "
                               "ST close to JT except on the distant-class stream)"))
    for stream in STREAMS:
        ssl, sl = Arm("SSL ST", stream, SSL), Arm("SL ST", stream, SL)
        out.append(Claim(f"streaming.bwt.{stream}", STREAMING,
                         f"On the {stream} stream SSL's backward transfer (BWT) is higher than SL's (SSL forgets less).",
                         plan_metric(f"{{line}}.{PROTOCOL}.bwt", f"BWT, {PROTOCOL} top-1"), ((1.0, ssl), (-1.0, sl)),
                         "SSL BWT - SL BWT", paper="SSL forgets less than SL under sequential training (Hu et al.)"))
    st = Arm("SSL ST", "distant_class", SSL)
    for strategy, label in (("sequential+replay", "replay"), ("sequential+mas", "MAS"),
                            ("sequential+replay+mas", "MAS+")):
        aided = Arm(f"SSL ST+{label}", "distant_class", SSL, strategy)
        out.append(Claim(f"streaming.aid.{label.lower().replace('+', '_plus')}", STREAMING,
                         f"On the distant-class stream {label} shrinks SSL's ST-JT gap.",
                         final_gap(PROTOCOL), ((1.0, st), (-1.0, aided)), f"ST gap - ST+{label} gap",
                         paper="replay and MAS (and both: MAS+) narrow the distant-class gap (Hu et al.)"))
    return out


def _sharpness_claims() -> list[Claim]:
    ssl, sl = Arm("SSL ST", "distant_class", SSL), Arm("SL ST", "distant_class", SL)
    base = Guard("comparable base accuracy", final_accuracy(PROTOCOL), (ssl, sl), BASE_ACCURACY_TOLERANCE)
    return [Claim(f"streaming.sharpness.eps{eps:g}", STREAMING,
                  f"SSL's minimum is flatter than SL's (sharpness at eps {eps:g}, at comparable base accuracy).",
                  last_eval_metric(f"sharpness_eps{eps:g}", f"sharpness at eps {eps:g} (last chunk)"),
                  ((1.0, sl), (-1.0, ssl)), "SL sharpness - SSL sharpness", guard=base,
                  paper="SSL models sit in wider minima than SL ones of similar accuracy (Hu et al.: "
                        "lower sharpness for MoCo-v2 than SL at both eps)")
            for eps in (0.1, 0.3)]


def _resource_claims() -> list[Claim]:
    st, jt = Arm("SSL ST", "distant_class", SSL), Arm("SSL JT", "distant_class", SSL, "joint")
    return [Claim("streaming.cost.time", STREAMING, "ST trains in less time than JT over the whole stream.",
                  chunk_total("train_seconds", "train seconds, all chunks"), ((1.0, jt), (-1.0, st)),
                  "JT seconds - ST seconds", paper="JT retrains on all data so far at every chunk: its cost grows "
                                                   "with the stream, ST's stays one chunk (Hu et al.)"),
            Claim("streaming.cost.storage", STREAMING, "ST stores less than JT at the end of the stream.",
                  chunk_total("stored_bytes", "stored bytes, last chunk", last_only=True), ((1.0, jt), (-1.0, st)),
                  "JT bytes - ST bytes", paper="JT keeps every chunk's data; ST keeps none (Hu et al.)")]


def _byol_claim() -> Claim:
    moco, byol = Arm("MoCo-v2 ST", "distant_class", SSL), Arm("BYOL ST", "distant_class", BYOL)
    return Claim("streaming.byol_like_moco", STREAMING,
                 "BYOL behaves like MoCo-v2 on the distant-class stream (the same ST-JT gap, within a margin).",
                 final_gap(PROTOCOL), ((1.0, byol), (-1.0, moco)), "BYOL gap - MoCo-v2 gap", test="equivalent",
                 margin=EQUIVALENCE_MARGIN,
                 paper="BYOL's streaming results follow MoCo-v2's (Hu et al.)")


def _transfer_claims() -> list[Claim]:
    out = []
    for stream in STREAMS:
        st, jt = Arm("SSL ST", stream, SSL), Arm("SSL JT", stream, SSL, "joint")
        out.append(Claim(f"streaming.transfer.{stream}", STREAMING,
                         f"On the {stream} stream SSL's ST model transfers to a downstream set about as well as JT's "
                         "(many-shot linear probe, within a margin).",
                         last_chunk_transfer("linear_top1", "downstream linear top-1 (last chunk, eval.transfer)"),
                         ((1.0, st), (-1.0, jt)), "ST - JT downstream top-1", test="equivalent",
                         margin=EQUIVALENCE_MARGIN,
                         paper="ST and JT SSL models transfer alike to downstream classification (Hu et al.)"))
    return out


def _online_claims() -> list[Claim]:
    out = []
    cycle = (("online.schedule", "local_cycle"), ("online.steps_per_batch", "10"))
    for method, name in (("simclr", "SimCLR"), ("barlow_twins", "Barlow Twins")):
        rals = Arm(f"{name} SLCLRS+RALS", "online", method, params=(("online.rals", "True"), *cycle))
        plain = Arm(f"{name} SLCLRS", "online", method, params=(("online.rals", "False"), *cycle))
        constant = Arm(f"{name} constant LR", "online", method,
                       params=(("online.rals", "False"), ("online.schedule", "constant"),
                               ("online.steps_per_batch", "10")))
        offline = Arm(f"{name} offline", "instance", method, params=(("stream.chunks", "1"),))
        cassle = Arm(f"{name} CaSSLe", "online", method, "sequential+cassle", (("online.rals", "True"), *cycle))
        measure = final_accuracy(PROTOCOL)
        paper = "Mokhtarzadeh Azar & Timofte, Table 1 (10 steps a batch)"
        out += [
            Claim(f"online.{method}.rals", ONLINE, f"{name}: SLCLRS with RALS is at least as good as without it.",
                  measure, ((1.0, rals), (-1.0, plain)), "RALS - no RALS", test="noninferior",
                  margin=NONINFERIOR_MARGIN, paper=f"SLCLRS+RALS >= SLCLRS ({paper})"),
            Claim(f"online.{method}.slclrs", ONLINE, f"{name}: the per-batch LR cycle (SLCLRS) beats a constant LR.",
                  measure, ((1.0, plain), (-1.0, constant)), "SLCLRS - constant", paper=f"SLCLRS > constant ({paper})"),
            Claim(f"online.{method}.offline", ONLINE, f"{name}: online training beats offline training at the same "
                  "number of steps.", measure, ((1.0, rals), (-1.0, offline)), "online - offline",
                  guard=Guard("the same number of steps", STEPS, (rals, offline), STEPS_TOLERANCE, relative=True),
                  paper=f"online > offline at equal steps ({paper})"),
            Claim(f"online.{method}.cassle", ONLINE, f"{name}: online training beats CaSSLe at the same number of "
                  "steps.", measure, ((1.0, rals), (-1.0, cassle)), "online - CaSSLe",
                  guard=Guard("the same number of steps", STEPS, (rals, cassle), STEPS_TOLERANCE, relative=True),
                  paper=f"online > CaSSLe at equal steps ({paper})"),
        ]
    return out


def _views_claims() -> list[Claim]:
    recipe, usual = (("views.global.scale", "[0.3, 1.0]"),), (("views.global.scale", "[0.14, 1.0]"),)
    large = "resnet50"
    out = []
    for small, name in (("mobilenet_v2", "MobileNetV2"), ("resnet18", "ResNet-18")):
        terms = tuple((coef, Arm(f"{label} {'recipe' if r is recipe else 'usual'}", "instance", "dino",
                                 params=(("backbone.name", net), *r)))
                      for coef, net, label, r in ((1.0, small, name, recipe), (-1.0, small, name, usual),
                                                  (-1.0, large, "ResNet-50", recipe), (1.0, large, "ResNet-50", usual)))
        out.append(Claim(f"views.{small}_vs_{large}", VIEWS,
                         f"The less aggressive crops (global 0.3-1, local 0.05-0.3) help {name} more than ResNet-50 "
                         "(DINO).", final_accuracy(PROTOCOL), terms,
                         f"({name} recipe - usual) - (ResNet-50 recipe - usual)",
                         paper="the low-compute recipe lifts small networks' linear accuracy more than a large "
                               "network's (Tan et al., SSLight)"))
    out.append(Claim("views.slimmable", VIEWS, "The recipe's gain holds at every width of a slimmable network.",
                     None, (), "recipe - usual, per width", needs="needs slimmable",
                     paper="(Tan et al. discuss widths of one network; streamssl has no slimmable backbone yet)"))
    return out


CLAIMS: list[Claim] = [*_gap_claims(), *_sharpness_claims(), *_resource_claims(), _byol_claim(), *_transfer_claims(),
                       *_online_claims(), *_views_claims()]

_ids = [c.id for c in CLAIMS]
if len(_ids) != len(set(_ids)):
    raise ValueError(f"claim ids must be unique: {sorted(i for i in _ids if _ids.count(i) > 1)}")

__all__ = ["CLAIMS", "EQUIVALENCE_MARGIN", "NONINFERIOR_MARGIN"]
