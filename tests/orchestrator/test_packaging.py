"""What the package declares matches what the code does: the README's exit codes, the Ray floor (Train V2),
one default LR for the linear probe."""

from __future__ import annotations

import inspect
import os
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from evaluators import linear
from orchestrator import errors

ROOT = Path(__file__).resolve().parents[2]


def _defined_exit_codes() -> dict[int, str]:
    return {cls.exit_code: cls.__name__ for cls in vars(errors).values()
            if isinstance(cls, type) and issubclass(cls, errors.StreamsslError) and cls.exit_code != 1}


def test_readme_lists_every_exit_code_the_cli_defines():
    text = " ".join((ROOT / "README.md").read_text().split())
    sentence = re.search(r"Exit codes: (.*?)\. Every destination", text)
    assert sentence, "the README's 'Exit codes:' sentence is gone"
    listed = {int(n) for n in re.findall(r"(?:^|, |\) ?,? ?)(\d+) [a-z]", sentence.group(1))}
    assert listed == set(_defined_exit_codes()), (sorted(listed), _defined_exit_codes())


def test_ray_floor_has_train_v2_by_default_and_ray_init_enables_it(monkeypatch):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    floor = min(Version(s.version) for s in ray.specifier if s.operator in (">=", ">", "=="))
    assert floor >= Version("2.51"), f"ray {ray.specifier} admits a Ray whose Train V2 is off by default"
    from orchestrator.train import ray_init

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    ray_init.enable_train_v2()  # also on a Ray (or a user's environment) where V2 is off
    assert os.environ["RAY_TRAIN_V2_ENABLED"] == "1"


def test_ray_init_shortens_train_v2s_poll_unless_the_user_set_it(monkeypatch):
    """A report with a checkpoint waits for the controller's next poll: 0.5 s by default here, the user's if set;
    Ray passes the driver's value on to its controller."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from orchestrator.train import ray_init

    monkeypatch.delenv(ray_init.TRAIN_POLL_ENV, raising=False)
    ray_init.enable_train_v2()
    assert os.environ[ray_init.TRAIN_POLL_ENV] == ray_init.TRAIN_POLL_S == "0.5"
    assert get_env_vars_to_propagate()[ray_init.TRAIN_POLL_ENV] == "0.5"
    monkeypatch.setenv(ray_init.TRAIN_POLL_ENV, "3")
    ray_init.enable_train_v2()
    assert os.environ[ray_init.TRAIN_POLL_ENV] == "3"


def test_linear_probe_has_one_default_lr():
    defaults = {fn.__name__: inspect.signature(fn).parameters["lr"].default
                for fn in (linear.fit_linear_probe, linear.linear_probe, linear.linear_accuracy)}
    assert set(defaults.values()) == {linear.LinearConfig().lr} == {linear.DEFAULT_LR}, defaults
