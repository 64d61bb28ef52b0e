"""`qtool eval --report DIR`: per-layer relative output error, its PNG chart and the markdown summary.

The checkpoint is the tiny Llama at 8 bits with the scales of one layer multiplied by 4; that layer
must come out worst. The reported errors are checked against an independent computation: the
layer's input in the reference model (a hook), the GPTQ tensors dequantized by hand, float64 matmuls.
"""

import json
import shutil
import struct
import zlib

import pytest
import torch

from exporters.io import TensorDir
from tests.helpers import corrupt_scales

LAYER = "model.layers.0.mlp.down_proj"
OTHER = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def reported(tiny_models, tmp_path_factory):
    from quantize_cli import api

    base = tmp_path_factory.mktemp("report")
    ck = base / "bad"
    api.quantize(str(tiny_models("llama")), scheme="w8a16", method="rtn", format="gptq", out=ck)
    corrupt_scales(ck, LAYER, 4.0)
    return ck, base


def gptq_dequant_by_hand(td, name, bits=8):
    qw = td[f"{name}.qweight"].to(torch.int64) & 0xFFFFFFFF
    qz = td[f"{name}.qzeros"].to(torch.int64) & 0xFFFFFFFF
    sc = td[f"{name}.scales"].to(torch.float64)
    per, mask = 32 // bits, (1 << bits) - 1
    k, n = qw.shape[0] * per, qw.shape[1]
    codes = torch.stack([(qw >> (bits * i)) & mask for i in range(per)], 1).reshape(k, n)
    zeros = torch.stack([(qz >> (bits * i)) & mask for i in range(per)], 2).reshape(qz.shape[0], n) + 1  # v1 stores z-1
    g = td[f"{name}.g_idx"].long()
    return ((codes - zeros[g]).to(torch.float64) * sc[g]).t()  # [N, K]


def png_info(path):
    b = path.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(b):
        (length,) = struct.unpack(">I", b[pos : pos + 4])
        ctype = b[pos + 4 : pos + 8]
        data = b[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", b[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(ctype + data) & 0xFFFFFFFF == crc, f"bad CRC in {ctype}"
        chunks.append((ctype, data))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h = struct.unpack(">II", chunks[0][1][:8])
    return w, h, len(b)


def test_report_files_and_worst_layer(cli, reported):
    ck, base = reported
    rdir = base / "rep"
    r = cli("eval", ck, "--windows", "1", "--report", rdir, "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    rep = out["report"]
    assert rep["worst"][0]["name"] == LAYER
    assert rep["layers"] == 14 and rep["not_measured"] == []
    assert rep["calibration"]["samples"] == 8 and rep["calibration"]["seqlen"] == 512
    # the chart: a valid PNG of a real size, with the highlight colour in it
    w, h, size = png_info(rdir / "layer_errors.png")
    assert w >= 600 and h >= 300 and size > 10_000
    import matplotlib.image as mpimg

    img = mpimg.imread(rdir / "layer_errors.png")[..., :3]
    red = (abs(img[..., 0] - 0xD6 / 255) < 0.02) & (abs(img[..., 1] - 0x27 / 255) < 0.02) & (abs(img[..., 2] - 0x28 / 255) < 0.02)
    grey = (abs(img - 0x7F / 255) < 0.02).all(-1)
    assert red.sum() > 500 and grey.sum() > 500  # 5 highlighted bars, 9 plain ones
    # the markdown: overall metrics and the corrupted layer ranked first
    md = (rdir / "report.md").read_text()
    assert f"| 1 | `{LAYER}` |" in md
    assert "| KL divergence |" in md and f"{out['kl_divergence']:.5f}" in md
    assert "layer_errors.png" in md
    # every layer in report.json, in model order; the summary also lands in qtool.json
    data = json.loads((rdir / "report.json").read_text())
    names = [row["name"] for row in data["layers"]]
    assert len(names) == 14 and names.index("model.layers.0.self_attn.q_proj") < names.index("model.layers.0.mlp.down_proj") < names.index(OTHER)
    saved = json.loads((ck / "qtool.json").read_text())["eval"]["report"]
    assert saved["worst"][0]["name"] == LAYER and saved["dir"] == str(rdir)


def test_reported_errors_match_independent_computation(cli, reported, tiny_models):
    from calibrate import data as cdata
    from calibrate.models import load_model, load_tokenizer

    ck, base = reported
    rdir = base / "rep2"
    r = cli("eval", ck, "--windows", "1", "--report", rdir, "--json")
    assert r.code == 0, r.err
    rows = {row["name"]: row["rel_error"] for row in json.loads((rdir / "report.json").read_text())["layers"]}
    src = tiny_models("llama")
    ref = load_model(src, torch.float32)
    ids = cdata.calibration_samples(load_tokenizer(ck), None, 8, 512, 0)
    td = TensorDir(ck)
    want = {}
    for name in (LAYER, OTHER):
        lin = ref.get_submodule(name)
        wq = gptq_dequant_by_hand(td, name)
        w = lin.weight.detach().to(torch.float64)
        acc = [0.0, 0.0]

        def hook(m, inp, out, wq=wq, w=w, acc=acc):
            x = inp[0].to(torch.float64).reshape(-1, inp[0].shape[-1])
            acc[0] += float((x @ wq.t() - x @ w.t()).pow(2).sum())
            acc[1] += float((x @ w.t()).pow(2).sum())

        h = lin.register_forward_hook(hook)
        with torch.no_grad():
            for row in ids:
                ref(input_ids=row[None], use_cache=False)
        h.remove()
        want[name] = (acc[0] / acc[1]) ** 0.5
    assert 2.5 < want[LAYER] < 3.5  # 4x scales: y_q ~ 4 y_ref
    assert want[OTHER] < 0.05
    for name, v in want.items():
        assert rows[name] == pytest.approx(v, rel=2e-3), name
    assert rows[LAYER] > 50 * sorted(rows.values())[len(rows) // 2]


def test_report_bad_input(cli, reported, tiny_models, tmp_path):
    ck, _ = reported
    fresh = tmp_path / "ck"
    shutil.copytree(ck, fresh)
    f = tmp_path / "a_file"
    f.write_text("x")
    r = cli("eval", fresh, "--windows", "1", "--report", f)
    assert r.code == 2 and r.err.startswith("error:") and "not a directory" in r.err
    r = cli("eval", fresh, "--windows", "1", "--report", tmp_path / "r", "--no-reference")
    assert r.code == 2 and r.err.startswith("error:")
    r = cli("eval", tiny_models("llama"), "--windows", "1", "--report", tmp_path / "r")
    assert r.code == 2 and r.err.startswith("error:") and "quantized" in r.err
    assert not (tmp_path / "r").exists()
