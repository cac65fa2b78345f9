"""MLflow, and nothing above it: the retrying client (`client`), the store with streamssl's queries (`tracker`) and
the lineage schema (`tags`). Reading the record as a chain is `orchestrator.lineage`, one floor up.

May import `errors` and `retry` only.
"""
