"""msModelSlim 26.1 as a backend (its Python LLM-PTQ API on CPU) on tiny Llamas (fp32 and bf16 sources)
and a tiny Gemma 3 (tied head): the QTensors qtool keeps equal what msModelSlim itself saved, read
independently from its safetensors; its static activation ranges come from qtool's own samples; the
result exports to msmodelslim and qtool formats and evaluates."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calibrate import data as cdata
from calibrate import models as cmodels
from calibrate.backends import msmodelslim as bms
from calibrate.backends.common import take_options
from exporters import read_checkpoint
from qtensor import get_scheme
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec
from quantize_cli import api

N, L = 4, 32  # qtool samples x seqlen (the built-in data adds BOS: 33 tokens a row)
LINEARS = 14  # 7 linears x 2 layers; lm_head stays float (msModelSlim's disable_last_linear)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from calibrate.tiny import make_tiny_model

    base = tmp_path_factory.mktemp("msb")
    return {"float32": make_tiny_model("llama", base / "f32", dtype=torch.float32),
            "bfloat16": make_tiny_model("llama", base / "bf16", dtype=torch.bfloat16)}


def _qtool_samples(src: Path) -> torch.Tensor:
    """The samples api.quantize draws for --samples N --seqlen L (default data, seed 0)."""
    return cdata.calibration_samples(cmodels.load_tokenizer(src), None, N, L, 0, "text")


def _saved(out: Path) -> dict:
    """msModelSlim's own output, read with safetensors alone (no qtool decoder)."""
    files = list(out.glob("*.safetensors"))
    assert len(files) == 1
    return load_file(str(files[0]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scheme", ["w8a8-int8-static", "w8a8-int8"])
def test_backend_equals_msmodelslim_saved_output(sources, tmp_path, dtype, scheme):
    src = sources[dtype]
    ids = _qtool_samples(src)
    # 1. msModelSlim itself, on those samples, saving with its own saver
    opts = take_options("msmodelslim", {}, bms.MsModelSlimBackend.OPTIONS)
    with bms.quiet_stdout():
        rolled = bms.run_msmodelslim(src, get_scheme(scheme), ids, opts, tmp_path / "ms")
    assert rolled == ["lm_head"]
    T = _saved(tmp_path / "ms")
    desc = json.loads(next((tmp_path / "ms").glob("quant_model_description*.json")).read_text())
    want_type = "W8A8" if scheme == "w8a8-int8-static" else "W8A8_DYNAMIC"
    assert desc["model_quant_type"] == want_type and desc["lm_head.weight"] == "FLOAT"
    # 2. the backend through qtool's API
    r = api.quantize(str(src), scheme, format="qtool", out=tmp_path / "q", samples=N, seqlen=L, backend="msmodelslim")
    ck = read_checkpoint(tmp_path / "q")
    assert ck.meta["calibration"]["tokens_sha256"] == hashlib.sha256(ids.numpy().tobytes()).hexdigest()  # the same samples
    assert ck.meta["backend"] == "msmodelslim" and ck.meta["options"]["quant_type"] == want_type
    assert "msModelSlim kept in float: lm_head" in r["notes"]
    quantized = {k[: -len(".weight")] for k, t in desc.items() if k.endswith(".weight") and t == want_type}
    assert set(ck.qtensors) == quantized and len(quantized) == LINEARS
    for name, qt in ck.qtensors.items():
        w, s = T[f"{name}.weight"], T[f"{name}.weight_scale"]
        assert w.dtype == torch.int8 and s.dtype == torch.float32
        assert not T[f"{name}.weight_offset"].any()  # symmetric per-channel weights
        assert torch.equal(qt.dequantize(), w.float() * s.reshape(-1, 1)), name
        assert qt.group_size == -1 and qt.sym
        if scheme == "w8a8-int8-static":
            assert qt.act.kind == "static" and qt.act.granularity == "tensor"
            assert torch.equal(qt.act.scale.reshape(1), T[f"{name}.input_scale"]), name
            off = qt.act.offset if qt.act.offset is not None else torch.zeros(1)
            assert torch.equal(off.reshape(1), T[f"{name}.input_offset"]), name
        else:
            assert (qt.act.kind, qt.act.granularity, qt.act.dtype) == ("dynamic", "token", "int8")
    # everything else as the source (norms, embeddings, the float head), in the source dtype
    from exporters.io import TensorDir

    srct = TensorDir(src)
    for k, v in ck.tensors.items():
        assert v.dtype == getattr(torch, dtype) and torch.equal(v, srct[k]), k


def test_static_ranges_come_from_qtool_samples(sources, tmp_path):
    """msModelSlim's min-max (act_method=1) averages each sample's min and max: scale = (max - min) / 255,
    offset = round(-128 - min / scale). Layer 0's q/k/v read the float embeddings through the float norm,
    so their ranges, recomputed here with plain transformers on qtool's samples, are exactly msModelSlim's."""
    src = sources["float32"]
    ids = _qtool_samples(src)
    api.quantize(str(src), "w8a8-int8-static", format="msmodelslim", out=tmp_path / "m", samples=N, seqlen=L, backend="msmodelslim")
    ck = read_checkpoint(tmp_path / "m")
    model = cmodels.load_model(src, torch.float32, "cpu")
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, x, y: seen.append((x[0].min(), x[0].max())))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    lo, hi = torch.stack([a for a, _ in seen]).mean(), torch.stack([b for _, b in seen]).mean()
    scale = (hi - lo) / 255
    for p in ("q_proj", "k_proj", "v_proj"):
        qt = ck.qtensors[f"model.layers.0.self_attn.{p}"]
        assert torch.allclose(qt.act.scale.reshape(()), scale, rtol=1e-5, atol=0), p
        off = float(qt.act.offset) if qt.act.offset is not None else 0.0
        assert off == float(torch.round(-128 - lo / scale)), p
    # other samples give other ranges: the check above can fail
    other = api.quantize(str(src), "w8a8-int8-static", format="qtool", out=tmp_path / "o", samples=N, seqlen=L, seed=1, backend="msmodelslim")
    assert other["modules"] == LINEARS
    q1 = read_checkpoint(tmp_path / "o").qtensors["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(q1.act.scale, ck.qtensors["model.layers.0.self_attn.q_proj"].act.scale)


def _eval_ok(path: Path) -> dict:
    r = api.evaluate(path, windows=2)
    assert all(math.isfinite(r[k]) for k in ("perplexity", "kl_divergence", "top1_agreement"))
    assert r["kl_divergence"] < 0.05  # W8A8 on a tiny model: close to the reference
    return r


@pytest.mark.parametrize("arch", ["llama-bf16", "gemma3"])
def test_backend_to_formats_and_eval(sources, tiny_models, tmp_path, arch):
    src = sources["bfloat16"] if arch == "llama-bf16" else tiny_models("gemma3")  # gemma3: tied lm_head
    api.quantize(str(src), "w8a8-int8-static", format="msmodelslim", out=tmp_path / "m", samples=N, seqlen=L, backend="msmodelslim")
    ck = read_checkpoint(tmp_path / "m")
    assert ck.format == "msmodelslim" and len(ck.qtensors) == LINEARS
    if arch == "gemma3":
        assert "lm_head.weight" not in ck.tensors  # tied to the embeddings, written once
    _eval_ok(tmp_path / "m")
    api.export(tmp_path / "m", "qtool", tmp_path / "q")
    back = read_checkpoint(tmp_path / "q")
    assert all(back.qtensors[n].equal(q) for n, q in ck.qtensors.items())
    _eval_ok(tmp_path / "q")


def test_decoder_reads_python_api_naming(sources, tmp_path, monkeypatch):
    """Calibrator.save(save_type=["safe_tensor"]) writes quant_model_weight_w8a8.safetensors and
    quant_model_description_w8a8.json (no version/group_size); qtool reads it as msmodelslim, the same
    as under the CLI's name quant_model_description.json; two descriptions are refused."""
    src = sources["float32"]
    opts = take_options("msmodelslim", {}, bms.MsModelSlimBackend.OPTIONS)
    d = tmp_path / "ms"
    monkeypatch.chdir(tmp_path)
    with bms.quiet_stdout():
        bms.run_msmodelslim(src, get_scheme("w8a8-int8-static"), _qtool_samples(src), opts, d)
    assert [p.name for p in tmp_path.iterdir()] == ["ms"]  # msModelSlim's features.npy stays out of the working directory
    assert sorted(p.name for p in d.iterdir()) == ["quant_model_description_w8a8.json", "quant_model_weight_w8a8.safetensors"]
    shutil.copy(src / "config.json", d / "config.json")
    a = read_checkpoint(d)
    assert a.format == "msmodelslim" and len(a.qtensors) == LINEARS
    v1 = tmp_path / "v1"
    shutil.copytree(d, v1)
    (v1 / "quant_model_description_w8a8.json").rename(v1 / "quant_model_description.json")
    b = read_checkpoint(v1)
    assert all(b.qtensors[n].equal(q) for n, q in a.qtensors.items())
    shutil.copy(d / "quant_model_description_w8a8.json", d / "quant_model_description_w8a8_dynamic.json")
    with pytest.raises(QtoolError, match="several msModelSlim descriptions"):
        read_checkpoint(d)


def test_backend_errors(cli, sources, tmp_path):
    src = sources["float32"]
    r = cli("quantize", src, "--scheme", "w4a16", "--format", "qtool", "--out", tmp_path / "o", "--backend", "msmodelslim")
    assert r.code == 2 and "backend msmodelslim supports: w8a8-int8-static, w8a8-int8" in r.err
    r = cli("quantize", src, "--scheme", "w8a8-int8", "--format", "qtool", "--out", tmp_path / "o", "--backend", "msmodelslim", "--option", "act_mehtod=2")
    assert r.code == 2 and "does not take option(s) act_mehtod" in r.err
    r = cli("quantize", src, "--scheme", "w8a8-int8", "--format", "qtool", "--out", tmp_path / "o", "--backend", "msmodelslim", "--asym")
    assert r.code == 2 and "symmetric" in r.err
    r = cli("quantize", src, "--scheme", "w8a8-int8", "--format", "qtool", "--out", tmp_path / "o", "--backend", "msmodelslim",
            "--option", "disable_names=model.layers.9.mlp.up_proj")
    assert r.code == 2 and "msmodelslim 26.1.0 failed" in r.err and "disable_names" in r.err
    assert not (tmp_path / "o").exists()
    b = bms.MsModelSlimBackend()
    sch = get_scheme("w8a8-int8-static")
    with pytest.raises(QtoolError, match="on CPU only"):  # checked before anything loads: no GPU needed to see it
        b.quantize(src, sch, WeightSpec.of(sch), _qtool_samples(src), {}, "cuda", None)
    w4a8 = get_scheme("w4a8")
    with pytest.raises(QtoolError, match="does not support scheme w4a8 .*supports: w8a8-int8-static, w8a8-int8"):
        b.quantize(src, w4a8, WeightSpec.of(w4a8), _qtool_samples(src), {}, "cpu", None)


def test_options_pass_through(sources, tmp_path):
    """disable_names keeps a layer float (msModelSlim's rollback, reported in the notes)."""
    src = sources["float32"]
    keep = "model.layers.1.mlp.down_proj"
    r = api.quantize(str(src), "w8a8-int8-static", format="msmodelslim", out=tmp_path / "m", samples=N, seqlen=L, backend="msmodelslim",
                     options={"disable_names": keep, "act_method": "2"})
    ck = read_checkpoint(tmp_path / "m")
    assert keep not in ck.qtensors and len(ck.qtensors) == LINEARS - 1
    assert f"msModelSlim kept in float: lm_head, {keep}" in r["notes"]
    assert ck.meta["options"]["act_method"] == 2
    _eval_ok(tmp_path / "m")
