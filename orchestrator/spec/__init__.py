"""The experiment spec: one typed, validated YAML document and its sections (stage 1 of a run).

Owns parsing, validation, `--set` overrides, the identity digest and the sweep/views/online/eval sections. May import
`orchestrator.errors`, `orchestrator.plan.streams`' registry, and the trainers'/evaluators' registries; nothing that
runs, tracks or stores.
"""
