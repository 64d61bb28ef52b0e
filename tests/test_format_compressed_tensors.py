import json

import pytest
import torch

from exporters import read_checkpoint, write_checkpoint
from exporters.io import TensorDir
from qtensor import ActQuant, get_scheme
from qtensor import numerics as nm
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from .helpers import make_checkpoint

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "qwen3_moe"]
CASES = [("w4a16", True), ("w4a16", False), ("w8a16", True), ("w8a16", False), ("w8a8-int8", True), ("w8a8-int8-static", True),
         ("fp8", True), ("fp8-dynamic", True), ("fp8-block", True), ("nvfp4", True)]
FORMAT = {"w4a16": "pack-quantized", "w8a16": "pack-quantized", "w8a8-int8": "int-quantized", "w8a8-int8-static": "int-quantized",
          "fp8": "float-quantized", "fp8-dynamic": "float-quantized", "fp8-block": "float-quantized", "nvfp4": "nvfp4-pack-quantized"}


def ct_checkpoint(model_dir, scheme: str, sym: bool = True):
    """A checkpoint with the activation side filled the way calibration would (static scales, NVFP4 input
    global scale) and NVFP4 global scales picked on the float32-reciprocal grid compressed-tensors stores."""
    s = get_scheme(scheme)
    ckpt = make_checkpoint(model_dir, WeightSpec.of(s, None, sym))
    g = torch.Generator().manual_seed(1)
    for qt in ckpt.qtensors.values():
        amax = torch.rand(1, generator=g) * 3 + 0.5
        if s.act_kind == "static":
            qt.act = ActQuant("static", s.act_dtype, "tensor", scale=(amax / (127.0 if s.act_dtype == "int8" else 448.0)).reshape(1))
        elif s.act_kind == "dynamic":
            scale = nm.f32_reciprocal_snap(amax / 2688.0).reshape(()) if s.act_dtype == "e2m1" else None
            qt.act = ActQuant("dynamic", s.act_dtype, s.act_granularity, scale=scale, group_size=16 if s.act_dtype == "e2m1" else 0)
        if qt.global_scale is not None:
            qt.global_scale = nm.f32_reciprocal_snap(qt.global_scale)
    return ckpt


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme,sym", CASES)
def test_ct_roundtrip_bit_identical(tiny_models, tmp_path, arch, scheme, sym):
    ckpt = ct_checkpoint(tiny_models(arch), scheme, sym)
    write_checkpoint(ckpt, "compressed-tensors", tmp_path / "c")
    back = read_checkpoint(tmp_path / "c")
    assert back.format == "compressed-tensors" and set(back.qtensors) == set(ckpt.qtensors)
    for name, qt in ckpt.qtensors.items():
        b = back.qtensors[name]
        assert b.equal(qt), name
        assert torch.equal(b.dequantize(), qt.dequantize())
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == FORMAT[scheme] and cfg["quantization_status"] == "compressed"
    routers = {k[:-7] for k in TensorDir(tmp_path / "c") if k.endswith(".mlp.gate.weight")}
    assert bool(routers) == (arch == "qwen3_moe")  # MoE routers stay in full precision, listed in ignore
    assert cfg["ignore"][0] == "lm_head" and set(cfg["ignore"]) == {"lm_head", *routers} and list(cfg["config_groups"]) == ["group_0"]
    assert cfg["config_groups"]["group_0"]["targets"] == ["Linear"]


def test_ct_config_parses_with_compressed_tensors(tiny_models, tmp_path):
    """compressed-tensors' own pydantic model accepts every config we write and reads the same args back."""
    from compressed_tensors.quantization import QuantizationConfig

    for scheme, sym in CASES:
        out = tmp_path / f"{scheme}{sym}"
        write_checkpoint(ct_checkpoint(tiny_models("llama"), scheme, sym), "compressed-tensors", out)
        raw = json.loads((out / "config.json").read_text())["quantization_config"]
        qc = QuantizationConfig.model_validate(raw)
        w = qc.config_groups["group_0"].weights
        assert w.num_bits == raw["config_groups"]["group_0"]["weights"]["num_bits"] and w.symmetric == sym
        assert qc.format == FORMAT[scheme]


def test_ct_tensor_layout(tiny_models, tmp_path):
    name = "model.layers.0.mlp.down_proj"
    n, k = 128, 256
    for scheme, sym in (("w4a16", False), ("fp8-block", True), ("nvfp4", True), ("w8a8-int8-static", True)):
        ckpt = ct_checkpoint(tiny_models("qwen2"), scheme, sym)
        out = tmp_path / scheme
        write_checkpoint(ckpt, "compressed-tensors", out)
        td = TensorDir(out)
        qt = ckpt.qtensors[name]
        if scheme == "w4a16":
            assert td[f"{name}.weight_packed"].dtype == torch.int32 and td.shape(f"{name}.weight_packed") == [n, k // 8]
            assert td.shape(f"{name}.weight_zero_point") == [n // 8, k // 128] and td[f"{name}.weight_shape"].tolist() == [n, k]
            # lowest nibble first along K, codes as is (CT signed code + 8 == our unsigned code)
            assert int(td[f"{name}.weight_packed"][0, 0]) & 0xF == int(qt.codes[0, 0])
            assert int(td[f"{name}.weight_zero_point"][0, 0]) & 0xF == int(qt.zeros[0, 0])
        elif scheme == "fp8-block":
            assert td[f"{name}.weight"].dtype == torch.float8_e4m3fn and td.shape(f"{name}.weight_scale") == [1, 2]
        elif scheme == "nvfp4":
            assert td[f"{name}.weight_packed"].dtype == torch.uint8 and td.shape(f"{name}.weight_packed") == [n, k // 2]
            assert td[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn and td.shape(f"{name}.weight_scale") == [n, k // 16]
            # reciprocal convention: weight_global_scale = 1 / qtool's (ModelOpt's weight_scale_2)
            assert float(td[f"{name}.weight_global_scale"]) * float(qt.global_scale) == pytest.approx(1.0, rel=1e-6)
            assert float(td[f"{name}.input_global_scale"]) * float(qt.act.scale) == pytest.approx(1.0, rel=1e-6)
        else:
            assert td[f"{name}.weight"].dtype == torch.int8 and td.shape(f"{name}.weight_scale") == [n, 1]
            assert td.shape(f"{name}.input_scale") == [1]


def test_ct_kv_cache_scheme(tiny_models, tmp_path):
    ckpt = ct_checkpoint(tiny_models("llama"), "fp8")
    ckpt.kv_cache_dtype = "fp8_e4m3"
    for i in range(2):
        ckpt.kv_scales[f"model.layers.{i}.self_attn"] = (torch.tensor(0.02), torch.tensor(0.03))
    write_checkpoint(ckpt, "compressed-tensors", tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert cfg["kv_cache_scheme"]["num_bits"] == 8 and cfg["kv_cache_scheme"]["type"] == "float"
    back = read_checkpoint(tmp_path / "c")
    assert float(back.kv_scales["model.layers.1.self_attn"][1]) == pytest.approx(0.03)
    assert not any(k.endswith("_scale") and "self_attn." in k and k.count(".") == 4 for k in back.tensors)


def test_ct_mixed_schemes(tiny_models, tmp_path):
    ckpt = ct_checkpoint(tiny_models("llama"), "w4a16")
    other = ct_checkpoint(tiny_models("llama"), "fp8-dynamic")
    name = "model.layers.1.mlp.down_proj"
    ckpt.qtensors[name] = other.qtensors[name]
    write_checkpoint(ckpt, "compressed-tensors", tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "mixed-precision" and cfg["config_groups"]["group_1"]["targets"] == [name]
    back = read_checkpoint(tmp_path / "c")
    for n, qt in ckpt.qtensors.items():
        assert back.qtensors[n].equal(qt), n


def test_ct_refusals(tiny_models, tmp_path, cli):
    # act order, MX, 3-bit: exit 2 with the reason, nothing written
    for scheme, kw, reason in (("w4a16", {"act_order": True, "static_groups": False}, "act order"), ("mxfp4", {}, "MX formats"),
                               ("w4a16", {"bits": 3}, "3-bit")):
        from dataclasses import replace

        spec = WeightSpec.of(get_scheme(scheme))
        if "bits" in kw:
            spec = replace(spec, bits=kw.pop("bits"))
        ckpt = make_checkpoint(tiny_models("llama"), spec, **kw)
        src = tmp_path / f"src-{scheme}-{reason[:3]}"
        write_checkpoint(ckpt, "qtool", src)
        r = cli("export", src, "--format", "compressed-tensors", "--out", tmp_path / "c")
        assert r.code == 2 and reason in r.err, r.err
        assert not (tmp_path / "c").exists()


def test_ct_refuses_non_reciprocal_global_scale(tiny_models, tmp_path):
    ckpt = ct_checkpoint(tiny_models("llama"), "nvfp4")
    qt = next(iter(ckpt.qtensors.values()))
    x = torch.tensor(3.0e-4)
    while nm.f32_reciprocal(x) is not None:  # find a float32 that no float32 reciprocal maps back to
        x = torch.nextafter(x, torch.tensor(1.0))
    qt.global_scale = x
    with pytest.raises(QtoolError, match="reciprocal"):
        write_checkpoint(ckpt, "compressed-tensors", tmp_path / "c")


def test_ct_malformed(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    write_checkpoint(ct_checkpoint(tiny_models("llama"), "fp8"), "compressed-tensors", tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    t = load_file(f)
    del t["model.layers.0.self_attn.k_proj.input_scale"]
    save_file(t, f)
    with pytest.raises(QtoolError, match=r"missing tensor model\.layers\.0\.self_attn\.k_proj\.input_scale"):
        read_checkpoint(tmp_path / "c")
