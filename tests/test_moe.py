"""A tiny Qwen3-MoE end to end: fused experts are defused into per-expert linears named as on disk."""

import json

import torch

from exporters.io import TensorDir


def test_moe_quantize_eval(cli, tiny_models, tmp_path):
    from calibrate.models import load_model
    from runtime.loader import load_quantized

    src = tiny_models("qwen3_moe")
    out = tmp_path / "q"
    r = cli("quantize", src, "--scheme", "w4a16", "--method", "gptq", "--group-size", "128", "--format", "gptq", "--out", out, "--samples", "8", "--seqlen", "64", "--json")
    assert r.code == 0, r.err
    td = TensorDir(out)
    experts = sorted(k for k in td if ".experts." in k and k.endswith(".qweight"))
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    assert "model.layers.0.mlp.gate.weight" in td  # router stays in full precision
    qmodel, ckpt = load_quantized(out)
    ref = load_model(src, torch.float32)
    for name, qt in ckpt.qtensors.items():
        ref.get_submodule(name).weight.data = qt.dequantize()
    ids = torch.randint(3, 500, (1, 32))
    with torch.no_grad():
        assert torch.allclose(qmodel(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    r = cli("eval", out, "--windows", "1", "--json")
    assert r.code == 0, r.err
    m = json.loads(r.out)
    assert m["kl_divergence"] > 0 and m["perplexity"] == m["perplexity"]
