"""configurator.py: config files and --key=value flags over a script's defaults (an unknown key names
the closest one, a value keeps its key's type), and the section groups of --sections."""
import pytest

import configurator
import train


@pytest.mark.usefixtures("light_eval")
def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(train.ConfigError, match="'batch_size'"):
        train.configure(["--bacth_size=3"], {"batch_size": 1, "lr": 0.1})
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("lr = 0.5\nlearning_rate = 3\n")
    with pytest.raises(train.ConfigError, match="learning_rate"):
        train.configure([str(cfg_file)], {"batch_size": 1, "lr": 0.1})


@pytest.mark.usefixtures("light_eval")
def test_cli_override_keeps_type(tmp_path):
    d = {"batch_size": 1, "lr": 0.1, "compile": False, "out_dir": "out"}
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("batch_size = 7\nout_dir = 'x'\n")
    cfg = train.configure([str(cfg_file), "--lr=1", "--compile=True", "--out_dir=out/run1"], d)
    assert cfg == {"batch_size": 7, "lr": 1.0, "compile": True, "out_dir": "out/run1"}
    assert isinstance(cfg["lr"], float)
    with pytest.raises(train.ConfigError, match="batch_size"):
        train.configure(["--batch_size=0.5"], d)
    with pytest.raises(train.ConfigError, match="compile"):
        train.configure(["--compile=1"], d)


@pytest.mark.parametrize("flag", ["--batch_size=True", "--lr=True", "--z_init=False"])
def test_configurator_refuses_booleans_for_numbers(flag):
    with pytest.raises(train.ConfigError, match="must be"):
        train.configure([flag], train.DEFAULTS)


@pytest.mark.usefixtures("light_eval")
def test_parse_groups():
    assert configurator.parse_groups("0,1") == [[0, 1]]
    assert configurator.parse_groups("0-3; 8-9,12") == [[0, 1, 2, 3], [8, 9, 12]]
    assert configurator.parse_groups("") == []
    with pytest.raises(configurator.ConfigError, match="ranges"):
        configurator.parse_groups("a-b")
