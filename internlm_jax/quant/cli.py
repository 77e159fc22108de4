"""`internlm-jax quantize`: int4 weight-only quantization of an InternLM2 model into a quantized checkpoint.

    internlm-jax quantize --model DIR|CKPT|PRESET --out DIR [--method rtn|awq] [--group-size 128]
                          [--calib FILE.jsonl] [--calib-samples 128] [--calib-seqlen 512] [--eval FILE.jsonl]

Calibration / evaluation files are jsonl, one object per line with "text" (tokenized with the model's
tokenizer, BOS added) or "input_ids" (a list of token ids). Tokens are concatenated and cut into rows of
--calib-seqlen (as AutoAWQ does). Load the result with `ij.load(DIR)`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

from internlm_jax.config import PRESETS, ConfigError

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="internlm-jax quantize",
                                description="int4 weight-only quantization (round-to-nearest or AWQ)")
    p.add_argument("--model", required=True, help="InternLM2 HF folder, internlm-jax checkpoint, or a preset name "
                                                  "(random weights, for trying the tool)")
    p.add_argument("--out", required=True, help="folder for the quantized checkpoint")
    p.add_argument("--method", choices=("rtn", "awq"), default="rtn")
    p.add_argument("--group-size", type=int, default=128, help="rows per quantization group (32/64/128/256)")
    p.add_argument("--symmetric", action="store_true", help="no zero points (default: asymmetric with zeros)")
    p.add_argument("--targets", default="wqkv,wo,w1,w2,w3",
                   help="comma-separated linear layers to quantize (wqkv,wo,w1,w2,w3,output)")
    p.add_argument("--calib", metavar="FILE.jsonl", help="calibration data for AWQ")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration rows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration row (default 512)")
    p.add_argument("--eval", metavar="FILE.jsonl", help="held-out data: report perplexity and greedy agreement")
    p.add_argument("--eval-rows", type=int, default=16, help="held-out rows for --eval (default 16)")
    p.add_argument("--eval-seqlen", type=int, default=256, help="tokens per held-out row (default 256)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model folder)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype to load the model in before quantizing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def read_token_rows(path: str, tokenizer: Any, seqlen: int, max_rows: int) -> np.ndarray:
    """jsonl -> int32 [N, seqlen]: every line's tokens concatenated, then cut into rows (the tail dropped)."""
    if not os.path.exists(path):
        raise ConfigError(f"no such file: {path}")
    if seqlen < 2 or max_rows < 1:
        raise ConfigError(f"need seqlen >= 2 and at least one row, got seqlen={seqlen}, rows={max_rows}")
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("input_ids"), list):
                ids.extend(int(t) for t in obj["input_ids"])
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                if tokenizer is None:
                    raise ConfigError(f"{path}:{n}: a \"text\" line needs a tokenizer; pass --tokenizer DIR or give "
                                      "\"input_ids\"")
                ids.extend(tokenizer.encode(obj["text"], add_bos=True))
            else:
                raise ConfigError(f"{path}:{n}: expected an object with \"text\" (string) or \"input_ids\" (list)")
            if len(ids) >= seqlen * max_rows:
                break
    rows = min(len(ids) // seqlen, max_rows)
    if rows == 0:
        raise ConfigError(f"{path} holds {len(ids)} tokens, fewer than one row of {seqlen}; add data or lower the "
                          "sequence length")
    return np.asarray(ids[: rows * seqlen], np.int32).reshape(rows, seqlen)


def _check_jsonl(flag: str, path: str) -> None:
    """A readable jsonl file whose first line is an object with "text" or "input_ids" (cheap, before loading)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file (a jsonl file with \"text\" or \"input_ids\" lines)")
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path} cannot be read: {e}") from None
    if first is None:
        raise ConfigError(f"{flag} {path} is empty")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {path}: the first line is not JSON ({e.msg})") from None
    if not (isinstance(obj, dict) and (isinstance(obj.get("text"), str) or isinstance(obj.get("input_ids"), list))):
        raise ConfigError(f"{flag} {path}: expected lines like {{\"text\": \"...\"}} or {{\"input_ids\": [...]}}")


def _load_model(args: argparse.Namespace):
    import internlm_jax as ij
    from internlm_jax.quant.io import is_quantized_checkpoint

    if os.path.exists(args.model) and is_quantized_checkpoint(args.model):
        raise ConfigError(f"{args.model} is already a quantized checkpoint; quantize the original model")
    random_weights = not os.path.exists(args.model) and args.model in PRESETS
    return ij.load(args.model, dtype=args.dtype, tokenizer=args.tokenizer, random_weights=True), random_weights


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"internlm-jax quantize: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from internlm_jax.api import LM
    from internlm_jax.quant.int4 import check_targets, params_nbytes, quantize_params
    from internlm_jax.quant.io import save_quantized
    from internlm_jax.quant.report import accuracy_report, format_report

    targets = check_targets([t.strip() for t in args.targets.split(",") if t.strip()])
    if args.method == "awq" and not args.calib:
        raise ConfigError("--method awq needs calibration data: --calib FILE.jsonl (lines with \"text\" or "
                          "\"input_ids\")")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not args.overwrite:
        raise ConfigError(f"{out} already exists; choose a new folder or pass --overwrite")
    # Every input is checked before the model loads (loading a large checkpoint takes minutes).
    for flag, path in (("--calib", args.calib), ("--eval", args.eval)):
        if path is not None:
            _check_jsonl(flag, path)
    if not os.path.exists(args.model) and args.model not in PRESETS:
        import difflib

        near = difflib.get_close_matches(args.model, list(PRESETS), n=1)
        raise ConfigError(f"--model {args.model!r} is neither a folder nor a preset name"
                          + (f"; did you mean {near[0]!r}?" if near else ""))
    start = time.perf_counter()
    lm, random_weights = _load_model(args)
    if random_weights:
        print(f"note: {args.model!r} is a preset: quantizing random weights (for trying the tool)")
    config = lm.config
    calib = heldout = None
    if args.calib:
        calib = read_token_rows(args.calib, lm.tokenizer, args.calib_seqlen, args.calib_samples)
        print(f"calibration: {calib.shape[0]} rows x {calib.shape[1]} tokens from {args.calib}")
    if args.eval:
        heldout = read_token_rows(args.eval, lm.tokenizer, args.eval_seqlen, args.eval_rows)
    before = params_nbytes(lm.params)
    qparams, info = quantize_params(lm.params, config, group_size=args.group_size, method=args.method,
                                    calib_batches=calib, targets=targets, zero_point=not args.symmetric,
                                    progress=not args.quiet, return_info=True)
    after = params_nbytes(qparams)
    save_quantized(out, qparams, config, info, overwrite=args.overwrite)
    src = args.tokenizer or (args.model if os.path.isdir(args.model) else None)
    if src:
        for name in _TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(out, name))
    print(f"quantized {', '.join(targets)} with {args.method.upper()} int4 (group {args.group_size}, "
          f"{'symmetric' if args.symmetric else 'with zero points'}) in {time.perf_counter() - start:.1f}s")
    print(f"params: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({before / after:.2f}x smaller); "
          f"saved to {out}")
    if args.method == "awq":
        print(format_alphas(info))
    if heldout is not None:
        rep = accuracy_report(lm, LM(config, qparams, lm.tokenizer), heldout)
        print("accuracy vs the original: " + format_report(rep))
    return 0


def format_alphas(info: dict[str, Any]) -> str:
    """Per-layer AWQ alpha and calibration MSE (RTN -> AWQ) of every scale group."""
    lines = ["AWQ scales (alpha; output MSE on calibration activations, RTN -> AWQ):"]
    for group, alphas in info.get("alphas", {}).items():
        errs = info["errors"][group]
        cells = [f"L{i}: {a:.2f} ({e[0]:.3g}->{e[1]:.3g})" for i, (a, e) in enumerate(zip(alphas, errs))]
        lines.append(f"  {group:<7} " + "  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
