"""The model interface the evaluators use, and the local implementation over an `ij.LM`.

An `EvalModel` answers three kinds of question, as lm-eval's model API does:
- `loglikelihood([(context, continuation)])` -> ScoreResult per pair (`score_tokens` on token ids underneath);
- `loglikelihood_rolling([text])` -> total log-probability of each text scored in windows;
- `generate([prompt], ...)` -> text per prompt, cut at stop strings.
A prompt is either a plain string (sent as is, BOS added once) or a list of chat messages (rendered with the
InternLM2 chat template for local models; sent to /v1/chat/completions by the OpenAI client).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from internlm_jax.config import ConfigError
from internlm_jax.evaluate.likelihood import (
    Scorer,
    ScoreResult,
    TokenRequest,
    rolling_windows,
    split_context_continuation,
    with_bos,
)

Prompt = str | list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class RollingResult:
    logprob: float
    num_tokens: int


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    from internlm_jax import chat as chat_lib

    return chat_lib.render(list(messages), add_generation_prompt=True)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


class EvalModel:
    """Base class: subclasses implement `score_tokens` and `generate`; the rest is shared."""

    name: str = "model"
    tokenizer: Any = None
    bos_id: int = 1
    max_length: int = 2048

    # ---- tokenisation ------------------------------------------------------------------------------
    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise ConfigError(f"model {self.name!r} has no tokenizer; likelihood tasks need one (give `tokenizer:`"
                              " in the model config)")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS (special-token strings such as <|im_start|> become their ids)."""
        return list(self._tok().encode(text, add_bos=False))

    def prompt_text(self, prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else render_chat(prompt)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """A text prompt is encoded as given; a chat through chat.encode_chat (message text stays text)."""
        if isinstance(prompt, str):
            return with_bos(self.encode(prompt), self.bos_id)
        from internlm_jax import chat as chat_lib

        return with_bos(chat_lib.encode_chat(self._tok(), list(prompt), add_generation_prompt=True), self.bos_id)

    def split(self, context: Prompt, continuation: str) -> TokenRequest:
        return split_context_continuation(self.encode, self.bos_id, self.prompt_text(context), continuation)

    # ---- likelihood ----------------------------------------------------------------------------------
    def score_tokens(self, requests: Sequence[TokenRequest]) -> list[ScoreResult]:
        raise NotImplementedError

    def loglikelihood(self, pairs: Sequence[tuple[Prompt, str]]) -> list[ScoreResult]:
        return self.score_tokens([self.split(c, x) for c, x in pairs])

    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: Sequence[Sequence[int]]
                            ) -> list[np.ndarray]:
        """log p(candidate | context) for single candidate tokens; by default one scored request each."""
        flat = [(list(c), [int(t)]) for c, cands in zip(contexts, candidates) for t in cands]
        scores = iter(self.score_tokens(flat))
        return [np.array([next(scores).logprob for _ in cands]) for cands in candidates]

    def loglikelihood_rolling(self, texts: Sequence[str], window: int | None = None, stride: int | None = None
                              ) -> list[RollingResult]:
        window = window or self.max_length
        per_text = [rolling_windows(self.encode(t), self.bos_id, window, stride) for t in texts]
        flat = [r for reqs in per_text for r in reqs]
        scores = iter(self.score_tokens(flat))
        out = []
        for reqs in per_text:
            s = [next(scores) for _ in reqs]
            out.append(RollingResult(sum(x.logprob for x in s), sum(x.num_tokens for x in s)))
        return out

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[str]:
        raise NotImplementedError


class LocalModel(EvalModel):
    """An `ij.LM` (or params + config + tokenizer): likelihood through the jitted forward, generation through
    `generator.generate(...)` (the LM itself by default; the engine, or anything with LM.generate's
    signature, can stand in)."""

    def __init__(self, lm: Any, *, name: str = "local", batch_size: int = 8, max_length: int | None = None,
                 generator: Any = None, gen_batch_size: int | None = None):
        self.lm = lm
        self.name = name
        self.tokenizer = lm.tokenizer
        self.bos_id = lm.config.bos_token_id
        self.scorer = Scorer(lm.params, lm.config, batch_size=batch_size, max_length=max_length,
                             mesh=getattr(lm, "mesh", None))
        self.max_length = self.scorer.max_length
        self.generator = generator if generator is not None else lm
        self.gen_batch_size = gen_batch_size or batch_size

    def score_tokens(self, requests: Sequence[TokenRequest]) -> list[ScoreResult]:
        return self.scorer.score(requests)

    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: Sequence[Sequence[int]]
                            ) -> list[np.ndarray]:
        return self.scorer.next_token_logprobs(contexts, candidates)

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[str]:
        stop = list(stop)
        if any(not isinstance(p, str) for p in prompts):
            stop = stop + [s for s in ("<|im_end|>",) if s not in stop]
        budget = self.max_length - max_new_tokens
        if budget < 2:
            raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_length "
                              f"{self.max_length}")
        # Over-long prompts lose their oldest tokens (BOS kept), as OpenCompass truncates from the left.
        ids = [p if len(p) <= budget else [self.bos_id] + p[len(p) - budget + 1:]
               for p in (self.prompt_ids(q) for q in prompts)]
        out: list[str] = []
        # An ij.LM compiles one program per batch size: the last, partial batch is topped up with copies of
        # its last prompt (their outputs are dropped) so every batch has the same shape.
        pad = self.generator is self.lm
        for s in range(0, len(ids), self.gen_batch_size):
            batch = ids[s: s + self.gen_batch_size]
            n = len(batch)
            if pad and len(ids) > self.gen_batch_size:
                batch = batch + [batch[-1]] * (self.gen_batch_size - n)
            texts = self.generator.generate(batch, max_new_tokens, temperature=temperature, top_p=top_p,
                                            top_k=top_k, seed=seed + s, stop=stop or None)
            out.extend(cut_at_stop(t, stop) for t in texts[:n])
        return out


class EngineGenerator:
    """`internlm_jax.engine.Engine` behind LM.generate's signature, so LocalModel(lm, generator=...) can
    generate through continuous batching over the paged KV cache (the whole list is submitted at once; the
    scheduler batches it)."""

    def __init__(self, engine: Any, tokenizer: Any = None):
        self.engine = engine
        self.tokenizer = tokenizer

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] | None = None,
                 **_: Any) -> list[str]:
        from internlm_jax.engine import SamplingParams

        stop_ids: tuple[int, ...] = ()
        im_end = getattr(self.tokenizer, "im_end_id", None) if self.tokenizer is not None else None
        if im_end is not None:
            stop_ids = (int(im_end),)  # chat answers end with <|im_end|>, as LM.generate stops on it too
        sampling = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                   seed=seed + i, stop=tuple(stop or ()), stop_token_ids=stop_ids)
                    for i in range(len(prompts))]
        outs = self.engine.generate([list(p) for p in prompts], sampling)
        return [o.outputs[0].text for o in outs]
