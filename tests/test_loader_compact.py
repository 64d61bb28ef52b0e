"""The runtime keeps large 16-bit embeddings and unquantized heads in their stored dtype (no full-precision
copy of the model) and still computes exactly what widening them would."""

import pytest
import torch

import runtime.loader as loader
from runtime.qlinear import QuantLinear


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_compact_storage_same_logits(cli, tiny_models, tmp_path, arch, monkeypatch):
    out = tmp_path / "q"
    r = cli("quantize", tiny_models(arch), "--scheme", "w4a16", "--method", "rtn", "--format", "gptq", "--out", out, "--samples", "2", "--seqlen", "16")
    assert r.code == 0, r.err
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(loader, "COMPACT_MIN", 1 << 62)  # nothing compact: every float tensor widened to fp32
    wide, _ = loader.load_quantized(out)
    monkeypatch.setattr(loader, "COMPACT_MIN", 1)  # every embedding / unquantized linear kept in bf16
    compact, _ = loader.load_quantized(out)
    emb = compact.get_input_embeddings()
    head = compact.get_output_embeddings()
    assert emb.weight.dtype == torch.bfloat16 and head.weight.dtype == torch.bfloat16
    assert not isinstance(head, QuantLinear)
    assert wide.get_input_embeddings().weight.dtype == torch.float32
    with torch.no_grad():
        a, b = wide(ids).logits, compact(ids).logits
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(compact) < size(wide)
