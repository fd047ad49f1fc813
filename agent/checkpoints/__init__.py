"""Checkpoints: the store interface, the content-addressed engine (chunks in zstd packs,
manifests written last), its repository layout and backends, verification and garbage
collection, and the first (archive) format, which is only read any more.

The controller uses this package's public pieces only: `gc`, `repo`, `engine.get_repository`
and `content_store.storage_options_for`.
"""
