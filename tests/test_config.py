"""ModelConfig <-> HF config.json: rope_scaling types (dynamic, linear, the old `rotary` key, transformers 5's
`rope_parameters`) and the execution-only fields that must stay out of config.json (max_context)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from internlm_jax.config import ConfigError, ModelConfig, get_preset

TINY_HF = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 96, "vocab_size": 128, "max_position_embeddings": 256, "rope_theta": 1e4}


@pytest.mark.parametrize("scaling,want", [
    ({"type": "linear", "factor": 4}, ("linear", 4.0)),
    ({"rope_type": "linear", "factor": 2.5}, ("linear", 2.5)),
    ({"type": "dynamic", "factor": 2.0}, ("dynamic", 2.0)),
    ({"type": "linear"}, ("linear", 1.0)),
    (None, None),
])
def test_rope_scaling_parses_and_round_trips(scaling, want):
    config = ModelConfig.from_hf_config({**TINY_HF, "rope_scaling": scaling})
    assert config.rope_scaling == want
    hf = config.to_hf_config()
    assert hf["rope_scaling"] == (None if want is None else {"type": want[0], "factor": want[1]})
    assert ModelConfig.from_hf_config(json.loads(json.dumps(hf))) == config


def test_linear_rope_from_transformers5_rope_parameters():
    hf = {**TINY_HF, "rope_theta": None, "rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    del hf["rope_theta"]
    config = ModelConfig.from_hf_config(hf)
    assert config.rope_scaling == ("linear", 8.0) and config.rope_scaling[0] == "linear"
    assert config.rope_theta == 1e6


@pytest.mark.parametrize("scaling,match", [
    ({"type": "yarn", "factor": 4.0}, "unsupported rope_scaling .*'linear'"),
    ({"type": "linear", "factor": 0.5}, "factor must be a number >= 1.0"),
    ({"type": "linear", "factor": "2"}, "factor must be a number >= 1.0"),
])
def test_bad_rope_scaling_is_refused(scaling, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_config({**TINY_HF, "rope_scaling": scaling})


def test_rope_scaling_checked_on_construction():
    assert get_preset("internlm2-tiny", rope_scaling=("linear", 2.0)).rope_scaling == ("linear", 2.0)
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not supported.*'linear'"):
        get_preset("internlm2-tiny", rope_scaling=("yarn", 2.0))


def test_max_context_is_a_field_but_not_in_config_json():
    config = ModelConfig.from_hf_config({**TINY_HF, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert config.max_context is None
    longer = config.replace(max_context=4096)
    assert longer.max_context == 4096 and longer != config
    assert "max_context" not in longer.to_hf_config()
    assert longer.to_hf_config() == config.to_hf_config()
    assert ModelConfig.from_hf_config(TINY_HF, max_context=1000).max_context == 1000
    assert len({config, longer, config.replace()}) == 2  # hashable: usable as a jit static argument
    with pytest.raises(dataclasses.FrozenInstanceError):
        longer.max_context = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="max_context must be positive"):
        config.replace(max_context=0)
