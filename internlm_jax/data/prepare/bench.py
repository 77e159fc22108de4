"""`internlm-jax data bench`: documents/s and tokens/s of `data prepare` on a synthetic corpus, per core, and
how the workers' busy time splits between reading, filtering, dedup, tokenizing and writing.

    internlm-jax data bench --size-mb 100 --workers 2 [--tokenizer PATH] [--keep DIR]

Busy time is what each stage's DoFns measured around their own work (Beam counters, summed over workers);
the rest of the wall time x workers is Beam itself (shuffles, encoding, scheduling) and idle workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

STAGE_GROUPS = {"read": ("read",), "normalize+filter": ("normalize", "filter"),
                "dedup": ("exact_dedup", "minhash", "near_dedup"), "tokenize": ("tokenize",), "write": ("write",)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="internlm-jax data bench")
    p.add_argument("--size-mb", type=float, default=100.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default="byte", help="tokenizer folder or `byte`")
    p.add_argument("--keep", help="write corpus and output here (kept) instead of a temporary folder")
    args = p.parse_args(argv)

    from internlm_jax.data.prepare.config import load_prepare_config
    from internlm_jax.data.prepare.pipeline import run
    from internlm_jax.data.prepare.synthetic import write_sized_corpus

    root = args.keep or tempfile.mkdtemp(prefix="prepare-bench-")
    try:
        t0 = time.perf_counter()
        corpus = write_sized_corpus(os.path.join(root, "raw"), args.size_mb)
        print(f"corpus: {corpus['n_docs']:,} documents, {corpus['bytes'] / 1e6:.1f} MB jsonl "
              f"(written in {time.perf_counter() - t0:.1f}s)")
        mode = "multi_processing" if args.workers > 1 else "in_memory"
        cfg = load_prepare_config(None, [
            f"sources=[{{name: synthetic, path: '{root}/raw/*.jsonl'}}]", f"output_dir={root}/out",
            f"tokenizer={args.tokenizer}", "overwrite=true", "num_shards=8", "filters.blocklist=[viagra]",
            "dedup.near.threshold=0.7", f"runner.workers={args.workers}", f"runner.direct_running_mode={mode}"])
        out = run(cfg)
        m, wall, busy = out["manifest"], out["wall_s"], out["busy_s"]
        t = m["totals"]
        cores = args.workers
        print(f"DirectRunner, {args.workers} worker(s) ({mode}), {os.cpu_count()} CPUs on this machine")
        print(f"wall {wall:.1f}s: {t['docs_in']:,} docs in, {t['docs_out']:,} out, {t['tokens']:,} tokens "
              f"({args.tokenizer})")
        print(f"  {t['docs_in'] / wall:,.0f} docs/s total, {t['docs_in'] / wall / cores:,.0f} docs/s per core; "
              f"{t['tokens'] / wall:,.0f} tokens/s total, {t['tokens'] / wall / cores:,.0f} tokens/s per core; "
              f"{corpus['bytes'] / 1e6 / wall / cores:.2f} MB/s per core")
        d = m["dedup"]
        print(f"  removed: filters {t['docs_in'] - sum(s['after_filters'] for s in m['sources'].values()):,}, "
              f"exact dups {d['exact']['removed']:,}, near dups {d['near']['removed']:,}")
        if busy:
            total_busy = sum(busy.values())
            print(f"busy time (summed over workers) {total_busy:.1f}s of {wall * cores:.1f} worker-seconds:")
            for group, stages in STAGE_GROUPS.items():
                s = sum(busy.get(x, 0.0) for x in stages)
                print(f"  {group:<18} {s:7.1f}s  {s / total_busy:6.1%} of busy  " +
                      " ".join(f"{x}={busy.get(x, 0.0):.1f}s" for x in stages if len(stages) > 1))
            print(f"  {'beam overhead+idle':<18} {wall * cores - total_busy:7.1f}s")
        else:
            print("(this runner reported no metrics: no per-stage split)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0
