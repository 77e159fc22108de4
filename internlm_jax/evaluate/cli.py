"""`internlm-jax eval`: run a YAML eval config, list the built-in tasks, or rebuild a summary."""

from __future__ import annotations

import argparse
import json
import os
import sys

from internlm_jax.config import ConfigError

USAGE = """usage:
  internlm-jax eval CONFIG.yaml [key=value ...]   evaluate the config's models x tasks (and needle test)
  internlm-jax eval tasks                         list the built-in sample tasks
  internlm-jax eval summary WORK_DIR              rebuild summary.{md,csv,txt,png} from WORK_DIR/results.json

Predictions are cached in WORK_DIR/predictions; rerunning the same command resumes where it stopped."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        if argv[0] == "tasks":
            from internlm_jax.evaluate.tasks import BUILTIN_TASKS

            for name, t in BUILTIN_TASKS.items():
                print(f"{name:<20} format={t.format:<10} inferencer={t.inferencer or 'default':<8} {t.data.path}")
            return 0
        if argv[0] == "summary":
            if len(argv) != 2:
                print(USAGE, file=sys.stderr)
                return 2
            from internlm_jax.evaluate.summary import summary_rows, to_text, write_summary

            path = os.path.join(argv[1], "results.json")
            if not os.path.exists(path):
                raise ConfigError(f"no results.json in {argv[1]}: run an evaluation into that work_dir first")
            with open(path) as f:
                results = json.load(f)
            write_summary(results, argv[1])
            print(to_text(*summary_rows(results)))
            return 0
        parser = argparse.ArgumentParser(prog="internlm-jax eval", add_help=False)
        parser.add_argument("config")
        parser.add_argument("overrides", nargs="*")
        parser.add_argument("--no-progress", action="store_true")
        args = parser.parse_args(argv)
        from internlm_jax.evaluate.runner import load_eval_config, run_eval
        from internlm_jax.evaluate.summary import summary_rows, to_text

        cfg = load_eval_config(args.config, args.overrides)
        results = run_eval(cfg, base_dir=os.path.dirname(os.path.abspath(args.config)),
                           progress=not args.no_progress)
        print(to_text(*summary_rows(results)))
        print(f"results: {os.path.join(cfg.work_dir, 'results.json')}; summary: "
              f"{os.path.join(cfg.work_dir, 'summary.md')}")
        failed = [f"{task} ({', '.join(sorted(entry['errors']))})" for task, entry in results["tasks"].items()
                  if entry.get("errors")]
        if failed:  # the others were scored and written; say so in the exit code for scripts
            print(f"internlm-jax eval: {len(failed)} task(s) failed: {'; '.join(failed)} (see results.json)",
                  file=sys.stderr)
            return 1
        return 0
    except ConfigError as e:
        print(f"internlm-jax eval: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
