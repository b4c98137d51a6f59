import pytest

from recast import ConfigError, RecastConfig


def test_defaults_and_round_trip():
    cfg = RecastConfig(target=["blocks.*.attn.proj"], groups=2, templates=3, coef_sets=1)
    assert cfg.target == ("blocks.*.attn.proj",)
    assert RecastConfig.from_dict(cfg.to_dict()) == cfg
    assert RecastConfig().resolved_groups() == 6
    assert RecastConfig(target="conv").resolved_groups() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "attention"}, "unknown target 'attention': use one of att, mlp, att+mlp, conv"),
        ({"target": []}, "non-empty list"),
        ({"templates": 0}, "templates must be a positive integer or None"),
        ({"groups": -1}, "groups must be a positive integer"),
        ({"coef_sets": True}, "coef_sets must be a positive integer, got True"),
        ({"coef_sets": 1.5}, "coef_sets must be a positive integer"),
    ],
)
def test_invalid_values_say_what_is_allowed(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("(", r"\(")):
        RecastConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown config keys \\['tmplates'\\]"):
        RecastConfig.from_dict({"target": "att", "tmplates": 2})


def test_config_is_frozen():
    cfg = RecastConfig()
    with pytest.raises(AttributeError):
        cfg.groups = 3


def test_depthwise_option_round_trips_and_needs_the_conv_target():
    cfg = RecastConfig(target="conv", depthwise=True)
    assert cfg.to_dict()["depthwise"] is True
    assert RecastConfig.from_dict(cfg.to_dict()) == cfg
    assert "depthwise" not in RecastConfig(target="conv").to_dict()  # older files stay as they were
    assert RecastConfig.from_dict({"target": "conv"}).depthwise is False
    with pytest.raises(ConfigError, match="depthwise=True applies to target 'conv' only"):
        RecastConfig(target="att", depthwise=True)
    with pytest.raises(ConfigError, match="depthwise must be true or false"):
        RecastConfig.from_dict({"target": "conv", "depthwise": "yes"})
