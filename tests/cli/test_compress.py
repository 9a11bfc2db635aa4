"""`lorakit compress` from the command line: the same adapter as `inspection.compress_adapter` writes."""

import pytest
from safetensors.torch import load_file
from test_inspection import _random, _save, base  # noqa: F401 (fixtures)

import lorakit
from lorakit.cli import main
from lorakit.inspection import compress_adapter


def test_cli_compress_writes_what_the_python_api_writes(tmp_path, base, capsys):
    _save(base, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "ad", _random)
    assert main(["compress", str(tmp_path / "ad"), "--rank", "2", "--output_dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    rep = compress_adapter(tmp_path / "ad", 2, tmp_path / "py")
    assert f"total relative error ||ΔW - ΔW_K|| / ||ΔW|| over all modules: {rep.total_error:.3e}" in out
    got = load_file(tmp_path / "c" / "adapter_model.safetensors")
    want = load_file(tmp_path / "py" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    assert main(["compress", str(tmp_path / "ad"), "--rank", "2", "--output-dir", str(tmp_path / "c")]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compress", "--help"])
    assert e.value.code == 0 and "DIR" in capsys.readouterr().out
