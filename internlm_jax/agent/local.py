"""`LocalBackend`: the agent loop over a model in this process (`ij.load` / `ij.init`).

    lm = ij.load("/ckpt/internlm2-chat-7b", dtype="bfloat16")
    agent = Agent(LocalBackend(lm), [calculator_tool], interpreter=PythonInterpreter())

Each call turns the messages into the InternLM2 prompt's ids (`chat.encode_chat`: message and tool-result
text is never parsed for special tokens), generates with `lm.generate` on them (the template already starts
with <s>, so no second BOS), stops on </s>, <|im_end|> and, with tools declared,
<|action_end|>, and returns the raw completion with special tokens kept, so the loop parses it like any
other backend's text. `lm.generate` drops the stop token; when it was <|action_end|> it is put back so the
action block is closed exactly as the model wrote it.
"""

from __future__ import annotations

from typing import Any

from internlm_jax import chat
from internlm_jax.config import ConfigError


class LocalBackend:
    """Completes conversations with a local `LM`. Sampling options go to `lm.generate`; at temperature > 0
    each call uses the next seed, so repeated calls do not replay the same sample."""

    def __init__(self, lm: Any, *, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0) -> None:
        if getattr(lm, "tokenizer", None) is None:
            raise ConfigError("LocalBackend needs an LM with a tokenizer: ij.load(path, tokenizer=DIR) or "
                              "ij.init(preset, tokenizer=DIR), DIR holding tokenizer.model + tokenizer_config.json")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        self.seed = seed
        self.calls = 0

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                 interpreter: bool = False) -> str:
        from internlm_jax.api import context_limit

        tok = self.lm.tokenizer
        # Tool results and user text stay text: an "<|im_end|>" printed by code cannot end a turn.
        ids = chat.encode_chat(tok, messages, tools=tools or None, interpreter=interpreter)
        room = context_limit(self.lm.config) - len(ids)
        if room < 1:
            raise ConfigError(f"the conversation is {len(ids)} tokens, at or over the model's context of "
                              f"{context_limit(self.lm.config)}; start a new conversation or use fewer tools")
        stop_ids = tok.stop_token_ids(tools=bool(tools) or interpreter)
        gen = self.lm.generate([ids], min(self.max_new_tokens, room), stop_token_ids=stop_ids,
                               return_details=True, seed=self.seed + self.calls, **self.sampling)[0]
        self.calls += 1
        text = tok.decode(gen.token_ids, skip_special_tokens=False)
        if gen.stop_token_id is not None and gen.stop_token_id == tok.action_end_id:
            text += chat.ACTION_END
        return text
