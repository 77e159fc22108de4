"""Shared test fixtures: tiny artefacts built in-process so that no test needs the network.

`make_tokenizer_dir(path, vocab_size=1024)` trains a small SentencePiece BPE model with InternLM2's settings
and writes an InternLM2-shaped tokenizer folder (tokenizer.model + tokenizer_config.json +
special_tokens_map.json). Other helpers import it; keep its signature stable.
"""

from __future__ import annotations

import os
import random

from internlm_jax.tokenizer_train import (  # noqa: F401
    CHAT_SPECIAL_TOKENS,
    RAW_SPECIAL_PIECES,
    tokenizer_config,
    train_model_proto,
    write_tokenizer_dir,
)

MIN_VOCAB_SIZE = 512  # 3 control + 256 byte pieces + 6 chat pieces + the corpus characters
MAX_VOCAB_SIZE = 6144  # the synthetic corpus runs out of BPE merges a little above this

_BASE_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "InternLM2 is a family of open large language models trained on trillions of tokens.",
    "Tokenizers split text into pieces; byte fallback keeps every character representable.",
    "Please tell me the weather in Shanghai today, and whether I need an umbrella.",
    "I will look it up. The temperature is 22 degrees and the sky is clear.",
    "A transformer block has attention, a feed forward network and two normalisation layers.",
    "The model reads the prompt, then writes its answer one token at a time.",
    "Hello, world! How are you doing this morning? I'm fine, thanks.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "上海人工智能实验室发布了书生·浦语大模型。",
    "我会查一下。上海今天的温度是二十二度，天气晴朗。",
    "语言模型可以回答问题、写代码、翻译文章，也可以调用工具。",
    "请用中文回答：一加一等于几？答案是二。",
    "机器学习和数据科学用于展示模型训练和数据可视化。",
    "北京、上海、广州和深圳是中国的大城市。",
    "🙂 Have a nice day! 🎉 Congratulations! 👍 Great job.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -7 1e-5 92544",
    "Order #12345 costs $67.89 and ships on 2024-05-17 at 08:30.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    ('import json\nprint(json.dumps({"name": "get_current_weather", "parameters": '
     '{"location": "Shanghai"}}))\n'),
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "if x > 0 and y < 10:\n    result = [v for v in values if v is not None]\n",
    "{\"temperature\": 22, \"unit\": \"celsius\", \"description\": \"sunny\"}",
    "SELECT name, age FROM users WHERE age >= 18 ORDER BY name;",
    "```python\nimport math\nprint(math.sqrt(2))\n```",
]
_EN_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "that", "with", "as", "on", "by", "at", "from",
    "this", "be", "are", "it", "an", "or", "which", "have", "one", "model", "language", "token", "data",
    "train", "test", "value", "answer", "question", "weather", "city", "temperature", "tool", "function",
    "call", "result", "python", "code", "user", "system", "assistant", "environment", "number", "list",
    "string", "file", "learning", "attention", "layer", "vector", "matrix", "batch", "length", "width",
    "head", "query", "key", "cache", "memory", "quickly", "slowly", "running", "jumped", "bigger",
    "smaller", "information", "people", "between", "important",
)
_ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下"
    "过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都"
    "两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重"
    "新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想"
    "已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知"
    "较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理"
)
_EMOJI = "🙂🎉👍🚀❤️😂🤖🌏"


def _corpus(seed: int = 0, zh_chars: int = len(_ZH_CHARS)) -> list[str]:
    """A small multilingual corpus: hand-written lines plus seeded synthetic sentences for enough BPE merges.

    `zh_chars` limits the distinct Chinese characters of the synthetic lines (small vocabularies).
    """
    rng = random.Random(seed)
    zh = _ZH_CHARS[:zh_chars]
    lines = list(_BASE_LINES) * 4
    for _ in range(600):
        kind = rng.random()
        if kind < 0.5:
            words = [rng.choice(_EN_WORDS) for _ in range(rng.randint(4, 14))]
            lines.append(" ".join(words).capitalize() + rng.choice(".?!,"))
        elif kind < 0.8:
            lines.append("".join(rng.choice(zh) for _ in range(rng.randint(6, 20))) + rng.choice("。？！，"))
        elif kind < 0.9:
            name = rng.choice(_EN_WORDS)
            a, b = rng.randint(0, 99), rng.randint(0, 999)
            lines.append(f"def {name}_{a}(x, y):\n    return x * {b} + y\n")
        else:
            lines.append(f"{rng.choice(_EN_WORDS)} {rng.randint(0, 10**6)} {rng.choice(_EMOJI)}")
    return lines


_MODEL_CACHE: dict[int, bytes] = {}


def _train_model(vocab_size: int) -> bytes:
    """Train (once per vocab size) and return the serialized model proto with the chat pieces at the end."""
    if vocab_size in _MODEL_CACHE:
        return _MODEL_CACHE[vocab_size]
    # Small vocabularies cannot hold every character of the corpus as a piece: lower the number of distinct
    # Chinese characters until they fit (rare characters fall back to byte pieces, which the tests want).
    for zh_chars in (len(_ZH_CHARS), 200, 100, 50, 20):
        try:
            _MODEL_CACHE[vocab_size] = train_model_proto(_corpus(zh_chars=zh_chars), vocab_size)
            return _MODEL_CACHE[vocab_size]
        except ValueError:
            continue
    raise ValueError(f"vocab_size {vocab_size} is too small for the fixture corpus; use >= {MIN_VOCAB_SIZE}")


def make_tokenizer_dir(path: str | os.PathLike, vocab_size: int = 1024, *, chat_tokens: bool = True) -> str:
    """Write a tiny InternLM2-style tokenizer into `path` (created if needed) and return the path as str.

    Pieces: <unk>=0, <s>=1, </s>=2, 256 byte pieces, BPE merges, and `[UNUSED_TOKEN_141]`..
    `[UNUSED_TOKEN_146]` at the last six ids, which tokenizer_config.json names <|plugin|> .. <|im_start|>
    (as in the release). vocab_size must lie in [MIN_VOCAB_SIZE, MAX_VOCAB_SIZE] = [512, 6144].
    `chat_tokens=False` writes a config without those names (to test the error path). Training takes well
    under a second and is cached per vocab size within the process.
    """
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] for the fixture corpus "
                         f"(256 byte pieces + specials + its characters; enough merges), got {vocab_size}")
    return write_tokenizer_dir(path, _train_model(vocab_size), vocab_size, chat_tokens=chat_tokens)
