"""Answer extraction, metrics against hand-computed values, local data loading, and the code runner's limits."""

import math
import os

import pytest

from internlm_jax.config import ConfigError
from internlm_jax.evaluate import code_exec, extract, metrics
from internlm_jax.evaluate.data import load_records
from internlm_jax.evaluate.formats import wikitext_detokenize


@pytest.mark.parametrize("text, want", [
    ("The notebooks cost 12 dollars. The answer is 14.", "14"),
    ("She has 1,234 apples, so the answer is 1,234.\nQuestion: A man has 99 cows", "1234"),  # cut, commas
    ("It was -5 degrees at night.", "-5"),
    ("The price is 3.50 dollars", "3.50"),
    ("I do not know.", "NULL"),
    ("First 3, then 4, finally 5", "5"),  # "3, 4" are not a thousands group
    ("Question: ignored 7", "NULL"),  # everything after the first "Question:" is a new few-shot item
])
def test_gsm8k_prediction(text, want):
    assert extract.gsm8k_prediction(text) == want


def test_gsm8k_reference_and_comparison():
    assert extract.gsm8k_reference("It orders 40 * 30 = <<40*30=1200>>1,200 pencils.\n#### 1,200") == "1200"
    assert extract.gsm8k_reference("#### -5") == "-5"
    with pytest.raises(ValueError, match="####"):
        extract.gsm8k_reference("no marker 5")
    assert extract.numbers_equal("18.0", "18") and extract.numbers_equal("3.50", "3.5")
    assert not extract.numbers_equal("NULL", "18") and not extract.numbers_equal("17", "18")


@pytest.mark.parametrize("text, want", [
    ("so the sum is $\\boxed{\\frac{5}{6}}$.", "\\frac{5}{6}"),
    ("$\\boxed{\\dfrac{5}{6}}$", "\\frac{5}{6}"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("each angle is \\boxed{120^\\circ}", "120"),
    ("\\boxed{x = 6}", "6"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("The answer is $7$.", "7"),
    ("\\boxed{5/6}", "\\frac{5}{6}"),
    ("\\boxed{\\text{(B)}}", "(B)"),
])
def test_math_prediction(text, want):
    assert extract.math_prediction(text) == want


@pytest.mark.parametrize("text, want", [
    ("The answer is (B).", "B"), ("答案是C", "C"), ("D. Because light keeps its frequency.", "D"),
    ("I think A is right", "A"), ("Answer: B", "B"), ("no idea", ""),
])
def test_first_option(text, want):
    assert extract.first_option(text) == want


def test_code_completion_cuts_at_stops():
    assert extract.code_completion("    return a + b\n\ndef other():\n    pass") == "    return a + b\n"
    assert extract.code_completion("```python\n    return 1\n```\n") == "    return 1"


def test_metrics_against_hand_values():
    assert metrics.f1("The cat sat", "a cat sat down") == pytest.approx(0.8)  # P 1, R 2/3 after normalising
    assert metrics.f1("猫坐着", "猫坐在垫子上") == pytest.approx(2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6))
    assert metrics.exact_match("The Answer!", "answer") == 1.0
    assert metrics.rouge_l("the cat sat", "the cat on the mat") == pytest.approx(0.5)  # LCS 2: P 2/3, R 2/5
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # p1 = 3/4, p2 = 1/3, brevity penalty exp(1 - 6/4): 100 * sqrt(1/4) * exp(-0.5)
    assert metrics.bleu(["the cat the cat"], ["the cat sat on the mat"], max_n=2) == \
        pytest.approx(100 * 0.5 * math.exp(-0.5))
    assert metrics.bleu(["the cat the cat"], ["the cat sat on the mat"]) == 0.0  # no 3-gram match
    assert metrics.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert metrics.pass_at_k(5, 4, 2) == 1.0
    assert metrics.accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)


def test_local_data_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text('"q1",x,y,A\n"q2",x,y,B\n')
    assert load_records(str(tmp_path / "a.csv"), columns=("question", "A", "B", "answer"))[1]["answer"] == "B"
    (tmp_path / "b.csv").write_text("question,answer\nq,1\n")
    assert load_records(str(tmp_path / "b.csv")) == [{"question": "q", "answer": "1"}]
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "c.parquet")
    assert load_records(str(tmp_path / "c.parquet"), limit=1) == [{"text": "a"}]
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n{broken\n')
    with pytest.raises(ConfigError, match="d.jsonl:2"):
        load_records(str(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match="never downloads"):
        load_records(str(tmp_path / "missing.jsonl"))
    assert wikitext_detokenize("a foot @-@ bridge , 42 @.@ 5 km") == "a foot-bridge, 42.5 km"


def test_subprocess_runner_limits():
    progs = [
        "assert 1 + 1 == 2\n",
        "assert 1 + 1 == 3\n",
        "while True:\n    pass\n",
        "x = bytearray(1 << 31)\n",  # 2 GiB under a 256 MiB address-space limit
        "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)\n",
        "import os\nprint(os.environ.get('SECRET_TOKEN'))\nassert os.environ.get('SECRET_TOKEN') is None\n",
    ]
    os.environ["SECRET_TOKEN"] = "should-not-leak"
    try:
        out = code_exec.run_programs(progs, backend="subprocess", timeout=2.0, memory_mb=256, workers=2)
    finally:
        del os.environ["SECRET_TOKEN"]
    assert [o.passed for o in out] == [True, False, False, False, False, True]
    assert out[1].status == "failed" and "AssertionError" in out[1].detail
    assert out[2].status == "timed out"
    assert "MemoryError" in out[3].detail
    assert "network access is disabled" in out[4].detail


@pytest.mark.skipif(not code_exec._sandbox_available(), reason="internlm_jax.agent.sandbox is not present yet")
def test_sandbox_backend_runs_checks():
    out = code_exec.run_programs(["assert sum([1, 2]) == 3\n", "assert False\n"], backend="sandbox",
                                 timeout=10.0, memory_mb=512, workers=1)
    assert [o.passed for o in out] == [True, False]
