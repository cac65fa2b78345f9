"""MLflow: the only place besides the driver that knows it.

- :mod:`orchestrator.tracking.client`: the retrying MLflow client (outages ridden out, writes landing once);
- :mod:`orchestrator.tracking.tracker`: :class:`Tracker`, what the driver writes and reads through it;
- :mod:`orchestrator.tracking.lineage`: the lineage schema (tags, run kinds) and its readers (`lineage`, `status`).
"""
