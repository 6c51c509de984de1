"""Config files, dotted overrides and their errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ceprompt.core.errors import ConfigError
from ceprompt.experiment.config import CONFIG_DIR, Config, config_from_dict, dump_config, load_config

PAPER_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("demo_"))


def test_every_shipped_config_loads() -> None:
    assert len(PAPER_CONFIGS) == 8
    for path in CONFIG_DIR.glob("*.yaml"):
        load_config(path)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_with_paper_values(path: Path) -> None:
    cfg = load_config(path)
    if cfg.stage == "eva":
        o = cfg.optim
        assert (o.name, o.lr, o.epochs, o.warmup_epochs, o.batch_size, o.layer_decay, o.weight_decay) == \
            ("adamw", 1e-4, 50, 5, 128, 0.65, 5e-4)
        assert (cfg.eva.fix_layer, cfg.eva.kd_weight) == (2, 1.0)
    else:
        o = cfg.optim
        assert (o.name, o.lr, o.momentum, o.epochs, o.warmup_epochs) == ("sgd", 2e-3, 0.9, 10, 2)
        assert (cfg.cat.n_ctx, cfg.cat.prompt_depth, cfg.cat.vision_prompts) == (2, 9, "append")
    assert (cfg.head.top_k, cfg.head.alpha) == (16, 0.5)
    assert cfg.data.balanced_sampler is (cfg.data.dataset.startswith("affectnet") or None)


def test_overrides_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config("rafdb_stage1", ["optim.lr=2e-4", "data.mean=[0.5, 0.5, 0.5]", "run.name=abc",
                                       "backbone.path=/x/ViT-B-16.pt", "optim.grad_clip=null"])
    assert (cfg.optim.lr, cfg.data.mean, cfg.run.name, cfg.backbone.path) == (2e-4, [0.5] * 3, "abc", "/x/ViT-B-16.pt")
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("optim.epochs=2.5", "optim.epochs: expected an integer"),
    ("optim.speed=3", "unknown key 'optim.speed'"),
    ("stage=3", "stage='3'; expected one of"),
    ("run.deterministic=maybe", "run.deterministic: expected true or false"),
    ("noequals", "expected KEY=VALUE"),
    ("optim=5", "'optim' must be a mapping"),
    ("data.std=[1, 0, 1]", "data.std=0.0; expected a number in (0, 10]"),
    ("data.mean=[0.5, 0.5]", "data.mean and data.std need 3 values"),
    # every numeric field is range-checked when the config loads, NaN and infinities included
    ("optim.min_lr=.nan", "optim.min_lr=nan; expected a number in [0, 1]"),
    ("optim.lr=1e30", "optim.lr=1e+30; expected a number in (0, 1]"),
    ("optim.lr=0", "optim.lr=0.0; expected a number in (0, 1]"),
    ("optim.lr=-.inf", "optim.lr=-inf"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0; expected a number > 0"),
    ("optim.grad_clip=.nan", "optim.grad_clip=nan"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1; expected a number in [0, 1]"),
    ("optim.weight_decay=.nan", "optim.weight_decay=nan"),
    ("optim.layer_decay=-0.5", "optim.layer_decay=-0.5; expected a number in (0, 1]"),
    ("optim.momentum=.nan", "optim.momentum=nan; expected a number in [0, 1)"),
    ("optim.min_lr=0.5", "optim.min_lr=0.5; expected <= optim.lr"),
    ("head.alpha=1.5", "head.alpha=1.5; expected a number in [0, 1]"),
    ("data.workers=-1", "data.workers=-1; expected an integer in [0, 256]"),
])
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_every_numeric_field_has_a_range() -> None:
    from ceprompt.core.config import field_range, numeric_fields

    fields = numeric_fields(Config())
    assert len(fields) > 20
    assert [name for name, f in fields if field_range(f) is None] == []


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("stage: eva\noptim:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_defaults_are_paper_stage1() -> None:
    cfg = Config()
    assert cfg.eva.template == "a photo of a {} facial expression, a type of facial expression."
    assert cfg.data.mean == [0.485, 0.456, 0.406]


def test_typed_values_are_coerced_and_checked_as_yaml_values_are() -> None:
    """Python callers pass values (a sweep's numpy numbers, paths), never text to re-parse."""
    import numpy as np

    cfg = load_config("rafdb_stage1", values={"optim.epochs": np.int64(8), "optim.lr": np.float32(2.5e-4),
                                              "run.deterministic": np.bool_(True), "data.root": Path("a: b"),
                                              "eva.template": "null {}", "data.mean": (0.5, 0.5, 0.5)})
    assert type(cfg.optim.epochs) is int and cfg.optim.epochs == 8 and cfg.run.deterministic is True
    assert cfg.data.root == "a: b" and cfg.eva.template == "null {}" and cfg.data.mean == [0.5, 0.5, 0.5]
    assert abs(cfg.optim.lr - 2.5e-4) < 1e-9
    for values, message in [({"optim.epochs": 2.5}, "optim.epochs: expected an integer, got 2.5"),
                            ({"optim.epochs": True}, "optim.epochs: expected an integer"),
                            ({"optim.lr": np.float64("nan")}, "optim.lr=nan; expected a number in (0, 1]"),
                            ({"optim.speed": 1}, "unknown key 'optim.speed'"),
                            ({"optim..lr": 1}, "malformed key"),
                            ({"run.name": "m\nx: 1"}, "run.name='m\\nx: 1': expected a plain folder name")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("rafdb_stage1", values=values)


def test_a_single_override_string_is_one_override_and_yaml_keys_are_given_once(tmp_path: Path) -> None:
    assert load_config("rafdb_stage1", "optim.epochs=7").optim.epochs == 7
    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\n  epochs: 3\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:4: key 'lr' is given twice in one mapping \(first on line 2\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot hold a NUL character"):
        load_config("x\0.yaml")
