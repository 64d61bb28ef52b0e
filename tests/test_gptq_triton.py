"""The Triton GPTQ block kernel gives the same codes as the torch column loop (CPU, TRITON_INTERPRET=1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import torch
from calibrate.algorithms.gptq import gptq_quantize
from qtensor import get_scheme
from qtensor.schemes import WeightSpec
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 2, 256)
H = 2 * x.t() @ x / 512
w = torch.randn(48, 256, generator=g)
for gs, sym, act in ((64, True, False), (128, False, True), (-1, True, True)):
    spec = WeightSpec.of(get_scheme("w4a16"), gs, sym)
    a = gptq_quantize(w, H, spec, act_order=act, use_triton=False)
    b = gptq_quantize(w, H, spec, act_order=act, use_triton=True)
    same = (a.qtensor.codes == b.qtensor.codes).float().mean().item()
    assert same > 0.995, (gs, sym, act, same)
    assert torch.equal(a.qtensor.scales, b.qtensor.scales)
    assert abs(a.loss - b.loss) <= 1e-3 * max(1.0, a.loss), (a.loss, b.loss)
    print(gs, sym, act, same, a.loss, b.loss)
print("OK")
"""


def test_triton_block_kernel_matches_torch_loop():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)")
def test_gpu_hessian_from_half_inputs_matches_fp64():
    """On CUDA the Hessian of bf16 inputs is summed through half-precision tensor cores with fp32 output:
    within fp32 summation error of the fp64 sum of the same bf16 values."""
    from calibrate.algorithms.gptq import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(4, 512, 256, generator=g) * torch.linspace(0.1, 8, 256)).bfloat16() for _ in range(3)]
    acc = HessianAccumulator(256, "cuda")
    for x in xs:
        acc.add(x.cuda())
    ref = sum(x.double().reshape(-1, 256).t() @ x.double().reshape(-1, 256) for x in xs) * (2.0 / (3 * 4 * 512))
    assert acc.n == 3 * 4 * 512
    assert float((acc.H.double().cpu() - ref).abs().max() / ref.abs().max()) < 1e-5
