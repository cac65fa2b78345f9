"""Shared fixtures: small synthetic shards, an in-process Ray, the real data set when STREAMSSL_REAL_DATA is set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_DATA_ENV = "STREAMSSL_REAL_DATA"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_session():
    """One intra-op torch thread in the test process, for every test. The tensors here are tiny: two OpenMP threads
    spin against each other and against the other processes on the 2 shared cores (a 16-step loop test measured
    1.35 s with one thread and 5.4 s with two under load, and minutes inside a loaded pytest). Ray workers and
    evaluators set their own threads; subprocesses are untouched."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_url(tmp_path_factory) -> str:
    """A small synthetic data set (12 classes in 6 groups, 2 domains, 32 px) on local disk."""
    from orchestrator.data.synth import generate_synthetic

    folder = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(str(folder), train=1200, val=360, image_size=32, seed=0, shard_rows=300, progress=False)
    return str(folder)


@pytest.fixture(scope="session")
def ray_local():
    """Ray started in this process with 4 logical CPUs on the 2 real cores (workers hold fractions)."""
    import ray

    from orchestrator.train.ray_init import local_ray_env

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": local_ray_env()})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def migrated_mlflow_store(tmp_path_factory) -> Path:
    """One empty MLflow SQLite store with every schema migration applied, built once per session (the migrations
    measured 7-10 s a store on the loaded 2-core machine). Tests take copies through `fresh_mlflow_store`."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


def _migrated_copy(template: Path, folder: Path) -> Path:
    """`folder/mlflow.db`, a copy of the session's migrated empty store: a study store built there skips the
    migrations."""
    import shutil

    path = folder / "mlflow.db"
    shutil.copyfile(template, path)
    return path


@pytest.fixture
def fresh_mlflow_store(migrated_mlflow_store):
    """`fresh_mlflow_store(path)` puts a copy of the migrated empty store at `path` (a run's `<workdir>/mlflow.db`,
    or any path a test then names as its tracking URI) and returns its sqlite URI. The driver finds the store
    there and skips its own build (`_create_sqlite_store` returns on an existing file); the store's creation itself
    stays proven by tests/faults/test_store_creation.py."""
    import shutil

    def place(path) -> str:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_mlflow_store, path)
        return f"sqlite:///{path}"

    return place


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The imagenette ImageFolder tree; tests using it run only when STREAMSSL_REAL_DATA is set."""
    value = os.environ.get(REAL_DATA_ENV)
    if not value:
        pytest.skip(f"{REAL_DATA_ENV} is not set (CI sets it to ../shared/datasets/imagenette)")
    path = Path(value)
    if not (path / "train").is_dir():
        pytest.fail(f"{REAL_DATA_ENV}={value} but {path / 'train'} does not exist: fix the path or unset it")
    return path


@pytest.fixture(scope="session")
def study_store(migrated_mlflow_store, tmp_path_factory):
    """A finished study record in MLflow/SQLite (tests/orchestrator/study_store.py): 2 stream kinds x 5 lines x 3
    chunks, shared by the report's orchestrator and CLI tests (building it takes tens of seconds)."""
    from tests.orchestrator.study_store import build_study

    return build_study(_migrated_copy(migrated_mlflow_store, tmp_path_factory.mktemp("study")))


@pytest.fixture(scope="session")
def partial_study_store(migrated_mlflow_store, tmp_path_factory):
    """The same study with one chunk run FAILED (random_class simclr-sequential-replay chunk 2, so its line and plan
    lack their metrics) and one metric never logged (distant_class supervised-joint chunk 1 wall_seconds)."""
    from tests.orchestrator.study_store import build_study

    return build_study(_migrated_copy(migrated_mlflow_store, tmp_path_factory.mktemp("partial-study")),
                       unfinished=("random_class", "simclr-sequential-replay", 2),
                       absent=("distant_class", "supervised-joint", 1, "wall_seconds"))


@pytest.fixture(scope="session")
def findings_store(migrated_mlflow_store, tmp_path_factory):
    """A record with known effects over seeds 0-2 for the findings table (tests/orchestrator/report/findings_store.py),
    shared by the findings' orchestrator and CLI tests."""
    from tests.orchestrator.report.findings_store import build_findings_store

    return build_findings_store(_migrated_copy(migrated_mlflow_store, tmp_path_factory.mktemp("findings")))


@pytest.fixture(scope="session")
def seeded_study_store(migrated_mlflow_store, tmp_path_factory):
    """A small study over seeds 0 and 1 (plus a superseded re-run of seed 1) with eval.sharpness.epsilons [0.05], and
    a stream of plan runs without the study tag (tests/orchestrator/study_store.py: build_seeded_study)."""
    from tests.orchestrator.study_store import build_seeded_study

    return build_seeded_study(_migrated_copy(migrated_mlflow_store, tmp_path_factory.mktemp("seeded-study")))


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test, restored after: tiny tensors run fastest so, and two threads thrash
    on a 2-core machine shared with Ray workers (the session fixture above already holds one; this keeps a test's
    one thread explicit where its figures were measured so)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Each phase's time is written as it ends (test-artifacts/durations.tsv), and a phase over SLOW_PHASE_S is named on
# the terminal at once: pytest's --durations table prints only at the end, so a run CI stops at its time limit
# would otherwise say nothing of where its minutes went.
SLOW_PHASE_S = 30.0
_DURATIONS = {"file": None, "config": None, "started": None}


def pytest_configure(config):
    import time

    _DURATIONS["config"] = config
    _DURATIONS["started"] = time.monotonic()
    out = Path(config.rootpath) / "test-artifacts"
    out.mkdir(exist_ok=True)
    _DURATIONS["file"] = open(out / "durations.tsv", "w", buffering=1)
    _DURATIONS["file"].write("elapsed_s\tphase_s\tphase\toutcome\ttest\n")


def pytest_runtest_logreport(report):
    import time

    elapsed = time.monotonic() - (_DURATIONS["started"] or time.monotonic())
    if _DURATIONS["file"] is not None:
        _DURATIONS["file"].write(f"{elapsed:.1f}\t{report.duration:.2f}\t{report.when}\t{report.outcome}\t{report.nodeid}\n")
    # Looked up here: the terminal reporter registers itself after this conftest's pytest_configure has run.
    reporter = _DURATIONS["config"].pluginmanager.get_plugin("terminalreporter") if _DURATIONS["config"] else None
    if reporter is not None and report.duration >= SLOW_PHASE_S:
        reporter.write_line(f"[slow {report.duration:.0f} s {report.when}, at {elapsed / 60:.0f} min] {report.nodeid}")


def pytest_unconfigure(config):
    if _DURATIONS["file"] is not None:
        _DURATIONS["file"].close()
        _DURATIONS["file"] = None
