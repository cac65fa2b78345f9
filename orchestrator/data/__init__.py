"""Data sets on object storage: Parquet image shards plus the manifest.json that commits them.

- :mod:`orchestrator.data.manifest`: what manifest.json holds; :func:`load_manifest`;
- :mod:`orchestrator.data.shards`: the shard schema, reading shards and splits, writing shards and the manifest;
- :mod:`orchestrator.data.verify`: `streamssl data verify`;
- :mod:`orchestrator.data.prepare`: `streamssl data prepare` (an ImageFolder tree);
- :mod:`orchestrator.data.synth`: `streamssl data synth` (the built-in synthetic set).
"""
