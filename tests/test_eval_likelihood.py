"""Likelihood scoring equals log-softmax sums from `lm.logits` computed by hand, with BOS exactly once and the
documented whitespace/merge rules at the context/continuation boundary; no dependence on batch size."""

import numpy as np
import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax.evaluate import LocalModel, rolling_windows
from internlm_jax.evaluate.likelihood import split_context_continuation


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    lm = ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)
    return LocalModel(lm, batch_size=4)


def _by_hand(lm, ids, n_cont):
    """sum over the last n_cont tokens of log_softmax(logits[t-1])[ids[t]], from lm.logits, in float64."""
    logits = lm.logits(ids).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return sum(logp[t - 1, ids[t]] for t in range(len(ids) - n_cont, len(ids)))


def test_scores_equal_hand_computed_log_softmax(model):
    tok, lm, bos = model.tokenizer, model.lm, model.bos_id
    enc = lambda s: tok.encode(s, add_bos=False)
    cases = [  # (context, continuation, the exact ids the model must read, number of continuation tokens)
        ("Question: what is the weather?\nAnswer:", " sunny", [bos] + enc("Question: what is the weather?\nAnswer:")
         + enc(" sunny"), len(enc(" sunny"))),
        # trailing space of the context moves to the continuation: same tokens as ("Answer:", " sunny")
        ("Question: what is the weather?\nAnswer: ", "sunny", [bos] + enc("Question: what is the weather?\nAnswer:")
         + enc(" sunny"), len(enc(" sunny"))),
        # empty context: the continuation is scored after BOS alone
        ("", "Hello world", [bos] + enc("Hello world"), len(enc("Hello world"))),
    ]
    # Tokens that merge across the boundary: "He" alone is one piece, but "Hello" is "H" "el" "lo", so no
    # context token survives in the whole string and all three pieces are the continuation.
    assert enc("He") == [tok.token_id("He")]
    assert enc("Hello") == [tok.token_id("H"), tok.token_id("el"), tok.token_id("lo")]
    cases.append(("He", "llo", [bos] + enc("Hello"), 3))
    # "Hel" + "lo": the context's "H" "el" is a prefix of the whole, so only "lo" is the continuation.
    assert enc("Hel") == [tok.token_id("H"), tok.token_id("el")]
    cases.append(("Hel", "lo", [bos] + enc("Hello"), 1))
    # A rendered chat prompt already starts with "<s>": BOS is not added a second time.
    cases.append(("<s>User: hi\nBot:", " hello", [bos] + enc("User: hi\nBot:") + enc(" hello"), len(enc(" hello"))))
    for ctx, cont, ids, n in cases:
        c_ids, x_ids = split_context_continuation(model.encode, bos, ctx, cont)
        assert c_ids + x_ids == ids, (ctx, cont)
        assert len(x_ids) == n and c_ids.count(bos) == 1
    results = model.loglikelihood([(c, x) for c, x, _, _ in cases])
    for (ctx, cont, ids, n), r in zip(cases, results):
        want = _by_hand(lm, ids, n)
        # fp32 forward; the scorer applies the output head per length chunk, so sums agree to fp32 rounding
        np.testing.assert_allclose(r.logprob, want, rtol=1e-5, atol=1e-4)
        assert r.num_tokens == n
        np.testing.assert_allclose(sum(r.token_logprobs), r.logprob, rtol=1e-12)
    # "Answer: " + "sunny" and "Answer:" + " sunny" are one request, so one score
    assert results[0].logprob == results[1].logprob


def test_batch_size_and_padding_do_not_change_scores(model):
    pairs = [("The quick brown fox", " jumps over the lazy dog."), ("A", " b"),
             ("Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024", " 3.14159"), ("你好，世界！", "今天天气很好"),
             ("def add(a, b):\n", "    return a + b\n"), ("x" * 40, " y"), ("Hello", ", world!")]
    ref = [model.loglikelihood([p])[0] for p in pairs]  # one at a time: batch of 4 with 3 padded rows
    for bs in (3, 8):
        m = LocalModel(model.lm, batch_size=bs)
        got = m.loglikelihood(pairs)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(b.logprob, a.logprob, rtol=1e-6, atol=1e-5)
            assert a.num_tokens == b.num_tokens and a.is_greedy == b.is_greedy


def test_is_greedy_matches_argmax(model):
    lm = model.lm
    ids = [model.bos_id] + model.encode("The model reads the prompt")
    greedy = [int(np.argmax(lm.logits(ids)[-1]))]
    r = model.score_tokens([(ids, greedy), (ids, [(greedy[0] + 1) % lm.config.vocab_size])])
    assert r[0].is_greedy and not r[1].is_greedy


def test_rolling_windows_score_every_token_once(model):
    toks = list(range(3, 40))
    for window, stride in ((8, None), (8, 3), (64, None)):
        reqs = rolling_windows(toks, 1, window, stride)
        predicted = [t for _, cont in reqs for t in cont]
        assert predicted == toks
        assert reqs[0][0] == [1]
        for ctx, cont in reqs:
            assert len(ctx) + len(cont) - 1 <= window
    # the rolling total with one big window equals the hand sum over the whole text after BOS
    text = "Tokenizers split text into pieces; byte fallback keeps every character representable."
    ids = [model.bos_id] + model.encode(text)
    total = model.loglikelihood_rolling([text], window=256)[0]
    assert total.num_tokens == len(ids) - 1
    np.testing.assert_allclose(total.logprob, _by_hand(model.lm, ids, len(ids) - 1), rtol=1e-5, atol=1e-4)
    # windows with overlap score every token once, each seeing at most `window` tokens
    windowed = model.loglikelihood_rolling([text], window=8, stride=4)[0]
    assert windowed.num_tokens == len(ids) - 1 and windowed.logprob < 0


def test_clear_errors(model):
    with pytest.raises(ij.ConfigError, match="empty continuation"):
        model.loglikelihood([("context", "")])
    short = LocalModel(model.lm, batch_size=2, max_length=8)
    with pytest.raises(ij.ConfigError, match="does not fit"):
        short.loglikelihood([("a", " " + "long text " * 10)])
    # a context too long is cut from the left with BOS kept, so the continuation is still scored
    r = short.loglikelihood([("many words of context " * 5, " end")])[0]
    assert r.num_tokens == len(model.encode(" end"))
