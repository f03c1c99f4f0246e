"""Config: precedence, overrides, unknown keys, types, help texts, method switching."""

from __future__ import annotations

import dataclasses

import pytest

from lrx.config import SECTIONS, field_help, load_config, save_config
from lrx.errors import ConfigError
from lrx.methods import available_methods, get_method_class


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_cli_precedence(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n  batch_size: 4\nmethod:\n  name: pissa\n  r: 4\n")
    cfg = load_config(path, ["train.lr=2e-4", "method.alpha=8"])
    assert cfg.train.lr == 2e-4  # CLI beats YAML
    assert cfg.train.batch_size == 4  # YAML beats default
    assert cfg.train.epochs == 1.0  # default
    assert cfg.method.name == "pissa" and cfg.method.r == 4 and cfg.method.alpha == 8
    assert cfg.method.scale == 2.0


def test_cli_method_flag_wins_and_drops_foreign_yaml_keys(tmp_path, caplog):
    path = write(tmp_path, "method:\n  name: pissa\n  r: 4\n  svd: randomized\n")
    cfg = load_config(path, [], method="lora")
    assert cfg.method.name == "lora" and cfg.method.r == 4
    assert not hasattr(cfg.method, "svd")
    assert "svd" in caplog.text


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; valid keys of 'train': lr,"),
        ("trian.lr=1", "unknown config section 'trian'"),
        ("train.batch_size=eight", "train.batch_size: expected int, got 'eight'"),
        ("train.batch_size=1.5", "expected int"),
        ("train.lr=fast", "train.lr: expected float"),
        ("train.bf16=maybe", "train.bf16: expected bool"),
        ("train.schedule=step", "train.schedule: 'step' is not one of linear, cosine, constant"),
        ("method.r=0", "r must be >= 1"),
        ("method.name=dora", "unknown method 'dora'; available methods: eigenlorax, lora, pissa, srlora"),
        ("lr=1", "bad override 'lr=1'"),
        ("method.svd=exact", "unknown config key 'method.svd'"),  # a pissa key under lora
    ],
)
def test_bad_overrides_name_the_problem(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_types_are_coerced_from_cli_strings():
    cfg = load_config(None, ["train.bf16=false", "method.target_modules=[query, value]",
                             "data.max_train_samples=none", "train.adam_betas=0.9,0.95", "train.epochs=3"])
    assert cfg.train.bf16 is False
    assert cfg.method.target_modules == ["query", "value"]
    assert cfg.data.max_train_samples is None
    assert cfg.train.adam_betas == [0.9, 0.95]
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("train: [1, 2\n", "malformed YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("optimizer:\n  lr: 1\n", "unknown config section 'optimizer'"),
        ("train:\n  warmup: 10\n", "unknown config key 'train.warmup'"),
        ("train: 3\n", "section 'train' must be a mapping"),
    ],
)
def test_bad_yaml(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["method.r=16", "train.lr=1e-3"], method="pissa")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_every_field_has_help():
    classes = [*SECTIONS.values()] + [get_method_class(m).config_cls for m in available_methods()]
    for cls in classes:
        helps = field_help(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)]
        assert not missing, f"{cls.__name__} fields without help: {missing}"


def test_shipped_configs_load():
    from tests.conftest import REPO

    accelerate = REPO / "configs" / "accelerate"  # accelerate's own config files (accelerate launch --config_file)
    paths = [p for p in sorted((REPO / "configs").rglob("*.yaml")) if accelerate not in p.parents]
    assert len(paths) >= 6
    for path in paths:
        load_config(path)
