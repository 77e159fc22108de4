"""The corpus-preparation pipeline on Apache Beam.

    files -> read (stable keys) -> normalize -> filters -> exact dedup (GroupByKey on content hash)
          -> near dedup (MinHash bands -> GroupByKey per bucket -> edges -> union-find -> CoGroupByKey)
          -> tokenize -> GroupByKey per (source, shard) -> sorted array_record shards
    every stage also emits counts -> CombinePerKey(sum) -> manifest.json (written by the pipeline)

The same graph runs on DirectRunner (tests, laptops) and on Dataflow / Flink / Spark; nothing depends on the
order in which a runner delivers elements (groups are sorted before use), so the output bytes are the same
for the same input and config. Union-find over the near-duplicate edges runs on one worker: the edges are
few (one per duplicate document), the documents themselves stay distributed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from internlm_jax.config import ConfigError
from internlm_jax.data.prepare import dedup, filters, read, sink
from internlm_jax.data.prepare.config import PrepareConfig
from internlm_jax.data.prepare.manifest import MANIFEST, build_manifest
from internlm_jax.data.prepare.tokenize import encode_plain, load_tokenizer, tokenizer_fingerprint

STATS = "stats"
STAGES = ("read", "normalize", "filter", "exact_dedup", "minhash", "near_dedup", "tokenize", "write")


def _timer(stage: str) -> Any:
    return Metrics.counter("prepare_us", stage)


def _stat(*key: Any, n: int = 1) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(STATS, (tuple(key), n))


class ReadFile(beam.DoFn):
    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad

    def process(self, element: tuple[str, str, str, str]) -> Iterator[Any]:
        source, path, fmt, text_field = element
        # Time only the reading: downstream fused stages run while this generator is suspended at `yield`.
        items, busy = read.read_file(source, path, fmt, text_field, self.skip_bad), 0.0
        while True:
            t0 = time.perf_counter()
            item = next(items, None)
            busy += time.perf_counter() - t0
            if item is None:
                break
            yield _stat("bad_records", source) if isinstance(item, Exception) else item
        _timer("read").inc(int(busy * 1e6))


class NormalizeAndFilter(beam.DoFn):
    """Normalize the text, then apply the source's rules; counts docs_in and the rule that removed each doc."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg

    def setup(self) -> None:
        self.rules = {s.name: filters.build_filters(self.cfg.filters_for(s)) for s in self.cfg.sources}

    def process(self, doc: read.Doc) -> Iterator[Any]:
        key, source, text = doc
        t0 = time.perf_counter()
        text = filters.normalize_text(text, self.cfg.normalize)
        t1 = time.perf_counter()
        failed = filters.first_failure(text, self.rules[source])
        _timer("normalize").inc(int((t1 - t0) * 1e6))
        _timer("filter").inc(int((time.perf_counter() - t1) * 1e6))
        yield _stat("docs_in", source)
        if failed is not None:
            yield _stat("filter", source, failed)
        else:
            yield key, source, text


def _exact_keep(item: tuple[bytes, Any]) -> Iterator[Any]:
    t0 = time.perf_counter()
    docs = sorted(item[1])
    out: list[Any] = [docs[0]]
    if len(docs) > 1:
        out += [_stat("exact_clusters"), _stat("exact_cluster_size", len(docs))]
        out += [_stat("exact_removed", d[1]) for d in docs[1:]]
        out.append(beam.pvalue.TaggedOutput("examples", ("exact", docs[0][0], tuple(d[0] for d in docs[1:]))))
    _timer("exact_dedup").inc(int((time.perf_counter() - t0) * 1e6))
    yield from out


class BandKeys(beam.DoFn):
    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg

    def setup(self) -> None:
        self.hasher = dedup.MinHasher(self.cfg.dedup.near)

    def process(self, doc: read.Doc) -> Iterator[tuple[bytes, str]]:
        t0 = time.perf_counter()
        keys = self.hasher.band_keys(doc[2])
        _timer("minhash").inc(int((time.perf_counter() - t0) * 1e6))
        for band in keys:
            yield band, doc[0]


def _union_find(item: tuple[int, Any]) -> Iterator[Any]:
    t0 = time.perf_counter()
    found = dedup.clusters(item[1])
    _timer("near_dedup").inc(int((time.perf_counter() - t0) * 1e6))
    for members in found:
        yield _stat("near_clusters")
        yield _stat("near_cluster_size", len(members))
        yield beam.pvalue.TaggedOutput("examples", ("near", members[0], tuple(members[1:])))
        for k in members[1:]:
            yield k, members[0]


def _near_keep(item: tuple[str, dict[str, list[Any]]]) -> Iterator[Any]:
    docs, dropped = item[1]["doc"], item[1]["drop"]
    for d in docs:
        if dropped:
            yield _stat("near_removed", d[1])
        else:
            yield d


class Tokenize(beam.DoFn):
    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg

    def setup(self) -> None:
        self.tokenizer = load_tokenizer(self.cfg.tokenizer)

    def process(self, doc: read.Doc) -> Iterator[Any]:
        key, source, text = doc
        t0 = time.perf_counter()
        ids = encode_plain(self.tokenizer, text)
        _timer("tokenize").inc(int((time.perf_counter() - t0) * 1e6))
        if len(ids) == 0:
            yield _stat("empty_tokens", source)
            return
        yield _stat("docs_out", source)
        yield _stat("tokens", source, n=len(ids))
        yield _stat("chars", source, n=len(text))
        yield _stat("length_hist", source, 1 << int(math.log2(len(ids))))
        yield (source, sink.shard_of(key, self.cfg.num_shards)), (key, ids.tobytes())


class WriteShard(beam.DoFn):
    def __init__(self, output_dir: str, num_shards: int):
        self.output_dir, self.num_shards = output_dir, num_shards

    def process(self, item: tuple[tuple[str, int], Any]) -> Iterator[dict[str, Any]]:
        (source, index), records = item
        t0 = time.perf_counter()
        records = sorted(records)
        rel = sink.shard_name(source, index, self.num_shards)
        size, digest = sink.write_shard(sink.join(self.output_dir, rel), (r for _, r in records))
        tokens = sum(len(r) for _, r in records) // 4
        _timer("write").inc(int((time.perf_counter() - t0) * 1e6))
        yield {"source": source, "path": rel, "docs": len(records), "tokens": tokens, "bytes": size,
               "sha256": digest}


class WriteManifest(beam.DoFn):
    def __init__(self, cfg: PrepareConfig, tokenizer_info: dict[str, Any], band_shape: tuple[int, int] | None):
        self.cfg, self.tokenizer_info, self.band_shape = cfg, tokenizer_info, band_shape

    def process(self, _: Any, stats: list[Any], shards: list[dict[str, Any]], examples: list[Any]) -> Iterator[str]:
        manifest = build_manifest(self.cfg, self.tokenizer_info, dict(stats), shards, examples, self.band_shape)
        path = sink.join(self.cfg.output_dir, MANIFEST)
        data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(path) as f:
            f.write(data)
        yield path


def build(p: beam.Pipeline, cfg: PrepareConfig, files: list[tuple[str, str, str, str]],
          tokenizer_info: dict[str, Any]) -> None:
    """Add the whole graph to pipeline `p`."""
    stats_parts, example_parts = [], []
    read_out = (p | "Files" >> beam.Create(files) | "Spread" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(ReadFile(cfg.bad_records == "skip")).with_outputs(STATS, main="docs"))
    stats_parts.append(read_out[STATS])
    filtered = read_out.docs | "Filter" >> beam.ParDo(NormalizeAndFilter(cfg)).with_outputs(STATS, main="docs")
    stats_parts.append(filtered[STATS])
    docs = filtered.docs

    if cfg.dedup.exact:
        exact = (docs | "ByHash" >> beam.Map(lambda d: (dedup.content_hash(d[2]), d))
                 | "GroupHash" >> beam.GroupByKey()
                 | "ExactKeep" >> beam.FlatMap(_exact_keep).with_outputs(STATS, "examples", main="docs"))
        stats_parts.append(exact[STATS])
        example_parts.append(exact.examples)
        docs = exact.docs

    band_shape = None
    if cfg.dedup.near.enabled:
        band_shape = dedup.lsh_shape(cfg.dedup.near)
        edges = (docs | "Bands" >> beam.ParDo(BandKeys(cfg)) | "GroupBucket" >> beam.GroupByKey()
                 | "Edges" >> beam.FlatMap(lambda kv: dedup.bucket_edges(kv[1])) | "DistinctEdges" >> beam.Distinct())
        found = (edges | "OneKey" >> beam.Map(lambda e: (0, e)) | "AllEdges" >> beam.GroupByKey()
                 | "UnionFind" >> beam.FlatMap(_union_find).with_outputs(STATS, "examples", main="drops"))
        stats_parts.append(found[STATS])
        example_parts.append(found.examples)
        near = ({"doc": docs | "ByKey" >> beam.Map(lambda d: (d[0], d)), "drop": found.drops}
                | "Join" >> beam.CoGroupByKey()
                | "NearKeep" >> beam.FlatMap(_near_keep).with_outputs(STATS, main="docs"))
        stats_parts.append(near[STATS])
        docs = near.docs

    tokens = docs | "Tokenize" >> beam.ParDo(Tokenize(cfg)).with_outputs(STATS, main="records")
    stats_parts.append(tokens[STATS])
    shards = (tokens.records | "GroupShard" >> beam.GroupByKey()
              | "WriteShard" >> beam.ParDo(WriteShard(cfg.output_dir, cfg.num_shards)))

    stats = (tuple(stats_parts) | "AllStats" >> beam.Flatten() | "Sum" >> beam.CombinePerKey(sum)
             | "StatList" >> beam.combiners.ToList())
    shard_list = shards | "ShardList" >> beam.combiners.ToList()
    if example_parts:
        examples = (tuple(example_parts) | "AllExamples" >> beam.Flatten()
                    | "FirstExamples" >> beam.combiners.Top.Smallest(20))
    else:
        examples = p | "NoExamples" >> beam.Create([[]])
    (p | "Once" >> beam.Create([None])
     | "Manifest" >> beam.ParDo(WriteManifest(cfg, tokenizer_info, band_shape),
                                stats=beam.pvalue.AsSingleton(stats), shards=beam.pvalue.AsSingleton(shard_list),
                                examples=beam.pvalue.AsSingleton(examples)))


def pipeline_options(cfg: PrepareConfig, extra: list[str] = ()) -> PipelineOptions:
    args = [f"--runner={cfg.runner.name}", *cfg.runner.options, *extra]
    if cfg.runner.name == "DirectRunner":
        args += [f"--direct_num_workers={cfg.runner.workers}",
                 f"--direct_running_mode={cfg.runner.direct_running_mode}"]
    return PipelineOptions(args)


def _prepare_output(cfg: PrepareConfig) -> None:
    """Refuse to mix with an earlier run's files unless overwrite is set, then remove them."""
    from apache_beam.io.filesystems import FileSystems

    out = cfg.output_dir
    old = [m.path for m in FileSystems.match([sink.join(out, "*/*" + sink.SHARD_SUFFIX)])[0].metadata_list]
    old += [m.path for name in (MANIFEST, "card.md", "card.png")
            for m in FileSystems.match([sink.join(out, name)])[0].metadata_list]
    if old and not cfg.overwrite:
        raise ConfigError(f"output_dir {out!r} already holds a prepared corpus ({len(old)} files, e.g. "
                          f"{old[0]}); set overwrite=true to replace it or choose another output_dir")
    if old:
        FileSystems.delete(sorted(old))
    if sink.is_local(out):
        os.makedirs(out, exist_ok=True)


def run(cfg: PrepareConfig, beam_args: list[str] = ()) -> dict[str, Any]:
    """Run the pipeline to completion; returns {manifest, metrics (per-stage busy seconds), wall_s}."""
    files = [(s.name, f, fmt, s.text_field) for s in cfg.sources for f, fmt in read.expand_source(s)]
    tokenizer_info = tokenizer_fingerprint(cfg.tokenizer)
    for s in cfg.sources:  # a bad blocklist file or override fails here, before the workers start
        filters.build_filters(cfg.filters_for(s))
    _prepare_output(cfg)
    t0 = time.perf_counter()
    p = beam.Pipeline(options=pipeline_options(cfg, list(beam_args)))
    build(p, cfg, files, tokenizer_info)
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - t0
    busy = {}
    try:
        for c in result.metrics().query()["counters"]:
            if c.key.metric.namespace == "prepare_us":
                busy[c.key.metric.name] = busy.get(c.key.metric.name, 0.0) + c.committed / 1e6
    except (NotImplementedError, KeyError):  # some runners do not report metrics back
        pass
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(sink.join(cfg.output_dir, MANIFEST)) as f:
        manifest = json.loads(f.read().decode("utf-8"))
    if cfg.card:
        from internlm_jax.data.prepare.card import write_card

        write_card(manifest, cfg.output_dir)
    return {"manifest": manifest, "busy_s": busy, "wall_s": wall}
