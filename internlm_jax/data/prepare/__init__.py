"""Corpus preparation on Apache Beam: normalize, filter, deduplicate, tokenize, shard (`internlm-jax data prepare`).

Modules: config (typed YAML), read (input files), filters (pure rules), dedup (hashes, MinHash LSH, clusters),
tokenize, sink (array_record shards), manifest, card, pipeline (the Beam graph), synthetic, bench, cli.
"""
from internlm_jax.data.prepare.config import PrepareConfig, load_prepare_config

__all__ = ["PrepareConfig", "load_prepare_config"]
