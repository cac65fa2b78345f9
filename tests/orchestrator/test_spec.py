"""The spec loader: valid specs load, every invalid one names its field path (and never raises anything else)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import SpecError
from orchestrator.spec import Spec, apply_overrides, flatten, identity_digest, load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[2]


def minimal() -> dict:
    return {
        "name": "t",
        "data": {"url": "memory://x"},
        "stream": {"kind": "instance", "chunks": 2},
        "lines": {"method": ["simclr"], "strategy": ["sequential"]},
    }


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name
    assert spec.optim.batch_size % spec.resources.workers == 0


def test_defaults_and_derived_values(tmp_path: Path) -> None:
    spec = validate_spec(minimal())
    assert spec.views.global_.count == 2 and spec.views.global_.scale == (0.08, 1.0)
    assert spec.view_size == spec.data.image_size == 32
    assert spec.tracking_uri.startswith("sqlite:///") and spec.tracking_uri.endswith("streamssl-runs/mlflow.db")
    assert spec.experiment_name == "t"
    with pytest.raises(Exception):
        spec.optim.lr = 1.0  # frozen


def test_unknown_field_names_its_path() -> None:
    raw = minimal()
    raw["optim"] = {"lr": 0.1, "learning_rate": 0.2}
    with pytest.raises(SpecError) as err:
        validate_spec(raw, "my.yaml")
    assert "optim.learning_rate" in str(err.value) and "unknown field" in str(err.value)
    assert "my.yaml" in str(err.value)


@pytest.mark.parametrize(
    "patch, path",
    [
        ({"stream": {"kind": "sideways", "chunks": 2}}, "stream.kind"),
        ({"stream": {"kind": "instance", "chunks": 0}}, "stream.chunks"),
        ({"lines": {"method": ["simclr", "simclr"], "strategy": ["joint"]}}, "lines.method"),
        ({"lines": {"method": ["dino"], "strategy": ["joint"]}}, "lines.method[0]"),
        ({"views": {"global": {"scale": [0.9, 0.1]}}}, "views.global.scale"),
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"optim": {"batch_size": 3}}, "batch_size"),
        ({"methods": {"swav": {}}}, "methods"),
        ({"name": "has space"}, "name"),
    ],
)
def test_bad_values_name_the_field(patch: dict, path: str) -> None:
    raw = {**minimal(), **patch}
    with pytest.raises(SpecError) as err:
        validate_spec(raw)
    assert path in str(err.value)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    spec = load_spec(path, ["optim.lr=0.05", "lines.method=[simclr, byol]", "views.global.scale=[0.2, 1.0]"])
    assert spec.optim.lr == 0.05
    assert spec.lines.method == ["simclr", "byol"]
    assert spec.views.global_.scale == (0.2, 1.0)
    with pytest.raises(SpecError, match="optim.lr"):
        load_spec(path, ["optim.lr=fast"])
    with pytest.raises(SpecError, match="key=value"):
        load_spec(path, ["optim.lr"])
    with pytest.raises(SpecError, match="is not a section"):
        apply_overrides(minimal(), ["name.x=1"])


def test_missing_empty_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SpecError, match="empty"):
        load_spec(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "list.yaml")


def test_flatten_redacts_secrets_and_is_stable() -> None:
    raw = minimal()
    raw["data"]["storage_options"] = {"key": "AKIA-SECRET", "secret": "shh", "client_kwargs": {"endpoint_url": "http://h"}}
    spec = validate_spec(raw)
    params = flatten(spec)
    joined = " ".join(f"{k}={v}" for k, v in params.items())
    assert "AKIA-SECRET" not in joined and "shh" not in joined
    assert params["data.storage_options.key"] == "***"
    assert params["data.storage_options.client_kwargs.endpoint_url"] == "http://h"
    assert params["optim.lr"] == "0.3"
    expected = (set(flatten(validate_spec(minimal()))) - {"data.storage_options"}) | {
        "data.storage_options.key", "data.storage_options.secret", "data.storage_options.client_kwargs.endpoint_url"
    }
    assert set(params) == expected


def test_identity_ignores_where_things_are_stored() -> None:
    a = validate_spec(minimal())
    b = validate_spec({**minimal(), "tracking": {"uri": "http://127.0.0.1:1"}, "storage": {"workdir": "/elsewhere"}})
    c = validate_spec({**minimal(), "optim": {"lr": 0.01}})
    assert identity_digest(a) == identity_digest(b) != identity_digest(c)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
field_names = st.sampled_from(["name", "data", "stream", "lines", "optim", "views", "eval", "resources", "bogus"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(field_names, json_values, max_size=6))
def test_fuzzed_specs_fail_only_with_spec_errors(raw: dict) -> None:
    spec = {**minimal(), **raw}
    try:
        result = validate_spec(spec)
    except SpecError as exc:
        message = str(exc)
        assert "invalid spec" in message or "mapping" in message
        assert "Traceback" not in message
    else:
        assert isinstance(result, Spec)
