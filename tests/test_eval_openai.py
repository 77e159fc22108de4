"""The OpenAI-endpoint model: the same tiny model evaluated locally and through our own server (real uvicorn on
loopback) gives the same numbers on the same tasks."""

import dataclasses

import numpy as np
import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax.evaluate import (
    BUILTIN_TASKS,
    EvalConfig,
    FewShotConfig,
    GenConfig,
    LocalModel,
    ModelSpec,
    OpenAIModel,
    run_eval,
)
from internlm_jax.evaluate.openai_client import EndpointError

try:
    from internlm_jax.serve.testing import tiny_server
except ImportError as e:  # the server package is built by another part of the project
    tiny_server = None
    _why = f"internlm_jax.serve.testing is not importable ({e})"

MAX_LEN = 256  # the tiny server's context; the local model is given the same, so windows and truncation agree


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if tiny_server is None:
        pytest.skip(_why)
    tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    with tiny_server(tok_dir, preset="internlm2-tiny", seed=0, max_len=MAX_LEN) as (url, _backend):
        lm = ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)  # the same weights as the server's
        yield url, lm


@pytest.mark.slow
def test_local_and_server_give_the_same_numbers(served, tmp_path):
    url, lm = served
    local = LocalModel(lm, name="local", batch_size=8, max_length=MAX_LEN)
    remote = OpenAIModel(url + "/v1", "tiny", name="server", tokenizer=lm.tokenizer, batch_size=8,
                         max_length=MAX_LEN)
    tasks = ("ceval_sample", "hellaswag_sample", "wikitext_sample", "mmlu_sample_clp",
             dataclasses.replace(BUILTIN_TASKS["gsm8k_sample"], fewshot=FewShotConfig(k=0),
                                 gen=GenConfig(max_new_tokens=8)))
    cfg = EvalConfig(work_dir=str(tmp_path), models=(ModelSpec(name="local", preset="internlm2-tiny"),
                                                     ModelSpec(name="server", kind="openai", base_url=url + "/v1",
                                                               model="tiny")), tasks=tasks)
    res = run_eval(cfg, models={"local": local, "server": remote}, progress=False)
    assert remote.requests_sent > 0
    for name, entry in res["tasks"].items():
        a, b = entry["metrics"]["local"], entry["metrics"]["server"]
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5), (name, k)
    # per-item likelihoods agree to fp32 rounding; generations are identical text
    import json

    def preds(model, task):
        path = tmp_path / "predictions" / model / f"{task}.jsonl"
        return sorted((json.loads(x) for x in path.read_text().splitlines()), key=lambda r: r["idx"])

    for la, lb in zip(preds("local", "hellaswag_sample"), preds("server", "hellaswag_sample")):
        np.testing.assert_allclose(lb["logprobs"], la["logprobs"], rtol=1e-5, atol=1e-4)
        assert la["is_greedy"] == lb["is_greedy"]
    assert [r["raw"] for r in preds("local", "gsm8k_sample")] == [r["raw"] for r in preds("server", "gsm8k_sample")]


@pytest.mark.slow
def test_text_mode_without_a_local_tokenizer(served):
    """Without a tokenizer the prompt goes as text and the continuation is found from text offsets."""
    url, lm = served
    local = LocalModel(lm, batch_size=4, max_length=MAX_LEN)
    remote = OpenAIModel(url + "/v1", "tiny", max_length=MAX_LEN)
    pairs = [("Question: what is the weather?\nAnswer:", " sunny"), ("The quick brown fox", " jumps"),
             ("Answer: ", "yes")]
    for a, b in zip(local.loglikelihood(pairs), remote.loglikelihood(pairs)):
        assert a.num_tokens == b.num_tokens
        assert b.logprob == pytest.approx(a.logprob, rel=1e-5, abs=1e-4)


@pytest.mark.slow
def test_endpoint_errors_are_clear(served):
    url, _ = served
    with pytest.raises(EndpointError, match="HTTP 404"):
        OpenAIModel(url + "/v1", "no-such-model", max_length=MAX_LEN, retries=0).generate(["hi"], max_new_tokens=2)
    with pytest.raises(EndpointError, match="is the server running"):
        OpenAIModel("http://127.0.0.1:9/v1", "tiny", retries=0).generate(["hi"], max_new_tokens=2)


# ---- the client's request/response handling against a scripted transport (no server, runs in the quick loop)
def _scripted(handler):
    import httpx

    calls = []

    def wrapped(request):
        import json

        body = json.loads(request.content)
        calls.append((request.url.path, body))
        return handler(request.url.path, body, len(calls))

    return httpx.Client(transport=httpx.MockTransport(wrapped)), calls


def test_client_scoring_requests_and_parsing():
    import httpx

    def handler(path, body, n):
        if n == 1:
            return httpx.Response(503, json={"error": {"message": "busy"}})  # retried
        choices = []
        for i, p in enumerate(body["prompt"]):
            lps = [None] + [-0.5 * (t + 1) for t in range(1, len(p))]
            top = [None] + [{"x": lp} for lp in lps[1:]]
            top[-1] = {"x": lps[-1], "other": lps[-1] + 1.0}  # the last token was not the argmax
            choices.append({"index": i, "text": "", "logprobs": {
                "tokens": [str(t) for t in p], "token_logprobs": lps, "top_logprobs": top,
                "text_offset": list(range(len(p)))}})
        return httpx.Response(200, json={"choices": choices[::-1]})  # out of order on purpose

    client, calls = _scripted(handler)
    m = OpenAIModel("http://x/v1", "m", client=client, max_length=64, bos_id=1)
    m.retries = 1
    res = m.score_tokens([([1, 5, 6], [7, 8]), ([1], [9])])
    assert [c[0] for c in calls] == ["/v1/completions", "/v1/completions"]
    body = calls[-1][1]
    assert body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] == 1
    assert body["prompt"] == [[1, 5, 6, 7, 8], [1, 9]]
    assert res[0].logprob == pytest.approx(-0.5 * 4 - 0.5 * 5) and res[0].num_tokens == 2
    assert res[1].logprob == pytest.approx(-0.5 * 2) and res[1].num_tokens == 1
    assert not res[0].is_greedy and not res[1].is_greedy


def test_client_generation_requests():
    import httpx

    def handler(path, body, n):
        if path.endswith("/chat/completions"):
            return httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": "B. because"}}]})
        return httpx.Response(200, json={"choices": [{"index": i, "text": f"answer {i}\nQuestion: more"}
                                                     for i in range(len(body["prompt"]))]})

    client, calls = _scripted(handler)
    m = OpenAIModel("http://x/v1", "m", client=client, batch_size=2)
    out = m.generate(["q1", [{"role": "user", "content": "hi"}], "q2", "q3"], max_new_tokens=5,
                     stop=["Question:", "<1>", "<2>", "<3>", "<4>"])
    assert out == ["answer 0\n", "B. because", "answer 1\n", "answer 0\n"]
    assert calls[0][0] == "/v1/chat/completions" and calls[0][1]["messages"][0]["content"] == "hi"
    assert calls[1][1]["prompt"] == ["q1", "q2"] and calls[1][1]["stop"] == ["Question:", "<1>", "<2>", "<3>"]
    assert calls[1][1]["max_tokens"] == 5 and calls[1][1]["temperature"] == 0.0
