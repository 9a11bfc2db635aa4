"""lorakit inspect / compress: norms, singular values and truncation checked against torch and PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.inspection import compress_adapter, effective_rank, inspect_adapter, low_rank_svd

CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=50, tie_word_embeddings=False)
IDS = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 0, 11, 6]])


@pytest.fixture
def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


@pytest.fixture
def base_dir(tmp_path, base):
    base.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _orthonormal(n: int, m: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, m))[0]  # (n, m), orthonormal columns


def _save(model, cfg, path, fill) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inject `cfg`, set every adapter's (A, B) with fill(name, A, B), save; returns the factors."""
    lorakit.inject(model, cfg)
    factors = {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, lorakit.LoraLayer):
                ad = layer.adapters["default"]
                fill(name, ad.lora_A.weight, ad.lora_B.weight)
                factors[name] = (ad.lora_A.weight.clone(), ad.lora_B.weight.clone(), ad.scaling)
    lorakit.save_adapter(model, path)
    return factors


def _random(name, A, B):
    B.normal_(std=0.1)


def _rank2(name, A, B):  # B = (d × 2) @ (2 × r): B·A has rank 2 although r = 8 (or 4)
    B.copy_(torch.randn(B.shape[0], 2) @ torch.randn(2, B.shape[1]) * 0.1)


def test_norms_and_singular_values_match_torch(tmp_path, base, base_dir):
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    factors = _save(copy.deepcopy(base), cfg, tmp_path / "ad", _random)
    stats = inspect_adapter(tmp_path / "ad", model=str(base_dir))
    assert [s.name for s in stats] == sorted(factors) and len(stats) == 6
    weights = dict(base.named_modules())
    for s in stats:
        A, B, scale = factors[s.name]
        delta = scale * B.double() @ A.double()  # (d, k)
        assert s.shape == tuple(delta.shape) and s.r == 4 and s.scale == 2.0
        assert s.norm == pytest.approx(torch.linalg.matrix_norm(delta).item(), rel=1e-10)
        torch.testing.assert_close(torch.tensor(s.singular_values, dtype=torch.float64),
                                   torch.linalg.svdvals(delta)[:4])
        w0 = weights[s.name].weight.double()
        assert s.relative == pytest.approx(s.norm / torch.linalg.matrix_norm(w0).item(), rel=1e-10)
    assert {s.layer for s in stats} == {0, 1} and stats[0].module_type in {"q_proj", "v_proj", "down_proj"}
    from_module = inspect_adapter(tmp_path / "ad", model=base)  # the base as an nn.Module works too
    assert [s.base_norm for s in from_module] == pytest.approx([s.base_norm for s in stats])


def test_low_rank_svd_reconstructs():
    torch.manual_seed(1)
    B, A = torch.randn(40, 6), torch.randn(6, 30)
    U, S, V = low_rank_svd(B, A, 0.5)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, 0.5 * B.double() @ A.double())
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64))


def test_effective_rank_of_a_known_construction(tmp_path, base):
    torch.manual_seed(2)
    sigma = {"q_proj": [4.0, 2.0, 1.0, 0.5], "v_proj": [3.0, 1.0, 0.0, 0.0]}  # energies 16,4,1,.25 and 9,1

    def fill(name, A, B):  # ΔW = U diag(σ) Vᵀ (scale 1: alpha = r)
        s = torch.tensor(sigma[name.rsplit(".", 1)[-1]])
        B.copy_(_orthonormal(B.shape[0], 4) * s)
        A.copy_(_orthonormal(A.shape[1], 4).T)

    cfg = lorakit.LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0])
    _save(base, cfg, tmp_path / "ad", fill)
    q, v = inspect_adapter(tmp_path / "ad")
    assert q.singular_values == pytest.approx([4, 2, 1, 0.5], abs=1e-6)
    assert q.norm == pytest.approx(21.25**0.5, rel=1e-6)
    assert (q.rank90, q.rank99) == (2, 4)  # 90 % of 21.25 needs 16 + 4; 99 % needs all four
    assert (v.rank90, v.rank99) == (1, 2)  # 9 / 10 is exactly 90 %
    assert q.relative is None
    assert effective_rank(torch.zeros(3), 0.9) == 0


def test_rslora_and_patterns_scale(tmp_path, base):
    cfg = lorakit.LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                             rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3.0})
    factors = _save(base, cfg, tmp_path / "ad", _random)
    scales = {s.name.rsplit(".", 1)[-1]: (s.r, s.scale) for s in inspect_adapter(tmp_path / "ad")}
    assert scales == {"q_proj": (4, 8 / 2), "v_proj": (2, pytest.approx(3 / 2**0.5))}


def test_compress_rank2_adapter_matches_original_in_lorakit_and_peft(tmp_path, base):
    peft = pytest.importorskip("peft")
    tuned = copy.deepcopy(base)
    cfg = lorakit.LoraConfig(r=8, alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj"],
                             rank_pattern={"v_proj": 4}, alpha_pattern={"gate_proj": 5.0})
    torch.manual_seed(3)
    _save(tuned, cfg, tmp_path / "r8", _rank2)
    with torch.no_grad():
        expected = tuned(IDS).logits
        assert (expected - base(IDS).logits).abs().max() > 1e-3  # the adapter does something

    rep = compress_adapter(tmp_path / "r8", 2, tmp_path / "r2")
    assert rep.total_error < 1e-6 and max(m["error"] for m in rep.modules) < 1e-6
    assert {m["r"] for m in rep.modules} == {8, 4} and len(rep.modules) == 6
    written = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (2, 2, False)
    assert written["rank_pattern"] == {} and written["alpha_pattern"] == {}

    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "r2")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "r2")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs(IDS).logits, expected, atol=1e-5, rtol=0)


def test_compress_pads_modules_of_lower_rank(tmp_path, base):
    tuned = copy.deepcopy(base)
    cfg = lorakit.LoraConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    torch.manual_seed(5)
    _save(tuned, cfg, tmp_path / "src", _rank2)
    rep = compress_adapter(tmp_path / "src", 4, tmp_path / "r4")
    assert {m["r"] for m in rep.modules} == {8, 2} and rep.total_error < 1e-6
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "r4")
    v = loaded.model.layers[0].self_attn.v_proj.adapters["default"]
    assert v.lora_A.weight.shape == (4, 32) and v.lora_A.weight[2:].abs().max() == 0  # zero-padded to 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, tuned(IDS).logits, atol=1e-5, rtol=0)


def test_compress_error_is_the_dropped_energy(tmp_path, base):
    torch.manual_seed(4)

    def fill(name, A, B):
        B.copy_(_orthonormal(B.shape[0], 4) * torch.tensor([4.0, 2.0, 1.0, 0.5]))
        A.copy_(_orthonormal(A.shape[1], 4).T)

    _save(base, lorakit.LoraConfig(r=4, alpha=4, target_modules=["q_proj"]), tmp_path / "ad", fill)
    rep = compress_adapter(tmp_path / "ad", 2, tmp_path / "out")
    want = (1.25 / 21.25) ** 0.5  # √(1² + 0.5²) / √(4² + 2² + 1² + 0.5²)
    assert [m["error"] for m in rep.modules] == pytest.approx([want, want])
    assert rep.total_error == pytest.approx(want)
    assert inspect_adapter(tmp_path / "out")[0].singular_values == pytest.approx([4, 2], abs=1e-6)


def test_compress_refusals(tmp_path, base):
    _save(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "ad", _random)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="full exists and is not empty.*--force"):
        compress_adapter(tmp_path / "ad", 2, tmp_path / "full")
    compress_adapter(tmp_path / "ad", 2, tmp_path / "full", force=True)
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="rank=5 is above the adapter's largest rank 4"):
        compress_adapter(tmp_path / "ad", 5, tmp_path / "o1")
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        compress_adapter(tmp_path / "ad", 0, tmp_path / "o2")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        compress_adapter(tmp_path / "ad", 2, tmp_path / "o3")


def test_read_errors_name_the_file(tmp_path, base, base_dir):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        inspect_adapter(tmp_path / "nope")
    _save(base, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "ad", _random)
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    with pytest.raises(ValueError, match="no weight for adapted module 'model.layers.0.self_attn.q_proj'"):
        inspect_adapter(tmp_path / "ad", model=str(weights))  # a safetensors file without the base weights
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        inspect_adapter(tmp_path / "ad", model=str(tmp_path))
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a valid safetensors file"):
        inspect_adapter(tmp_path / "ad")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        inspect_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        inspect_adapter(tmp_path / "ad")
