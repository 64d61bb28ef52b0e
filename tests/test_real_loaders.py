"""Real third-party loaders and producers on CPU: transformers (+ gptqmodel / auto-round / compressed-tensors),
GPTQModel and AutoRound writing checkpoints that qtool reads, converts and converts back bit-exactly."""

import json
from pathlib import Path

import pytest
import torch

from exporters import read_checkpoint, write_checkpoint
from exporters.io import TensorDir
from runtime.loader import load_quantized

from .test_format_compressed_tensors import CASES, ct_checkpoint

IDS = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(0))


def qtool_logits(path: Path) -> torch.Tensor:
    model, _ = load_quantized(path, torch.float32)
    with torch.no_grad():
        return model(IDS).logits.float()


def hf_logits(path: Path, **kw) -> tuple[torch.Tensor, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu", **kw)
    with torch.no_grad():
        return m(IDS).logits.float(), m


def assert_logits_close(a: torch.Tensor, b: torch.Tensor):
    # transformers runs the dequantized weights in fp16; qtool's runtime in float32: fp16 rounding only
    assert (a - b).abs().max() <= 2e-3 * b.abs().max() + 1e-3, (a - b).abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_gptq_output_loads_in_transformers(tiny_models, tmp_path, cli):
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--method", "rtn", "--format", "gptq", "--out", tmp_path / "g", "--samples", "2", "--seqlen", "32")
    assert r.code == 0, r.err
    out, m = hf_logits(tmp_path / "g")
    assert "gptqmodel" in type(m.model.layers[0].self_attn.q_proj).__module__  # a real quantized kernel, not a dense fallback
    assert_logits_close(out, qtool_logits(tmp_path / "g"))


def test_auto_round_output_loads_in_transformers(tiny_models, tmp_path, cli):
    from transformers import AutoRoundConfig

    r = cli("quantize", tiny_models("qwen2"), "--scheme", "w4a16", "--method", "rtn", "--format", "auto-round", "--out", tmp_path / "r", "--samples", "2", "--seqlen", "32")
    assert r.code == 0, r.err
    out, m = hf_logits(tmp_path / "r", quantization_config=AutoRoundConfig(backend="torch"))
    assert "auto_round" in type(m.model.layers[0].self_attn.q_proj).__module__
    assert_logits_close(out, qtool_logits(tmp_path / "r"))


@pytest.mark.parametrize("scheme,sym", [c for c in CASES if c[0] not in ("w8a8-int8-static",)])
def test_ct_output_decompresses_with_compressed_tensors(tiny_models, tmp_path, scheme, sym):
    """transformers + compressed-tensors' ModelCompressor (run_compressed=False) decompress our files;
    the dense weights equal QTensor.dequantize() (int/fp8: exactly, in the scale dtype; NVFP4: CT divides
    by its global scale where qtool multiplies by the reciprocal, and casts to bf16, so within 1 bf16 ulp)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt = ct_checkpoint(tiny_models("llama"), scheme, sym)
    write_checkpoint(ckpt, "compressed-tensors", tmp_path / "c")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32, device_map="cpu",
                                             quantization_config=CompressedTensorsConfig(run_compressed=False))
    mods = dict(m.named_modules())
    for name, qt in ckpt.qtensors.items():
        w = mods[name].weight.detach()
        assert w.dtype.is_floating_point and w.element_size() >= 2 and list(w.shape) == list(qt.shape), name
        ours = qt.dequantize()
        if scheme == "nvfp4":  # CT 0.20 decompresses NVFP4 to bf16: at most 1 bf16 ulp apart (double rounding)
            ours16 = ours.to(torch.bfloat16).float()
            torch.testing.assert_close(w.float(), ours16, rtol=2.0**-7, atol=0)
            assert (w.float() == ours16).float().mean() > 0.99, name
        else:
            sdt = qt.scales.dtype if qt.scales.dtype.is_floating_point and qt.scales.element_size() > 1 else torch.float32
            assert torch.equal(w.to(sdt), ours.to(sdt)), name


# ---- real producers --------------------------------------------------------------------------------------


def _structure(path: Path) -> dict:
    td = TensorDir(path)
    return {k: (str(td[k].dtype), td.shape(k)) for k in td if ".layers." in k}


@pytest.fixture(scope="module")
def autoround_dir(tiny_models, tmp_path_factory):
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models("llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    out = tmp_path_factory.mktemp("autoround")
    ar = AutoRound(model, tok, bits=4, group_size=128, sym=True, iters=0, disable_opt_rtn=True, nsamples=2, seqlen=32,
                   dataset=["def f(x):\n    return x + 1\n" * 8] * 4, device_map="cpu")
    ar.quantize_and_save(str(out), format="auto_round")
    (d,) = [p.parent for p in out.rglob("config.json")]
    return d


def test_autoround_checkpoint_reads_converts_back(autoround_dir, tmp_path):
    src = read_checkpoint(autoround_dir)
    assert src.format == "auto-round" and len(src.qtensors) == 14
    write_checkpoint(src, "gptq", tmp_path / "g")
    write_checkpoint(read_checkpoint(tmp_path / "g"), "auto-round", tmp_path / "r")
    back = read_checkpoint(tmp_path / "r")
    for name, qt in src.qtensors.items():
        assert back.qtensors[name].equal(qt), name
    # and the AutoRound file itself: same tensors as qtool's re-encoding, byte for byte
    a, b = TensorDir(autoround_dir), TensorDir(tmp_path / "r")
    for name in src.qtensors:
        for sfx in ("qweight", "qzeros", "scales"):
            assert torch.equal(a[f"{name}.{sfx}"], b[f"{name}.{sfx}"]), f"{name}.{sfx}"


def test_autoround_structure_matches_qtool(autoround_dir, tiny_models, tmp_path, cli):
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--method", "rtn", "--format", "auto-round", "--out", tmp_path / "r", "--samples", "2", "--seqlen", "32")
    assert r.code == 0, r.err
    ours, theirs = _structure(tmp_path / "r"), _structure(autoround_dir)
    from auto_round.utils.device import CpuInfo

    if not CpuInfo().bf16:  # AutoRound then works and writes its unquantized tensors (norms) in fp32, not bf16
        quant = (".qweight", ".qzeros", ".scales", ".g_idx")
        theirs = {k: ("torch.bfloat16" if d == "torch.float32" and not k.endswith(quant) else d, sh) for k, (d, sh) in theirs.items()}
    assert ours == theirs
    theirs = json.loads((autoround_dir / "config.json").read_text())["quantization_config"]
    ours = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]
    # AutoRound's own algorithm knobs (amp: written where it ran in fp32, e.g. a CPU without bf16)
    tuning_only = {"enable_quanted_input", "iters", "nsamples", "seqlen", "lr", "minmax_lr", "amp"}
    assert set(ours) - tuning_only == set(theirs) - tuning_only
    for k in ("quant_method", "packing_format", "bits", "group_size", "sym", "data_type", "block_name_to_quantize"):
        assert ours[k] == theirs[k], k
    assert (autoround_dir / "quantization_config.json").is_file() == (tmp_path / "r" / "quantization_config.json").is_file()


@pytest.fixture(scope="module")
def gptqmodel_dir(tiny_models, tmp_path_factory):
    import os

    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    # GPTQModel 7.7 sizes its 'cpu' pool as (cores+1)//2 but asks for a 2-worker 'model_loader:cpu' sub-pool:
    # on a 2-core machine that is 1 < 2 and DeviceThreadPool raises. Its own env override fixes the count.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    src = tiny_models("llama")
    out = tmp_path_factory.mktemp("gptqmodel")
    work = tmp_path_factory.mktemp("gptqmodel-cwd")  # GPTQModel writes ./logs and offload dirs into the cwd
    old = os.getcwd()
    os.chdir(work)
    try:
        tok = AutoTokenizer.from_pretrained(src)
        calib = [{k: v for k, v in tok("def f(x):\n    return x * 2 + 1\n" * 4 + str(i)).items()} for i in range(4)]
        cfg = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False, device="cpu", offload_to_disk=False)
        model = GPTQModel.load(str(src), cfg)
        model.quantize(calib, batch_size=1)
        model.save(str(out))
    finally:
        os.chdir(old)
    return out


def test_gptqmodel_checkpoint_reads_converts_back(gptqmodel_dir, tmp_path):
    src = read_checkpoint(gptqmodel_dir)
    assert src.format == "gptq" and len(src.qtensors) == 14
    write_checkpoint(src, "auto-round", tmp_path / "r")
    write_checkpoint(read_checkpoint(tmp_path / "r"), "gptq", tmp_path / "g")
    back = read_checkpoint(tmp_path / "g")
    for name, qt in src.qtensors.items():
        assert back.qtensors[name].equal(qt), name


def test_gptqmodel_structure_matches_qtool(gptqmodel_dir, tiny_models, tmp_path, cli):
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--out", tmp_path / "g", "--samples", "2", "--seqlen", "32")
    assert r.code == 0, r.err
    assert _structure(tmp_path / "g") == _structure(gptqmodel_dir)
    theirs = json.loads((gptqmodel_dir / "config.json").read_text())["quantization_config"]
    ours = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    missing = set(theirs) - set(ours)
    assert not missing, f"config keys GPTQModel writes and qtool does not: {sorted(missing)}"
    for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format"):
        assert ours[k] == theirs[k], k
