"""Data layer: WebDataset shards in and out (schema in data/SCHEMA.md). Imports config/ and runtime/ only.

- data.write_shards: JSONL manifest / folder -> validated prompt or preference shards (CLI).
- data.reader.ShardReader: streaming, shuffled, rank/worker-split, exactly resumable reader.
- data.tarindex: shard patterns, tar member index, `require_shards` (the check before work starts).
- data.video: mp4/PNG IO, resize + centre-crop, uniform frame sampling.
- data.distort: synthetic identity distortions -> preference pairs.
- data.demo: small demo shards from real face photographs (CLI).

Submodules are imported explicitly (`from data.reader import ShardReader`) so that importing one
piece does not pull in the others' dependencies.
"""
