"""YAML run configs: nested dataclasses, overrides, unknown keys with the nearest valid key, type checks."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import pytest

from internlm_jax.config import ConfigError
from internlm_jax.runconfig import apply_overrides, dump_yaml, from_dict, load_config, parse_yaml, to_dict


@dataclasses.dataclass(frozen=True)
class Opt:
    lr: float = 1e-3
    schedule: Literal["cosine", "wsd"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)


@dataclasses.dataclass(frozen=True)
class Src:
    path: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Run:
    steps: int = 10
    name: str = "x"
    flag: bool = False
    init: str | None = None
    opt: Opt = dataclasses.field(default_factory=Opt)
    sources: tuple[Src, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_load_nested_with_overrides(tmp_path):
    path = _write(tmp_path, "steps: 5\nopt:\n  lr: 3e-4\n  betas: [0.8, 0.9]\nsources:\n  - {path: a.jsonl}\n")
    cfg = load_config(Run, path, ["opt.schedule=wsd", "flag=true", "sources=[{path: b, weight: 2}]",
                                  "extra.k=[1, 2]", "init=null"])
    assert cfg.steps == 5
    assert cfg.opt == Opt(lr=3e-4, schedule="wsd", betas=(0.8, 0.9))  # 3e-4 is a float despite YAML 1.1
    assert cfg.flag is True and cfg.init is None
    assert cfg.sources == (Src("b", 2.0),)  # int widened to float
    assert cfg.extra == {"k": [1, 2]}


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'opt\.lrr'.*did you mean 'opt\.lr'"):
        load_config(Run, _write(tmp_path, "opt: {lrr: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"'stepz'.*did you mean 'steps'"):
        load_config(Run, None, ["stepz=3"])


@pytest.mark.parametrize("override, message", [
    ("steps=ten", r"steps must be an integer, got 'ten'"),
    ("steps=true", r"steps must be an integer"),
    ("flag=1", r"flag must be true or false"),
    ("opt.lr=fast", r"opt\.lr must be a number"),
    ("opt.schedule=linear", r"opt\.schedule must be one of 'cosine', 'wsd'"),
    ("opt.betas=[0.9]", r"opt\.betas must have 2 entries"),
    ("name=3", r"name must be a string"),
    ("steps=0", r"steps must be positive"),
    ("opt=3", r"opt must be a mapping"),
    ("sources=[{weight: 2}]", r"sources\[0\] lacks required key.*sources\[0\]\.path"),
    ("noequals", r"must look like key=value"),
])
def test_type_errors_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, [override])


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"name is a str, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, _write(tmp_path, "steps: [1\n"))
    with pytest.raises(ConfigError, match="mapping of keys at the top level"):
        load_config(Run, _write(tmp_path, "- 1\n- 2\n"))


def test_to_dict_round_trips():
    cfg = Run(steps=3, opt=Opt(lr=0.5, betas=(0.1, 0.2)), sources=(Src("p"),), extra={"a": 1})
    again = from_dict(Run, parse_yaml(dump_yaml(cfg)))
    assert again == cfg
    assert to_dict(cfg)["opt"]["betas"] == [0.1, 0.2]


def test_train_config_uses_data_config_shorthands(tmp_path):
    from internlm_jax.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["data.sources=corpus.jsonl", "data.seq_len=64", "optimizer.lr=3e-4",
                                          "mesh.fsdp=2", "model.overrides.dtype=bfloat16"])
    assert cfg.data.sources[0].path == "corpus.jsonl" and cfg.data.seq_len == 64
    assert cfg.optimizer.lr == 3e-4 and cfg.mesh.fsdp == 2
    assert cfg.model.build().dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"data\.seqlen.*did you mean 'data\.seq_len'"):
        load_config(TrainConfig, None, ["data.sources=c.jsonl", "data.seqlen=64"])
    with pytest.raises(ConfigError, match=r"model\.overrides\.remap.*did you mean model\.overrides\.remat"):
        load_config(TrainConfig, None, ["model.overrides.remap=full"])
    with pytest.raises(ConfigError, match=r"remat must be one of"):
        load_config(TrainConfig, None, ["model.overrides.remat=some"]).model.build()
    with pytest.raises(ConfigError, match=r"multiple of grad_accum"):
        load_config(TrainConfig, None, ["global_batch_size=6", "grad_accum=4"])
    with pytest.raises(ConfigError, match=r"unknown model preset 'internlm2-tinny'.*internlm2-tiny"):
        load_config(TrainConfig, None, ["model.name=internlm2-tinny"]).model.build()


def test_shipped_pretrain_configs_load():
    import glob
    import os

    from internlm_jax.train.config import TrainConfig

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert {os.path.basename(p) for p in paths} >= {"tiny.yaml", "internlm2_1_8b.yaml", "internlm2_7b.yaml",
                                                   "internlm2_20b.yaml"}
    for p in paths:
        import yaml

        manifest = (yaml.safe_load(open(p)).get("data") or {}).get("manifest")
        if manifest and not os.path.exists(manifest):
            # a config over a prepared corpus reads its manifest when loaded: before `data prepare` ran, the
            # error says to run it
            with pytest.raises(ConfigError, match="run `internlm-jax data prepare` first"):
                load_config(TrainConfig, p)
            continue
        cfg = load_config(TrainConfig, p)
        model = cfg.model.build()
        assert cfg.data is not None and cfg.steps > 0, p
        assert cfg.global_batch_size % cfg.grad_accum == 0, p
        assert model.num_layers >= 2
