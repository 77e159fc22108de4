"""Data: text sources (jsonl, parquet, array_record), tokenise, pack, grain pipelines; synthetic corpus."""
from internlm_jax.data.byte_tokenizer import ByteTokenizer
from internlm_jax.data.config import DataConfig, SourceConfig
from internlm_jax.data.corpus import unigram_entropy, write_synthetic_corpus
from internlm_jax.data.packing import IGNORE
from internlm_jax.data.pipeline import DataIterator, build_pretrain_pipeline
from internlm_jax.data.sources import DataError, open_source

__all__ = [
           "IGNORE",
           "ByteTokenizer",
           "DataConfig",
           "DataError",
           "DataIterator",
           "SourceConfig",
           "build_pretrain_pipeline",
           "open_source",
           "unigram_entropy",
           "write_synthetic_corpus",
]
