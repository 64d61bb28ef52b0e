"""Model-parallel placement: the pure planner with fake budgets, and the pipeline with a layer split
over two devices ("cpu", "cpu") giving the checkpoint of the one-device run."""

from pathlib import Path

import pytest
import torch

from calibrate.placement import GiB, Unit, batch_bytes, choose_ranks, hidden_bytes, layer_units, plan_layer, unit_names
from qtensor.errors import QtoolError


def U(name, params, work=0):
    return Unit(name, params, work)


def test_plan_fits_one_device():
    assert plan_layer([U("a", 3), U("b", 3), U("c", 3)], [10, 10]) == [0, 0, 0]


def test_plan_fills_device_0_then_spills_in_order():
    assert plan_layer([U("a", 4), U("b", 4), U("c", 4), U("d", 4)], [10, 10]) == [0, 0, 1, 1]
    assert plan_layer([U("a", 4), U("b", 4), U("c", 4), U("d", 4), U("e", 9)], [8, 8, 9]) == [0, 0, 1, 1, 2]


def test_plan_work_is_the_largest_not_the_sum():
    # linears are quantized one at a time: 3 x 1 byte of parameters + the largest work (5) = 8
    assert plan_layer([U("a", 1, 5), U("b", 1, 5), U("c", 1, 5)], [8, 8]) == [0, 0, 0]
    assert plan_layer([U("a", 1, 5), U("b", 1, 5), U("c", 1, 6)], [8, 8]) == [0, 0, 1]


def test_plan_reserves_hidden_states_on_device_0():
    assert plan_layer([U("a", 3), U("b", 3)], [10, 10], [6]) == [0, 1]
    assert plan_layer([U("a", 3), U("b", 3)], [10, 10], [0]) == [0, 0]
    # a device whose reserve leaves no room for the unit is skipped
    assert plan_layer([U("a", 3)], [10, 10], [9]) == [1]


def test_plan_refuses_what_does_not_fit():
    with pytest.raises(QtoolError, match="mlp.down_proj alone needs"):
        plan_layer([U("q", 2), U("mlp.down_proj", 11)], [10, 10])
    with pytest.raises(QtoolError, match="more than its 2 device"):
        plan_layer([U("a", 6), U("b", 6), U("c", 6)], [10, 10])
    with pytest.raises(QtoolError):
        plan_layer([U("a", 1)], [])


def test_choose_ranks():
    # the layer fits one GPU: one process per GPU
    assert choose_ranks(4, [U("a", 60)], 100, hidden_total=160) == (4, 1)
    # a layer of 120 over GPUs of 100: 2 GPUs per process
    assert choose_ranks(4, [U("a", 60), U("b", 60)], 100, hidden_total=0) == (2, 2)
    assert choose_ranks(3, [U("a", 60), U("b", 60)], 100, hidden_total=0) == (1, 2)
    # hidden states decide: 4 processes hold 25 each (fits beside 70), 2 processes 50 (does not)
    assert choose_ranks(4, [U("a", 70)], 100, hidden_total=100) == (4, 1)
    assert choose_ranks(2, [U("a", 70)], 100, hidden_total=100, fixed=0) == (1, 2)
    with pytest.raises(QtoolError, match="does not fit 2 GPU"):
        choose_ranks(2, [U("a", 150)], 100, hidden_total=0)


def test_hidden_states_must_fit_device_0():
    # 4 processes hold a quarter of the hidden states each (40 + 60 fits); 2 hold half (80 + 60 does
    # not), and 1 process would keep all 160 on its first GPU: more than the GPU
    assert choose_ranks(4, [U("a", 60)], 100, hidden_total=160) == (4, 1)
    with pytest.raises(QtoolError, match="hidden states"):
        choose_ranks(2, [U("a", 60)], 100, hidden_total=160)
    with pytest.raises(QtoolError, match="hidden states"):
        plan_layer([U("a", 1)], [10, 10], [11])


def test_units_and_sizes_of_a_llama_layer(tiny_models):
    from calibrate.models import build_skeleton, load_config
    from calibrate.pipeline import find_decoder_layers

    model = build_skeleton(load_config(tiny_models("llama")))  # parameters on the meta device
    _, layers = find_decoder_layers(model)
    names = unit_names(layers[0])
    assert sorted(names) == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                    "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"])
    units = {u.name: u for u in layer_units(layers[0], 2, hessian=True, hessian_bytes=4)}
    assert units["mlp.down_proj"].params == 128 * 256 * 2 and units["input_layernorm"].params == 128 * 2
    assert units["mlp.down_proj"].work == 4 * 256 * 256 * 4 + 128 * 256 * 10
    assert units["input_layernorm"].work == 0
    assert layer_units(layers[0], 2, hessian=False)[0].work == 128 * 128 * 8
    assert hidden_bytes(100, 128, 2) == 2 * 100 * 128 * 2 and batch_bytes(1, 4, 8, 16, 2) == 4 * (48 + 32 + 16) * 4


def _layer_need(src: Path, samples: int, seqlen: int, hessian: bool = True) -> int:
    """Bytes layer 0 needs on one CPU device in the pipeline (fp32, fp64 Hessians)."""
    from calibrate.models import build_skeleton, load_config
    from calibrate.pipeline import find_decoder_layers

    model = build_skeleton(load_config(src))
    _, layers = find_decoder_layers(model)
    cfg = model.config
    units = layer_units(layers[0], 4, hessian, 8)
    width = max(m.out_features for m in layers[0].modules() if isinstance(m, torch.nn.Linear))
    reserve = hidden_bytes(samples * seqlen, cfg.hidden_size, 4) + batch_bytes(samples, seqlen, cfg.hidden_size, width, cfg.num_attention_heads)
    return reserve + sum(u.params for u in units) + max(u.work for u in units)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_split_layer_gives_the_one_device_checkpoint(arch, tiny_models, tmp_path):
    """Each layer split over two devices (both "cpu": the hooks, per-unit loading and per-device
    Hessians all run) gives the codes and scales of the run on one device."""
    from exporters import read_checkpoint
    from quantize_cli import api

    src = tiny_models(arch)
    kw = dict(scheme="w4a16", method="gptq", format="gptq", samples=8, seqlen=64)
    api.quantize(str(src), out=tmp_path / "one", **kw)
    budget = 0.85 * _layer_need(src, 8, 64) / GiB  # the layer does not fit one device
    r = api.quantize(str(src), out=tmp_path / "two", devices=["cpu", "cpu"], max_gpu_memory=budget, **kw)
    split = [n for n in r["notes"] if "split over 2 devices" in n]
    assert len(split) == 2, r["notes"]  # both layers were split
    a, b = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    assert set(a.qtensors) == set(b.qtensors) and len(a.qtensors) > 0
    for n in a.qtensors:
        assert torch.equal(a.qtensors[n].codes, b.qtensors[n].codes), n
        assert torch.equal(a.qtensors[n].scales, b.qtensors[n].scales), n
    # a budget the layer cannot fit even on two devices: one clear error
    with pytest.raises(QtoolError, match="device"):
        api.quantize(str(src), out=tmp_path / "three", devices=["cpu", "cpu"], max_gpu_memory=0.2 * _layer_need(src, 8, 64) / GiB, **kw)
    assert not (tmp_path / "three").exists()


def test_split_refused_for_layer_level_methods(tiny_models, tmp_path):
    from quantize_cli import api

    src = tiny_models("llama")
    budget = 0.85 * _layer_need(src, 8, 64, hessian=False) / GiB
    with pytest.raises(QtoolError, match="split over devices"):
        api.quantize(str(src), scheme="w4a16", method="awq", format="gptq", samples=8, seqlen=64, out=tmp_path / "a", devices=["cpu", "cpu"], max_gpu_memory=budget)
