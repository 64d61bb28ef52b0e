"""quantize -> eval -> inspect on tiny random models of each architecture."""

import json

import pytest
import torch

from exporters.io import TensorDir


def independent_gptq_dequant(td, name, bits=4, group=128):
    """Dequantize GPTQ v1 tensors with explicit shifts (no qtool code)."""
    qw, qz, sc = td[f"{name}.qweight"].to(torch.int64) & 0xFFFFFFFF, td[f"{name}.qzeros"].to(torch.int64) & 0xFFFFFFFF, td[f"{name}.scales"].float()
    per = 32 // bits
    K, N = qw.shape[0] * per, qw.shape[1]
    codes = torch.stack([(qw >> (bits * i)) & (2**bits - 1) for i in range(per)], 1).reshape(K, N)
    zeros = torch.stack([(qz >> (bits * i)) & (2**bits - 1) for i in range(per)], 2).reshape(qz.shape[0], N) + 1
    g = td[f"{name}.g_idx"].long()
    return ((codes - zeros[g]) * sc[g]).t()  # [N, K]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_eval_inspect(cli, tiny_models, tmp_path, arch, method):
    from calibrate.models import load_model
    from runtime.loader import load_quantized

    src = tiny_models(arch)
    out = tmp_path / "q"
    r = cli("quantize", src, "--scheme", "w4a16", "--method", method, "--group-size", "128", "--format", "gptq", "--out", out, "--samples", "8", "--seqlen", "64", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["modules"] == 7 * 2
    # the runtime computes what an fp model with independently dequantized weights computes
    qmodel, ckpt = load_quantized(out)
    ref = load_model(src, torch.float32)
    td = TensorDir(out)
    for name in ckpt.qtensors:
        ref.get_submodule(name).weight.data = independent_gptq_dequant(td, name)
    ids = torch.randint(3, 500, (1, 40))
    with torch.no_grad():
        a, b = qmodel(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # the eval command
    r = cli("eval", out, "--windows", "2", "--json")
    assert r.code == 0, r.err
    m = json.loads(r.out)
    assert m["tokens"] == 1024
    for k in ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement"):
        assert m[k] is not None and m[k] == m[k] and abs(m[k]) != float("inf"), k
    assert m["kl_divergence"] > 0 and 0 < m["top1_agreement"] < 1
    assert json.loads((out / "qtool.json").read_text())["eval"]["perplexity"] == m["perplexity"]
    r = cli("inspect", out, "--json")
    info = json.loads(r.out)
    assert info["format"] == "gptq" and info["quantized_modules"] == 14
    assert 4.0 < info["bits_per_weight_quantized"] < 4.3


def test_gptq_beats_rtn_on_layer_error(tiny_models, tmp_path):
    """On the same calibration data, GPTQ's output error is below round-to-nearest's."""
    from calibrate.algorithms.gptq import HessianAccumulator, gptq_quantize
    from calibrate.algorithms.rtn import quantize_weight
    from qtensor import get_scheme
    from qtensor.schemes import WeightSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1  # correlated inputs
    w = torch.randn(128, 256, generator=g)
    acc = HessianAccumulator(256)
    for chunk in x.split(512):
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 * x.t() @ x / x.shape[0], rtol=1e-3, atol=1e-3)
    spec = WeightSpec.of(get_scheme("w4a16"), 128)
    e_rtn = (x @ (quantize_weight(w, spec).dequantize() - w).t()).pow(2).mean()
    for act_order in (False, True):
        e_gptq = (x @ (gptq_quantize(w, acc.H, spec, act_order=act_order).qtensor.dequantize() - w).t()).pow(2).mean()
        assert e_gptq < 0.7 * e_rtn, (act_order, e_gptq, e_rtn)


def test_eval_gate(cli, tiny_models, tmp_path):
    out = tmp_path / "q"
    assert cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--format", "gptq", "--out", out).code == 0
    r = cli("eval", out, "--windows", "1", "--max-kl", "0.0000001", "--json")
    assert r.code == 1
    assert "KL divergence" in r.err and json.loads(r.out)["passed"] is False
    r = cli("eval", out, "--windows", "1", "--max-kl", "100", "--min-top1", "0.0", "--max-ppl-increase", "1000")
    assert r.code == 0, r.err


def test_export_gptq_to_qtool_and_back(cli, tiny_models, tmp_path):
    from exporters import read_checkpoint

    assert cli("quantize", tiny_models("qwen2"), "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "g").code == 0
    assert cli("export", tmp_path / "g", "--format", "qtool", "--out", tmp_path / "q").code == 0
    assert cli("export", tmp_path / "q", "--format", "gptq", "--out", tmp_path / "g2").code == 0
    a, b = read_checkpoint(tmp_path / "g"), read_checkpoint(tmp_path / "g2")
    for n in a.qtensors:
        assert a.qtensors[n].equal(b.qtensors[n])
    ta, tb = TensorDir(tmp_path / "g"), TensorDir(tmp_path / "g2")
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_gptq_group_equals_per_linear():
    """GPTQ on concatenated q/k/v rows gives exactly the per-linear results (rows are independent given H)."""
    from calibrate.algorithms import get_method
    from calibrate.algorithms.gptq import HessianAccumulator
    from qtensor import get_scheme
    from qtensor.schemes import WeightSpec

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 128, generator=g) * torch.linspace(0.2, 2, 128)
    acc = HessianAccumulator(128)
    acc.add(x)
    ws = [torch.randn(n, 128, generator=g) for n in (64, 32, 32)]
    m = get_method("gptq")
    spec = WeightSpec.of(get_scheme("w4a16"), 32)
    joint = m.group_fn(ws, spec, {"hessian": acc, "n": 1024}, **m.options)
    for w, (qt, _) in zip(ws, joint):
        single, _ = m.quantize(w, spec, {"hessian": acc, "n": 1024})
        assert qt.equal(single)


def test_gptq_mse_clip_is_the_default(cli, tiny_models, tmp_path):
    """GPTQ searches MSE-optimal group clipping unless --no-mse-clip: the recorded options say so and the
    textbook run's scales are the plain absmax ones (the default's are no larger, some smaller)."""
    src = tiny_models("llama")
    runs = {}
    for flag in ([], ["--no-mse-clip"]):
        out = tmp_path / ("default" if not flag else "textbook")
        r = cli("quantize", src, "--scheme", "w4a16", "--method", "gptq", "--format", "qtool", "--out", out, "--samples", "4", "--seqlen", "64", *flag)
        assert r.code == 0, r.err
        runs[bool(flag)] = (json.loads((out / "qtool.json").read_text())["options"], TensorDir(out))
    assert runs[False][0]["mse_clip"] is True and runs[True][0]["mse_clip"] is False
    name = "model.layers.0.self_attn.q_proj.qt.scales"
    a, b = runs[False][1][name].float(), runs[True][1][name].float()
    assert (a <= b * (1 + 1e-3)).all() and (a < b * 0.999).any()
