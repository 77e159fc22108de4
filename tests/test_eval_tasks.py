"""Shipped sample tasks give hand-checkable scores on a tiny model whose weights always prefer one token.

The biased model: attention and MLP outputs zeroed (wo = w2 = 0), every embedding row = ones, and an output
head that is zero except one column. The final hidden state is then the same constant vector at every
position, so every position's logits are `big` for the favoured token and 0 elsewhere, whatever the text.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax.evaluate import BUILTIN_TASKS, EvalModel, FewShotConfig, GenConfig, LocalModel, load_task
from internlm_jax.evaluate.inferencers import run_inferencer
from internlm_jax.evaluate.scoring import score_task

STRENGTH = 10.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    return ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)


def biased(base_lm, token_id):
    p, cfg = base_lm.params, base_lm.config
    layers = dict(p["layers"], wo=jnp.zeros_like(p["layers"]["wo"]), w2=jnp.zeros_like(p["layers"]["w2"]))
    out = jnp.zeros_like(p["output"]).at[:, token_id].set(STRENGTH / cfg.hidden_size)
    params = dict(p, layers=layers, embed=jnp.ones_like(p["embed"]), output=out)
    return ij.LM(cfg, params, base_lm.tokenizer)


def _logit(cfg):
    # rmsnorm(ones) = 1 / sqrt(1 + eps); D of those times STRENGTH / D
    return STRENGTH / math.sqrt(1.0 + cfg.rms_norm_eps)


def _run(task, model):
    recs = run_inferencer(task, model, list(range(len(task))))
    return score_task(task, recs)[0], recs


def _fraction(task, letter):
    golds = [s["answer"] for s in task.samples]
    return 100.0 * sum(g == "ABCD".index(letter) for g in golds) / len(golds)


@pytest.mark.parametrize("name", ["mmlu_sample", "mmlu_sample_clp", "ceval_sample", "cmmlu_sample"])
def test_always_one_letter_scores_that_letters_share(base, name):
    task = load_task(name)
    tok = base.tokenizer
    seen = set()
    for letter in "ABCD":
        model = LocalModel(biased(base, tok.token_id(letter)), batch_size=8)
        scores, recs = _run(task, model)
        assert all(r["pred"] == "ABCD".index(letter) for r in recs)
        assert scores["accuracy"] == pytest.approx(_fraction(task, letter), abs=1e-9)
        seen.add(scores["accuracy"])
    assert len(seen) > 1  # the sample files do not have a constant answer


def test_generation_tasks_with_a_one_token_model(base):
    tok = base.tokenizer
    # GSM8K: the model always says "8"; exactly one sample question has the answer 8.
    gsm = load_task(dataclasses.replace(BUILTIN_TASKS["gsm8k_sample"], fewshot=FewShotConfig(k=0),
                                        gen=GenConfig(max_new_tokens=1)))
    scores, recs = _run(gsm, LocalModel(biased(base, tok.token_id("8")), batch_size=8))
    assert [r["raw"] for r in recs] == ["8"] * len(gsm)
    assert scores["accuracy"] == pytest.approx(100.0 * [s["reference"] for s in gsm.samples].count("8") / len(gsm))
    assert scores["accuracy"] == pytest.approx(12.5)
    # MMLU in generation mode: the model always says "B"; the letter is extracted and compared.
    mc = load_task(dataclasses.replace(BUILTIN_TASKS["mmlu_sample_gen"], gen=GenConfig(max_new_tokens=1)))
    scores, _ = _run(mc, LocalModel(biased(base, tok.token_id("B")), batch_size=8))
    assert scores["accuracy"] == pytest.approx(_fraction(mc, "B"))


def test_ll_and_rolling_values_follow_token_counts(base):
    tok, cfg = base.tokenizer, base.config
    space = tok.token_id("\u2581")
    model = LocalModel(biased(base, space), batch_size=8)
    logit = _logit(cfg)
    lse = math.log(math.exp(logit) + cfg.vocab_size - 1)
    # HellaSwag (ll): a choice's log-likelihood is -n * lse + logit * (number of "▁" tokens in it)
    task = load_task("hellaswag_sample")
    scores, recs = _run(task, model)
    for r in recs:
        for cont, lp in zip(task.continuations(r["idx"]), r["logprobs"]):
            ids = model.split(task.prompt(r["idx"]), cont)[1]
            want = -len(ids) * lse + logit * ids.count(space)
            assert lp == pytest.approx(want, rel=1e-5)
    expect = [int(np.argmax(r["logprobs"])) == r["gold"] for r in recs]
    assert scores["accuracy"] == pytest.approx(100.0 * np.mean(expect))
    # WikiText (rolling): the same formula over every token of every document
    wiki = load_task("wikitext_sample")
    scores, recs = _run(wiki, model)
    total = words = 0
    for s in wiki.samples:
        ids = model.encode(s["text"])
        total += -len(ids) * lse + logit * ids.count(space)
        words += len(s["text"].split())
    assert scores["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-4)


class _Oracle(EvalModel):
    """Generation stand-in: answers each HumanEval prompt with a given completion (plus trailing junk that the
    stop strings must cut)."""

    def __init__(self, answers):
        self.answers = answers
        self.name = "oracle"

    def generate(self, prompts, *, max_new_tokens, stop=(), **kw):
        return [self.answers[p] + "\n\ndef unrelated():\n    raise SystemExit(1)\n" for p in prompts]


def test_humaneval_pass_at_1_runs_the_tests(base):
    task = load_task(dataclasses.replace(BUILTIN_TASKS["humaneval_sample"], exec_backend="subprocess"))
    answers = {s["prompt"]: s["canonical_solution"] for s in task.samples}
    scores, _ = _run(task, _Oracle(answers))
    assert scores["pass@1"] == 100.0
    wrong = dict(answers)
    wrong[task.samples[1]["prompt"]] = "    return False\n"  # fails is_palindrome's tests
    wrong[task.samples[2]["prompt"]] = "    while True:\n        pass\n"  # never returns: timed out
    task = load_task(dataclasses.replace(task.config, exec_timeout=2.0))
    recs = run_inferencer(task, _Oracle(wrong), list(range(len(task))))
    scores, details = score_task(task, recs)
    assert scores["pass@1"] == 50.0
    assert [d["status"][0] for d in details] == ["passed", "failed", "timed out", "passed"]


def test_generator_object_stands_in_for_lm_generate(base):
    class Recorder:
        def __init__(self):
            self.calls = []

        def generate(self, prompts, max_new_tokens, **kw):
            self.calls.append((prompts, max_new_tokens, kw))
            return ["The answer is 14.\nQuestion: next" for _ in prompts]

    rec = Recorder()
    task = load_task(dataclasses.replace(BUILTIN_TASKS["gsm8k_sample"], fewshot=FewShotConfig(k=0)))
    scores, recs = _run(task, LocalModel(base, generator=rec, batch_size=8))
    ids = rec.calls[0][0][0]
    assert ids[0] == base.config.bos_token_id and ids.count(base.config.bos_token_id) == 1
    assert rec.calls[0][2]["stop"] == list(task.stop)
    assert recs[0]["raw"] == "The answer is 14.\n" and recs[0]["pred"] == "14"
    assert scores["accuracy"] == pytest.approx(12.5)


def test_chat_template_prompts(base):
    from internlm_jax.chat import render

    cfg = dataclasses.replace(BUILTIN_TASKS["mmlu_sample"], chat=True, system="Answer with a letter.")
    task = load_task(cfg)
    msgs = task.prompt(0)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == "A" and task.continuations(0) == ["A", "B", "C", "D"]
    model = LocalModel(biased(base, base.tokenizer.token_id("C")), batch_size=8)
    ctx, cont = model.split(msgs, "C")
    text = render(msgs, add_generation_prompt=True)
    assert text.startswith("<s>") and text.endswith("<|im_start|>assistant\n")
    assert ctx == base.tokenizer.encode(text, add_bos=False) and ctx.count(model.bos_id) == 1
    assert cont == [base.tokenizer.token_id("C")]
    scores, _ = _run(task, model)
    assert scores["accuracy"] == pytest.approx(_fraction(task, "C"))
