"""OpenAI-compatible serving: the FastAPI app over the Engine, the `serve` and `chat` commands, a web chat page.

    from internlm_jax.serve import Backend, ServeConfig, create_app, ServerThread
    app = create_app(Backend(engine, tokenizer, ServeConfig(model_name="internlm2-chat-7b")))
    with ServerThread(app, port=23333) as srv: ...        # or: internlm-jax serve --model ...

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics, GET /
(web chat). See app.py for the error contract, openai_chat.py for tools / JSON mode, openai_completions.py
for echo + logprobs (lm-eval), backend.py for the bounded queue and aborts.
"""

from internlm_jax.serve.app import create_app
from internlm_jax.serve.backend import Backend, Generation, ServeConfig
from internlm_jax.serve.errors import APIError
from internlm_jax.serve.server import ServerThread, serve_forever

__all__ = ["APIError", "Backend", "Generation", "ServeConfig", "ServerThread", "create_app", "serve_forever"]
