"""What a spec records: the flattened MLflow params and the identity hash that plan keys come from."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.spec.experiment import Spec


# Settings that are off by default, with their off value, by section: recorded only when on.
OFF_BY_DEFAULT = {
    "eval": {"fewshot": None, "sharpness": None, "interpolation": None, "every_epochs": 0, "downstream": [],
             "widths": None, "transfer": []},
    "data": {"class_fraction": 1.0, "labels": "class"},
}

# views.local settings whose None means "as before they existed" (no overlap band, the method's plain mean).
LOCAL_VIEW_KEYS_OFF_WHEN_NONE = ("min_iou", "max_iou", "loss_weight")


def _recorded(spec: Spec) -> dict[str, Any]:
    """`spec.to_dict()` with only the methods and strategies the lines use: options of a component no line uses
    change no number."""
    data = spec.to_dict()
    data["methods"] = {name: data["methods"][name] for name in spec.lines.method}
    data["strategy"] = {name: options for name, options in data["strategy"].items() if name in spec.strategies_used}
    # A setting that is off (few-shot, sharpness, interpolation, mid-chunk evaluations, class subsampling, coarse
    # labels) or left to its default (eval.widths: the evaluator's widths) is not recorded, so a spec that turns none on keeps the identity (and plan key) it had before.
    for section, off in OFF_BY_DEFAULT.items():
        data[section] = {key: value for key, value in data[section].items()
                         if not (key in off and value == off[key])}
    # A trial's numbers come from its own values, not from the search around it: `streamssl run` of a sweep's spec
    # and of the same spec without its sweep section are one plan.
    data.pop("sweep", None)
    if data.get("online") is None:  # a chunked stream: the section is absent, as before online streams existed
        data.pop("online", None)
    elif data["online"].get("source") is None:  # the train split: recorded as before polled sources existed
        data["online"].pop("source", None)
    return data


def flatten(spec: Spec) -> dict[str, str]:
    """Dotted-key params for MLflow (`optim.lr` -> '0.3'); the same keys for every run of every spec.

    Every option of every method the lines train is there with its default filled in (`methods.simclr.temperature`),
    so runs that spell a default out and runs that omit it line up in MLflow's compare view.
    """
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    walk("", _recorded(spec))
    return out


def identity_digest(spec: Spec, with_seed: bool = True) -> str:
    """Hash of everything that changes the numbers a job produces (not where they are stored or tracked).

    `with_seed=False`: the same without the top-level `seed` (weights and views), the identity of a study that
    repeats a spec over seeds (`--set seed=k`): `streamssl report` averages the plans that share it.
    """
    data = _recorded(spec)  # normalised: an explicit default and an omitted one hash alike
    for key in ("tracking", "storage", "name", *(() if with_seed else ("seed",))):
        data.pop(key, None)
    data["resources"] = {"workers": spec.resources.workers}  # world size changes BN statistics; the rest does not
    data["data"].pop("storage_options", None)
    # The overlap band and local loss weight came after plans were keyed: unset, they change no crop and no loss, so
    # a spec that leaves them unset keeps its plan key (and `--resume` of plans made before them). They stay in the
    # params (flatten), where a key every run has lines runs up in the compare view.
    local = data["views"].get("local") or {}
    for key in LOCAL_VIEW_KEYS_OFF_WHEN_NONE:
        if local.get(key, 0) is None:
            local.pop(key)
    online = data.get("online") or {}
    # How a deadline-cut batch sizes its LR cycle matters only under a deadline: without `time_budget_s` every cycle
    # is planned, whatever `cycle_fit` says, so an online plan made before the field existed keeps its key.
    if online and online.get("time_budget_s") is None:
        online.pop("cycle_fit", None)
    if online.get("source"):
        # How long a shard that does not check out yet is waited for decides only what arrives, which the run's
        # source_shards.json records; a plan keyed before the grace period existed keeps its key.
        for key in ("storage_options", "grace_s"):
            data["online"]["source"].pop(key, None)
    for entry in data["eval"].get("downstream", []):
        entry.pop("storage_options", None)
    # Transfer tasks read finished checkpoints and change none of the plan's runs: a spec that adds one keeps its plan,
    # and `--resume` runs the new tasks on the chunks already trained (each evaluation run carries its own options).
    data["eval"].pop("transfer", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["flatten", "identity_digest"]
