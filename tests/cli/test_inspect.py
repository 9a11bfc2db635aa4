"""`lorakit inspect` from the command line (the numbers themselves: tests/test_inspection.py)."""

import json

import pytest
from test_inspection import _random, _save, base, base_dir  # noqa: F401 (fixtures)

import lorakit
from lorakit.cli import main
from lorakit.inspection import inspect_adapter


def test_cli_inspect_table_plot_and_json(tmp_path, base, base_dir, capsys):
    _save(base, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "ad", _random)
    png = tmp_path / "heat.png"
    assert main(["inspect", str(tmp_path / "ad"), "--model", str(base_dir), "--top", "3", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "top 3 by ||ΔW|| / ||W0||" in out and "q_proj" in out and "rank90" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(tmp_path / "ad"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == json.loads(json.dumps([s.to_dict() for s in inspect_adapter(tmp_path / "ad")]))
    assert len(rows) == 4 and rows[0]["relative"] is None and len(rows[0]["singular_values"]) == 4
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0 and "DIR" in capsys.readouterr().out
