"""AWQ, SmoothQuant, FP8 and the NVFP4/MX scale searches, each against an independent property or reference."""

import copy
import json

import pytest
import torch

from calibrate.algorithms import awq, fpscale, smoothquant
from calibrate.algorithms import smoothing as sm
from calibrate.algorithms.rtn import quantize_weight
from qtensor import get_scheme
from qtensor import numerics as nm
from qtensor.schemes import WeightSpec


def layer_context(model_dir, scheme="w4a16", group_size=None, outliers=False, seed=0):
    """A LayerContext for decoder layer 0 of a tiny model, on correlated hidden states (optionally
    with a few outlier channels in the norms, as real LLMs have)."""
    from calibrate.models import load_model
    from calibrate.pipeline import LayerContext, capture_layer_inputs, find_decoder_layers, linear_groups

    model = load_model(model_dir, torch.float32)
    _, layers = find_decoder_layers(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (1, 32), generator=g)
    cap = capture_layer_inputs(model, layers, ids, "cpu")
    layer = layers[0]
    hsz = cap.inputs[0].shape[-1]
    mix = torch.randn(hsz, hsz, generator=g) / hsz**0.5 + torch.eye(hsz)
    hidden = [(torch.randn(4, 32, hsz, generator=g) @ mix) for _ in range(2)]  # correlated channels
    with torch.no_grad():  # norm weights as a trained model has them (tiny Gemma's start at 0, i.e. 1 + 0)
        for name, mod in layer.named_modules():
            if sm._is_norm(mod, hsz):
                w = 1 + 0.3 * torch.randn(hsz, generator=g)
                if outliers:
                    w[torch.randperm(hsz, generator=g)[:6]] = 12.0
                offset = 1.0 if "gemma" in type(layer).__name__.lower() else 0.0
                mod.weight.data.copy_(w - offset)
    kwargs, args = cap.kwargs[0], cap.args[0]
    groups = linear_groups(layer, hidden[0][:1], kwargs, args)
    sch = get_scheme(scheme)
    return LayerContext("l0", layer, hidden, kwargs, args, groups, sch, WeightSpec.of(sch, group_size))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def outputs_close(xs, ys, tol=1e-5):
    return max(rel(x, y) for x, y in zip(xs, ys)) < tol


# ---- the producer discovery and folding shared by AWQ and SmoothQuant ------------------------------


@pytest.mark.parametrize("arch,offset", [("llama", 0.0), ("gemma3", 1.0)])
def test_pairs_found_generically_and_folds_preserve_output(tiny_models, arch, offset):
    ctx = layer_context(tiny_models(arch))
    pairs = {tuple(p.group): p for p in sm.find_pairs(ctx)}
    qkv = pairs[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    assert (qkv.prev, qkv.kind, qkv.offset, qkv.block) == ("input_layernorm", "norm", offset, "self_attn")
    mlp_norm = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    gu = pairs[("mlp.gate_proj", "mlp.up_proj")]
    assert (gu.prev, gu.offset, gu.block) == (mlp_norm, offset, "mlp")
    down = pairs[("mlp.down_proj",)]
    assert (down.prev, down.kind) == ("mlp.up_proj", "linear")
    o = pairs[("self_attn.o_proj",)]  # GQA: v has fewer channels than o reads; each feeds one per query head of its group
    assert (o.prev, o.kind) == ("self_attn.v_proj", "linear")
    cfg = ctx.layer.self_attn.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = ctx.module("self_attn.o_proj").in_features // nh
    h, d = torch.meshgrid(torch.arange(nh), torch.arange(hd), indexing="ij")
    assert torch.equal(o.index, ((h // (nh // nkv)) * hd + d).reshape(-1))

    ref = ctx.run()
    norm_before = ctx.module("input_layernorm").weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    for p in pairs.values():
        if p.prev:
            s = torch.exp(torch.randn(ctx.module(p.group[0]).in_features, generator=g))  # scales over ~e^+-3
            msg, a = sm.apply(ctx, p, s)
            assert msg == "" and a is not None
    assert not torch.equal(ctx.module("input_layernorm").weight, norm_before)
    assert outputs_close(ctx.run(), ref, 1e-5)


def test_gemma_norm_fold_needs_the_measured_offset(tiny_models):
    """Folding into Gemma's (1 + w) norm as if it were w (GPTQModel's AWQ failure) changes the output."""
    ctx = layer_context(tiny_models("gemma3"))
    pair = next(p for p in sm.find_pairs(ctx) if p.prev == "input_layernorm")
    ref = ctx.run()
    s = torch.linspace(0.5, 2.0, ctx.module("self_attn.q_proj").in_features)
    wrong = copy.deepcopy(pair)
    wrong.offset = 0.0
    msg, a = sm.apply(ctx, wrong, s)
    assert "changed the layer output" in msg and a is None
    assert outputs_close(ctx.run(), ref, 1e-6)  # undone
    msg, a = sm.apply(ctx, pair, s)
    assert msg == ""
    assert outputs_close(ctx.run(), ref, 1e-5)
    # the folded Gemma weight is bf16-exact (it is saved in bf16) and the columns compensate the rounding
    w = ctx.module("input_layernorm").weight.detach()
    assert torch.equal(w, w.to(torch.bfloat16).float())
    assert torch.allclose(a, 1 / s, rtol=2e-2)


# ---- AWQ -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_awq_scaling_preserves_fp_output_and_beats_rtn(tiny_models, arch):
    ctx = layer_context(tiny_models(arch), group_size=128, outliers=True)
    ref = ctx.run()

    def rtn_all(layer):
        for n in [n for g in ctx.groups for n in g]:
            lin = layer.get_submodule(n)
            lin.weight.data.copy_(quantize_weight(lin.weight.data, ctx.spec).dequantize())

    saved = copy.deepcopy(ctx.layer.state_dict())
    rtn_all(ctx.layer)
    err_rtn = sum(rel(a, b) for a, b in zip(ctx.run(), ref))
    ctx.layer.load_state_dict(saved)

    notes = awq.prepare(ctx, clip=False)
    assert any("alpha" in n and "<-" in n for n in notes), notes
    assert outputs_close(ctx.run(), ref, 1e-5)  # scales folded, nothing quantized yet: same function
    saved_scaled = copy.deepcopy(ctx.layer.state_dict())
    rtn_all(ctx.layer)
    err_awq = sum(rel(a, b) for a, b in zip(ctx.run(), ref))
    assert err_awq < 0.9 * err_rtn, (err_awq, err_rtn)

    ctx.layer.load_state_dict(saved_scaled)  # clipping on top lowers the error further
    stats, _ = awq._layer_pass(ctx, [g[0] for g in ctx.groups], 128, set(), 0)
    for g in ctx.groups:
        for n in g:
            lin = ctx.module(n)
            c = awq.clip_search(lin.weight.data, stats[g[0]]["H"], ctx.spec)
            scale, _ = nm.int_qparams(lin.weight.data, 4, 128, True, ctx.spec.scale_dtype, c)
            lin.weight.data.copy_(nm.int_dequantize(nm.int_quantize(lin.weight.data, scale, None, 4, 128), scale, None, 128))
    err_clip = sum(rel(a, b) for a, b in zip(ctx.run(), ref))
    assert err_clip < err_awq, (err_clip, err_awq)


def test_awq_final_step_is_rtn_with_the_searched_clip(tiny_models):
    """prepare's clip ratios reach the final quantization: codes and scales are int_qparams(clip=c)'s."""
    ctx = layer_context(tiny_models("llama"), group_size=128, outliers=True)
    awq.prepare(ctx)
    stats, _ = awq._layer_pass(ctx, [g[0] for g in ctx.groups], 128, set(), 0)
    clipped = 0
    for g in ctx.groups:
        for n in g:
            w = ctx.module(n).weight.data
            c = awq.clip_search(w, stats[g[0]]["H"], ctx.spec)  # the same search on the same inputs
            clipped += int((c < 1).sum())
            scale, _ = nm.int_qparams(w, 4, 128, True, ctx.spec.scale_dtype, c)
            qt, _ = awq.quantize(w, ctx.spec, {})
            assert torch.equal(qt.scales, scale) and torch.equal(qt.codes, nm.int_quantize(w, scale, None, 4, 128))
    assert clipped > 0 and not awq._CLIPS


def test_awq_clip_search_minimises_the_output_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.2 + torch.eye(256))
    w = torch.randn(32, 256, generator=g)
    spec = WeightSpec.of(get_scheme("w4a16"), 128)
    xg = x.reshape(-1, 2, 128)
    H = torch.einsum("tgi,tgj->gij", xg, xg)
    c = awq.clip_search(w, H, spec)

    def err(clip):
        scale, _ = nm.int_qparams(w, 4, 128, True, spec.scale_dtype, clip)
        d = nm.int_dequantize(nm.int_quantize(w, scale, None, 4, 128), scale, None, 128) - w
        return (x @ d.t()).pow(2).sum()

    assert err(c) < err(1.0)
    for r in (0.9, 0.8):  # no single ratio does better than the per-group choice
        assert err(c) <= err(r) * (1 + 1e-5)


# ---- SmoothQuant ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_smoothquant_preserves_fp_output_and_flattens_activations(tiny_models, arch):
    from runtime.qlinear import fake_quant_act
    from qtensor import ActQuant

    ctx = layer_context(tiny_models(arch), scheme="w8a8-int8", outliers=True)
    first = [g[0] for g in ctx.groups]
    ref = ctx.run()
    x_before = ctx.linear_inputs(first)
    w_before = {n: ctx.module(n).weight.detach().clone() for g in ctx.groups for n in g}

    def w8a8_error():
        """Output error with int8 per-channel weights and int8 per-token activations (the runtime's arithmetic)."""
        saved = copy.deepcopy(ctx.layer.state_dict())
        hooks = []
        for n in [n for g in ctx.groups for n in g]:
            lin = ctx.module(n)
            lin.weight.data.copy_(quantize_weight(lin.weight.data, ctx.spec).dequantize())
            hooks.append(lin.register_forward_pre_hook(lambda m, a: (fake_quant_act(a[0], ActQuant("dynamic", "int8")),)))
        e = sum(rel(a, b) for a, b in zip(ctx.run(), ref))
        for h in hooks:
            h.remove()
        ctx.layer.load_state_dict(saved)
        return e

    e_plain = w8a8_error()
    notes = smoothquant.prepare(ctx, alpha=0.5)
    assert "<-" in notes[-1]
    assert outputs_close(ctx.run(), ref, 1e-5)
    x_after = ctx.linear_inputs(first)
    for p in sm.find_pairs(ctx):
        if p.prev is None:
            continue
        n = p.group[0]
        a0 = x_before[n].abs().amax(0)
        # independent reference: s = amax_x^0.5 / amax_w^0.5; the input is divided by s (up to the bf16 rounding
        # of the folded norm weight: Gemma stores 1 + w as w, a few % where (1 + w) / s is small)
        wmax = torch.stack([w_before[m].abs().amax(0) for m in p.group]).amax(0)
        if n == "self_attn.o_proj":  # GQA v -> o: one scale per value channel, the max over the query heads sharing it
            cfg = ctx.layer.self_attn.config
            nkv, rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
            shared = lambda v: v.reshape(nkv, rep, -1).amax(1, keepdim=True).expand(nkv, rep, v.numel() // (nkv * rep)).reshape(-1)  # noqa: E731
            s = (shared(a0).clamp(min=1e-5) / shared(wmax).clamp(min=1e-5)).sqrt()
        else:
            s = (a0.clamp(min=1e-5) / wmax.clamp(min=1e-5)).sqrt()
        assert torch.allclose(x_after[n].abs().amax(0), a0 / s, rtol=3e-2, atol=1e-6)
        # outlier ratio: largest channel range over the median one
        ratio = lambda v: float(v.max() / v.median())  # noqa: E731
        assert ratio(x_after[n].abs().amax(0)) < ratio(a0)
    assert w8a8_error() < e_plain


def test_smoothquant_pre_scale_smooths_gqa_o_proj_per_channel(tiny_models):
    """pre_scale=True with a format that stores pre_quant_scale: GQA's v -> o gets one scale per o input channel (not the
    max over the query heads sharing a v channel): after alpha 1.0 every o_proj input channel has range 1
    (reference: the input amax measured before, divided channel by channel), the layer output is unchanged,
    and the weight columns carry the inverse of the bf16-rounded scale."""
    ctx = layer_context(tiny_models("llama"), scheme="w8a8-int8-static", outliers=True)
    cfg = ctx.layer.self_attn.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # the tiny Llama has GQA
    ctx.pre_scale_ok = True
    ref = ctx.run()
    a0 = ctx.linear_inputs(["self_attn.o_proj"])["self_attn.o_proj"].abs().amax(0)
    w0 = ctx.module("self_attn.o_proj").weight.detach().clone()
    notes = smoothquant.prepare(ctx, alpha=1.0, pre_scale=True)
    assert "self_attn.o_proj<-pre_quant_scale" in notes[-1]
    assert outputs_close(ctx.run(), ref, 1e-5)
    o = ctx.module("self_attn.o_proj")
    p = getattr(o, sm.PRE_SCALE_ATTR)
    assert torch.equal(p, (1.0 / a0).to(torch.bfloat16).float())
    assert torch.allclose(o.weight, w0 / p[None, :], rtol=1e-6)
    x = ctx.linear_inputs(["self_attn.o_proj"])["self_attn.o_proj"]  # what the statistics passes see
    assert torch.allclose(x.abs().amax(0), a0 * p, rtol=1e-6)
    assert torch.allclose(x.abs().amax(0), torch.ones_like(a0), rtol=1e-2)
    # without such a format (compressed-tensors), or by default, the tied fold into v as before: no pre-scale anywhere
    for ok, opt in ((False, {"pre_scale": True}), (True, {})):
        ctx2 = layer_context(tiny_models("llama"), scheme="w8a8-int8-static", outliers=True)
        ctx2.pre_scale_ok = ok
        notes2 = smoothquant.prepare(ctx2, alpha=1.0, **opt)
        assert "self_attn.o_proj<-self_attn.v_proj" in notes2[-1]
        assert not any(hasattr(m, sm.PRE_SCALE_ATTR) for m in ctx2.layer.modules())
    from qtensor.errors import QtoolError

    with pytest.raises(QtoolError, match="pre_scale must be true or false"):
        smoothquant.prepare(layer_context(tiny_models("llama"), scheme="w8a8-int8-static"), pre_scale="maybe")


def test_smoothquant_gptq_rounds_the_smoothed_weights_better_than_rtn(tiny_models):
    """smoothquant-gptq: SmoothQuant's migration, then GPTQ with the Hessian of the smoothed inputs. On
    every linear its output error on those inputs (int8 per-channel weights) is below round-to-nearest's."""
    from calibrate.algorithms import get_method
    from calibrate.algorithms.gptq import HessianAccumulator

    ctx = layer_context(tiny_models("llama"), scheme="w8a8-int8-static", outliers=True)
    m = get_method("smoothquant-gptq")
    assert m.stats == ("hessian",) and m.prepare is smoothquant.prepare
    ref = ctx.run()
    notes = m.prepare(ctx, **{k: v for k, v in m.options.items() if k in ("alpha", "fold_linear")})
    assert "<-" in notes[-1] and outputs_close(ctx.run(), ref, 1e-5)
    names = [n for g in ctx.groups for n in g]
    xs = ctx.linear_inputs(names)
    for n in names:
        x, w = xs[n].float(), ctx.module(n).weight.detach().float()
        acc = HessianAccumulator(x.shape[1])
        acc.add(x)
        q, _ = m.quantize(w, ctx.spec, {"hessian": acc, "n": acc.n})
        r, _ = smoothquant.quantize(w, ctx.spec, {})
        err = lambda qt: float((x @ (qt.dequantize() - w).t()).square().sum())  # noqa: E731
        assert (q.bits, q.group_size) == (8, -1)
        assert err(q) < err(r), n


def test_smoothquant_refuses_weight_only_schemes(tiny_models):
    from qtensor.errors import QtoolError

    ctx = layer_context(tiny_models("llama"), scheme="w4a16")
    with pytest.raises(QtoolError, match="smoothquant"):
        smoothquant.prepare(ctx)


# ---- NVFP4 / MX scale search -----------------------------------------------------------------------------


def test_nvfp4_scale_search_not_worse_than_absmax_per_block():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(1, 256, generator=g))
    spec = WeightSpec.of(get_scheme("nvfp4"))
    plain = quantize_weight(w, spec)
    found = fpscale.nvfp4_search(w, 16)
    assert found.scales.dtype == torch.float8_e4m3fn and torch.equal(found.global_scale, plain.global_scale)
    # independent dequantization: E2M1 value table x e4m3 block scale x global scale
    table = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    deq = (table[found.codes.long()].reshape(64, 16, 16) * found.scales.float()[..., None] * found.global_scale).reshape(64, 256)
    assert torch.equal(deq, found.dequantize())
    e_plain = (plain.dequantize() - w).reshape(64, 16, 16).pow(2).sum(-1)
    e_found = (deq - w).reshape(64, 16, 16).pow(2).sum(-1)
    assert (e_found <= e_plain).all()
    assert e_found.sum() < 0.97 * e_plain.sum()


@pytest.mark.parametrize("scheme", ["mxfp4", "mxfp8"])
def test_mx_exponent_search_not_worse_than_ocp(scheme):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    spec = WeightSpec.of(get_scheme(scheme))
    plain, found = quantize_weight(w, spec), fpscale.mx_search(w, spec)
    e_plain = (plain.dequantize() - w).reshape(64, 8, 32).pow(2).sum(-1)
    e_found = (found.dequantize() - w).reshape(64, 8, 32).pow(2).sum(-1)
    assert (e_found <= e_plain).all()
    if scheme == "mxfp4":  # OCP's floor(log2 amax) - 2 clips values above 6 x 2^e: the search helps
        assert e_found.sum() < 0.95 * e_plain.sum()
    assert (found.scales.long() - plain.scales.long()).abs().max() <= 1


# ---- end to end: quantize -> eval on tiny models ---------------------------------------------------------


@pytest.mark.parametrize("arch,scheme,method", [
    ("gemma3", "w4a16", "awq"),
    ("llama", "w4a16", "awq"),
    ("qwen3_moe", "w4a16", "awq"),
    ("gemma3", "w4a16", "awq-gptq"),
    ("llama", "w4a16", "awq-gptq"),
    ("gemma3", "w8a8-int8", "smoothquant"),
    ("llama", "w8a8-int8-static", "smoothquant"),
    ("gemma3", "w8a8-int8-static", "smoothquant-gptq"),
    ("gemma3", "fp8", "fp8"),
    ("llama", "fp8-dynamic", "fp8"),
    ("llama", "fp8-block", "fp8"),
    ("gemma3", "fp8-dynamic", "gptq"),
    ("llama", "fp8", "gptq"),
    ("llama", "nvfp4", "nvfp4"),
    ("llama", "mxfp4", "mx"),
])
def test_quantize_eval_tiny(cli, tiny_models, tmp_path, arch, scheme, method):
    from calibrate.models import load_model
    from exporters.io import TensorDir
    from runtime.loader import load_quantized

    src = tiny_models(arch)
    out = tmp_path / "q"
    r = cli("quantize", src, "--scheme", scheme, "--method", method, "--format", "qtool", "--out", out, "--samples", "4", "--seqlen", "64", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    qmodel, ckpt = load_quantized(out)
    assert len(ckpt.qtensors) == res["modules"] > 0
    ref = load_model(src, torch.float32)
    if method in ("awq", "awq-gptq", "smoothquant", "smoothquant-gptq"):  # the folded norms are saved with the checkpoint
        assert any("<-" in n for n in res["notes"]), res["notes"]
        td = TensorDir(out)
        assert not torch.equal(td["model.layers.0.input_layernorm.weight"].float(), ref.model.layers[0].input_layernorm.weight.float())
    ids = torch.randint(3, 500, (1, 48))
    with torch.no_grad():
        pq, pr = qmodel(input_ids=ids).logits.log_softmax(-1), ref(input_ids=ids).logits.log_softmax(-1)
    kl = float((pr.exp() * (pr - pq)).sum(-1).mean())
    assert 0 < kl < 0.05, kl
    r = cli("eval", out, "--windows", "2", "--json")
    assert r.code == 0, r.err
    m = json.loads(r.out)
    assert m["kl_divergence"] > 0 and m["perplexity"] == m["perplexity"] and 0 < m["top1_agreement"] <= 1


def test_nvfp4_method_refuses_mx_schemes(cli, tiny_models, tmp_path):
    r = cli("quantize", tiny_models("llama"), "--scheme", "mxfp4", "--method", "nvfp4", "--format", "qtool", "--out", tmp_path / "q", "--samples", "2", "--seqlen", "32")
    assert r.code == 2 and "method mx" in r.err


@pytest.mark.parametrize("static_groups", [True, False])
def test_gptq_group_aware_order(static_groups):
    """act_order="group" (GPTQModel's act_group_aware): groups are processed whole, most important first,
    so no g_idx is needed; its error is below round-to-nearest's, and with static groups the group
    parameters are the plain ones of each original group."""
    from calibrate.algorithms.gptq import gptq_quantize
    from calibrate.algorithms.rtn import quantize_weight
    from qtensor.schemes import WeightSpec

    g = torch.Generator().manual_seed(3)
    k, n, G = 256, 48, 64
    x = torch.randn(2048, k, generator=g) * torch.linspace(0.1, 3, k)[torch.randperm(k, generator=g)]
    w = torch.randn(n, k, generator=g)
    H = 2 * x.t() @ x / x.shape[0]
    spec = WeightSpec("int", 4, G, True, None, torch.float16)
    r = gptq_quantize(w, H, spec, act_order="group", static_groups=static_groups)
    assert r.qtensor.g_idx is None
    err = lambda q: float(((q.dequantize() - w) @ x.t()).pow(2).sum())  # noqa: E731
    assert err(r.qtensor) < 0.95 * err(quantize_weight(w, spec))
    if static_groups:
        assert torch.equal(r.qtensor.scales, quantize_weight(w, spec).scales)


def test_nvfp4_native_calibrates_the_input_global_scale(cli, tiny_models, tmp_path):
    """NVFP4 activations need a calibrated global scale (compressed-tensors input_global_scale, ModelOpt
    input_scale): amax of the linear's input over the calibration samples / (6 * 448), float32-reciprocal
    exact. Layer 0's q_proj input does not depend on quantization: recomputed here with a hook on the float model."""
    from calibrate import data as cdata
    from calibrate import models as cmodels
    from exporters.io import TensorDir

    src = tiny_models("llama")
    for fmt in ("compressed-tensors", "modelopt"):
        out = tmp_path / fmt
        r = cli("quantize", src, "--scheme", "nvfp4", "--method", "nvfp4", "--format", fmt, "--out", out, "--samples", "4", "--seqlen", "64", "--compute-dtype", "float32")
        assert r.code == 0, r.err
    td = TensorDir(tmp_path / "compressed-tensors")
    ig = td["model.layers.0.self_attn.q_proj.input_global_scale"].float()
    assert torch.equal(ig, td["model.layers.0.self_attn.k_proj.input_global_scale"].float())
    model = cmodels.load_model(src, torch.float32)
    ids = cdata.calibration_samples(cmodels.load_tokenizer(src), None, 4, 64, 0, "text")
    amax = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: amax.append(float(a[0].abs().max())))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    h.remove()
    assert float(1 / ig) == pytest.approx(max(amax) / (6 * 448), rel=1e-5)
    mo = TensorDir(tmp_path / "modelopt")
    assert float(mo["model.layers.0.self_attn.q_proj.input_scale"]) == pytest.approx(max(amax) / (6 * 448), rel=1e-5)


def test_smoothquant_alpha_default_follows_the_activations(cli, tiny_models, tmp_path):
    """Per-token activations migrate with alpha 0.5, static per-tensor ones with 1.0 (one scale for all
    tokens needs flat channels); --option alpha overrides (a number, or the per-group search); a
    non-number is one error line."""
    src = tiny_models("llama")
    for scheme, extra, want in (("w8a8-int8", [], "alpha 0.5"), ("w8a8-int8-static", [], "alpha 1.0"),
                                ("w8a8-int8", ["--option", "alpha=search"], "alpha search"),
                                ("w8a8-int8-static", ["--option", "alpha=0.75"], "alpha 0.75")):
        r = cli("quantize", src, "--scheme", scheme, "--method", "smoothquant", "--format", "qtool", "--out", tmp_path / "q",
                "--samples", "2", "--seqlen", "32", "--force", "--json", *extra)
        assert r.code == 0, r.err
        assert any(f"smoothquant {want}:" in n for n in json.loads(r.out)["notes"]), json.loads(r.out)["notes"]
    r = cli("quantize", src, "--scheme", "w8a8-int8", "--method", "smoothquant", "--format", "qtool", "--out", tmp_path / "x",
            "--samples", "2", "--seqlen", "32", "--option", "alpha=strong")
    assert r.code == 2 and "alpha must be a number" in r.err and not (tmp_path / "x").exists()


def test_native_nvfp4_global_scales_round_trip_through_reciprocals():
    """compressed-tensors stores 1/global scale: every native NVFP4 weight (search, fused group, RTN) picks a
    float32 global scale whose reciprocal maps back exactly (about 16% of float32 values do not)."""
    from calibrate.algorithms import fpscale
    from calibrate.algorithms.rtn import quantize_weight
    from qtensor.schemes import WeightSpec

    spec = WeightSpec("e2m1", 4, 16, True, None, torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(3)
    for i in range(40):
        ws = [torch.randn(16, 64, generator=g) * float(torch.rand(1, generator=g) * 3 + 1e-3) for _ in range(2)]
        qts = [fpscale.nvfp4_search(ws[0]), quantize_weight(ws[0], spec)] + [q for q, _ in fpscale.quantize_nvfp4_group(ws, spec, {})]
        for qt in qts:
            assert nm.f32_reciprocal(qt.global_scale) is not None, (i, float(qt.global_scale))
        assert torch.equal(qts[2].global_scale, qts[3].global_scale)


# ---- GPTQ on the FP8 grid -------------------------------------------------------------------------------


def _textbook_gptq_fp8(W, H, scale, damp=0.01):
    """IST-DASLab's loop without blocks or act order, rounding onto e4m3 with fixed per-row scales."""
    W = W.clone().double()
    H = H.double()
    Hd = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    C = torch.zeros_like(W)
    for i in range(W.shape[1]):
        w = W[:, i]
        c = (w / scale.reshape(-1)).clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
        C[:, i] = c
        W[:, i:] -= ((w - c * scale.reshape(-1)) / Hinv[i, i])[:, None] * Hinv[i, i:][None, :]
    return C  # the e4m3 codes


@pytest.mark.parametrize("scheme", ["fp8", "fp8-dynamic"])
def test_gptq_fp8_matches_the_textbook_loop_and_beats_rtn(scheme):
    from calibrate.algorithms.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    n, k = 48, 256
    W = torch.randn(n, k, generator=g)
    X = torch.randn(1024, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))
    H = 2 * X.t() @ X / X.shape[0]
    spec = WeightSpec.of(get_scheme(scheme), None)
    rtn = quantize_weight(W, spec)
    r = gptq_quantize(W, H, spec, act_order=False)
    assert r.qtensor.dtype == "fp8_e4m3" and r.qtensor.codes.dtype == torch.float8_e4m3fn
    assert torch.equal(r.qtensor.scales, rtn.scales)  # absmax scales; GPTQ chooses the codes
    codes = _textbook_gptq_fp8(W, H, rtn.scales.double())
    assert float((r.qtensor.codes.double() == codes).double().mean()) > 0.98  # blocked float32 updates flip a few near-ties
    got = r.qtensor.dequantize().double()
    herr = lambda q: float(torch.einsum("ni,ij,nj->", q.double() - W.double(), H.double(), q.double() - W.double()))  # noqa: E731
    assert herr(got) < 0.7 * herr(rtn.dequantize())
    assert herr(gptq_quantize(W, H, spec, act_order=True).qtensor.dequantize()) < 0.7 * herr(rtn.dequantize())


def test_gptq_refuses_block_fp8_with_one_line(cli, tiny_models, tmp_path):
    r = cli("quantize", tiny_models("llama"), "--scheme", "fp8-block", "--method", "gptq", "--format", "compressed-tensors", "--out", tmp_path / "q",
            "--samples", "2", "--seqlen", "32")
    assert r.code == 2 and "method gptq with scheme fp8-block is not built yet" in r.err and "Traceback" not in r.err


# ---- RTN's clipping search, weighted by the inputs' mean square ---------------------------------------


def test_clip_search_weighted_by_input_energy_is_the_brute_force_optimum_and_spares_salient_weights():
    from calibrate.algorithms.rtn import mse_clip_search

    g = torch.Generator().manual_seed(0)
    n, k, gs = 16, 256, 128
    W = torch.randn(n, k, generator=g)
    W[:, 7] = 4.0 * W[:, 7].sign()  # large weights on one channel ...
    X = torch.randn(512, k, generator=g)
    X[:, 7] *= 30  # ... that meets large activations
    cw = X.square().mean(0)
    spec = WeightSpec.of(get_scheme("w4a16"), gs, True)
    got = mse_clip_search(W, spec, col_weight=cw)
    # brute force over the same grid, one (row, group) at a time
    ratios = [1.0 - 0.25 * i / 20 for i in range(21)]
    for r_i in range(n):
        for g_i in range(k // gs):
            cols = slice(g_i * gs, (g_i + 1) * gs)
            w = W[r_i, cols]
            errs = []
            for r in ratios:
                s = nm.int_qparams(w[None], 4, -1, True, spec.scale_dtype, r)[0].float()
                q = (w / s[0]).round().clamp(-8, 7) * s[0]
                errs.append(float(((q - w) ** 2 * cw[cols]).sum()))
            pick = min(range(len(ratios)), key=lambda i: abs(ratios[i] - float(got[r_i, g_i])))
            assert errs[pick] <= min(errs) * (1 + 1e-5)
    # the salient channel's groups keep (close to) their full range; plain weight MSE clips them
    plain = mse_clip_search(W, spec)
    out_err = lambda q: float((X @ (q.dequantize() - W).t()).square().sum())  # noqa: E731
    weighted_q = quantize_weight(W, spec, mse_clip=True, col_weight=cw)
    assert out_err(weighted_q) < out_err(quantize_weight(W, spec, mse_clip=True)) and out_err(weighted_q) <= out_err(quantize_weight(W, spec))
    assert float(got[:, 0].mean()) > float(plain[:, 0].mean())


def test_rtn_mse_clip_reads_the_calibration_inputs(cli, tiny_models, tmp_path):
    """`rtn --mse-clip` collects each linear's mean x^2 (all samples) and weights the search with it."""
    from calibrate.algorithms import get_method

    assert get_method("rtn", mse_clip=True).stats == ("act_sqmean",) and get_method("rtn").stats == ()
    src = tiny_models("llama")
    r = cli("quantize", src, "--scheme", "w4a16", "--method", "rtn", "--mse-clip", "--format", "qtool", "--out", tmp_path / "q",
            "--samples", "4", "--seqlen", "32", "--json")
    assert r.code == 0, r.err


@pytest.mark.parametrize("static", [True, False])
def test_smoothquant_alpha_search_picks_the_grid_point_of_least_w8a8_error(static):
    """Against an independent computation of each alpha's error (runtime fake quant of the activations,
    per-channel int8 RTN of the scaled weights, float64 products)."""
    from qtensor import ActQuant
    from runtime.qlinear import fake_quant_act

    g = torch.Generator().manual_seed(0)
    k = 128
    x = torch.randn(512, k, generator=g) * (1 + 20 * (torch.rand(k, generator=g) > 0.95))  # a few outlier channels
    ws = [torch.randn(64, k, generator=g) * 0.05, torch.randn(32, k, generator=g) * 0.05]
    spec = WeightSpec.of(get_scheme("w8a8-int8"), None)
    amax = x.abs().amax(0)
    pair = sm.Pair(["a", "b"], "n", "norm")
    best, errs = smoothquant.search_alpha(x, amax, ws, [spec, spec], static, pair)
    ref = []
    for alpha in smoothquant.ALPHAS:
        wmax = torch.cat(ws).abs().amax(0)
        s = amax.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
        xs = x / s
        act = ActQuant("static", "int8", "tensor", scale=(xs.abs().max() / 127).reshape(1)) if static else ActQuant("dynamic", "int8")
        xq = fake_quant_act(xs, act).double()
        e = sum(float((xq @ quantize_weight(w * s, spec).dequantize().double().t() - x.double() @ w.double().t()).square().sum()) for w in ws)
        ref.append(e)
    assert errs == pytest.approx(ref, rel=1e-3)
    assert best == smoothquant.ALPHAS[min(range(len(ref)), key=ref.__getitem__)]
