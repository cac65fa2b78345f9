"""Data (stage 2): Parquet image shards on object storage and the manifest.json that commits them, how a run
makes them exist, and how Ray Data streams them.

- :mod:`orchestrator.data.manifest`: what manifest.json holds; :func:`load_manifest`;
- :mod:`orchestrator.data.shards`: the shard schema, reading shards and splits, writing shards and the manifest;
- :mod:`orchestrator.data.verify`: `streamssl data verify`;
- :mod:`orchestrator.data.prepare`: `streamssl data prepare` (an ImageFolder tree);
- :mod:`orchestrator.data.synth`: `streamssl data synth` (the built-in synthetic set);
- :mod:`orchestrator.data.downstream`: `eval.downstream` sets, prepared and resolved;
- :mod:`orchestrator.data.materialise`: a run's data step (the synthetic set, downstream sets) before planning;
- :mod:`orchestrator.data.ingest`: Ray Data pipelines of a stream plan's chunks, and the evaluation splits;
- :mod:`orchestrator.data.online_source`: a polled folder of arriving shards (an online stream's source);
- :mod:`orchestrator.data.annotations`: Pascal VOC and COCO annotation trees read into checked detection records;
- :mod:`orchestrator.data.detection_shards`: those records as shards with an annotations column and their own
  manifest (detection_manifest.json), read back as torchvision detection targets;
- :mod:`orchestrator.data.synth_detection`: a tiny shapes set written as a VOC tree and a COCO tree (tests, examples).

May import `storage`, `errors`, `spec` and `plan.streams` (what a pipeline reads); never `train/`, `run/` or
`tracking/`.
"""
