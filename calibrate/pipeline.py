"""The layer-wise calibration pipeline (kept apart from the algorithms it drives).

1. Run the calibration samples through the embeddings; every decoder layer is temporarily replaced
   by a recorder that keeps the keyword arguments the model passes it (masks, rotary embeddings:
   these differ per layer type, e.g. Gemma 3's sliding and global layers) and, for layer 0, the
   hidden states. No per-architecture table: layers are found from the module tree and config.
2. For each decoder layer in turn: find its linears and the order they run in (linears that read
   the same input tensor form one group: q/k/v, gate/up), then for each group collect what the
   algorithm needs (Hessians, activation ranges) with the earlier groups already quantized
   (true-sequential), quantize the group and put the dequantized weights in place.
3. Run the quantized layer to produce the next layer's inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from exporters.base import VISION_RE
from qtensor import ActQuant, QTensor
from qtensor import numerics as nm
from qtensor.errors import QtoolError
from qtensor.schemes import Scheme, WeightSpec

from .algorithms import Method
from .algorithms.smoothing import PRE_SCALE_ATTR


class _Stop(Exception):
    pass


REUSE = True  # replay module outputs a pass computed when the next pass would recompute them unchanged (calibrate/reuse.py)
REUSE_BUDGET = 8  # ... keeping at most this many times the size of the layer's calibration inputs


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers (length == num_hidden_layers), found generically."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n) and not VISION_RE.search(name):
            if any(isinstance(m, nn.Linear) for m in mod[0].modules()):
                if best is None or len(name) < len(best[0]):
                    best = (name, mod)
    if best is None:
        raise QtoolError("cannot find the decoder layers of this model (no ModuleList of num_hidden_layers blocks with linears)")
    return best


class _Recorder(nn.Module):
    def __init__(self, idx: int, store: "_Capture"):
        super().__init__()
        self.idx, self.store = idx, store

    def forward(self, hidden_states, *args, **kwargs):
        if self.idx == 0:
            self.store.inputs.append(hidden_states.detach())
        if self.idx not in self.store.kwargs:
            self.store.kwargs[self.idx] = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
            self.store.args[self.idx] = args
        if self.idx == self.store.last:
            raise _Stop
        return hidden_states


@dataclass
class _Capture:
    last: int
    inputs: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, device: str) -> _Capture:
    cap = _Capture(last=len(layers) - 1)
    real = list(layers)
    for i in range(len(layers)):
        layers[i] = _Recorder(i, cap)
    try:
        with torch.no_grad():
            for row in samples:
                try:
                    model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for i, m in enumerate(real):
            layers[i] = m
    return cap


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def batched(hidden: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Per-sample hidden states [1, S, H] -> batches [B, S, H] (the recorded kwargs broadcast over B)."""
    return [torch.cat(hidden[i : i + batch]) for i in range(0, len(hidden), batch)]


def linear_groups(layer: nn.Module, x: torch.Tensor, kwargs: dict, args: tuple) -> list[list[str]]:
    """Linears of a layer in execution order, grouped by shared input (q/k/v; gate/up).

    The input tensors are kept alive until the grouping is done, so that a freed tensor's address
    cannot be reused by a later input and fake a shared input.
    """
    order: list[tuple[str, torch.Tensor]] = []
    hooks = []
    names = {m: n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    for mod, name in names.items():
        hooks.append(mod.register_forward_pre_hook(lambda m, inp, name=name: order.append((name, inp[0]))))
    try:
        with torch.no_grad():
            layer(x, *args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen = set()
    last = None
    for name, t in order:
        if name in seen:
            continue
        seen.add(name)
        same = last is not None and (t is last or (t.data_ptr() == last.data_ptr() and t.shape == last.shape and t.stride() == last.stride()))
        if groups and same:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = t
    order.clear()
    unseen = [n for n in names.values() if n not in seen]
    if unseen:  # linears no calibration token reached (e.g. unused MoE experts): weight-only statistics
        groups.append(unseen)
    return groups


@dataclass
class LayerReport:
    name: str
    seconds: float
    notes: list = field(default_factory=list)
    kv: dict = field(default_factory=dict)  # --kv-cache: attention module -> (k_scale, v_scale) float32


@dataclass
class LayerContext:
    """What a layer-level algorithm (AWQ, SmoothQuant) sees of the layer being quantized."""

    name: str  # e.g. "model.layers.3"
    layer: nn.Module
    inputs: list[torch.Tensor]  # batches of hidden states entering the layer
    kwargs: dict
    args: tuple
    groups: list[list[str]]  # linear names in execution order, grouped by shared input
    scheme: Scheme
    spec: WeightSpec
    resolve: object = None  # full module name -> (Scheme, WeightSpec) | None (mixed precision, --rules)
    pre_scale_ok: bool = False  # the output format stores a per-linear pre_quant_scale (QTensor.pre_scale)

    def spec_of(self, name: str) -> WeightSpec | None:
        """The weight spec of one linear of this layer; None: it stays in full precision."""
        if self.resolve is None:
            return self.spec
        c = self.resolve(f"{self.name}.{name}")
        return None if c is None else c[1]

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    @torch.no_grad()
    def run(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The layer's outputs for each input batch."""
        return [_layer_out(self.layer(h, *self.args, **self.kwargs)) for h in (self.inputs if inputs is None else inputs)]

    @torch.no_grad()
    def linear_inputs(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The inputs every named linear receives over all batches, [tokens, in_features] each."""
        got: dict[str, list] = {n: [] for n in names}
        hooks = [self.module(n).register_forward_pre_hook(lambda m, inp, n=n: got[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
                 for n in names]
        try:
            self.run()
        finally:
            for h in hooks:
                h.remove()
        return {n: torch.cat(v) if v else torch.empty(0, self.module(n).in_features) for n, v in got.items()}


def _act_quant(scheme: Scheme, amax: torch.Tensor | None, stats: dict | None = None, act=None) -> ActQuant:
    """act: a calibrate.observers.ActObserver (None or its default: absmax over every token, symmetric)."""
    if scheme.act_kind == "none":
        return ActQuant()
    if scheme.act_kind == "dynamic":
        if scheme.act_dtype == "e2m1":  # NVFP4: per-16 block scales at run time under a calibrated global scale
            gs = None if amax is None else nm.f32_reciprocal_snap((amax.float() / (nm.E2M1_MAX * nm.FP8_MAX)).clamp(min=1e-12)).reshape(1)
            return ActQuant("dynamic", "e2m1", scheme.act_granularity, scale=gs, group_size=16)
        return ActQuant("dynamic", scheme.act_dtype, scheme.act_granularity)
    if act is not None and not act.default:
        from . import observers

        rng = observers.act_range(stats or {}, act)
        if scheme.act_dtype == "int8":
            lo, hi = rng if rng is not None else (torch.tensor(-1.0), torch.tensor(1.0))  # no token reached it
            scale, offset = nm.int_act_qparams(lo, hi, 8, sym=not act.asym)
            return ActQuant("static", "int8", "tensor", scale=scale, offset=offset)
        amax = None if rng is None else rng[1]
    # static per-tensor
    a = torch.tensor(1.0) if amax is None else amax.float().reshape(())
    qmax = nm.FP8_MAX if scheme.act_dtype == "fp8_e4m3" else 127.0
    scale = (a / qmax).clamp(min=1e-12).reshape(1)
    return ActQuant("static", scheme.act_dtype, "tensor", scale=scale)


def quantize_layers(
    model: nn.Module,
    samples: torch.Tensor,
    scheme: Scheme,
    spec: WeightSpec,
    method: Method,
    device: str = "cpu",
    progress=None,
    on_layer=None,
    batch_size: int = 8,
    stream=None,
    start_layer: int = 0,
    resume_hidden: list[torch.Tensor] | None = None,
    placement: list[tuple[str, int]] | None = None,
    resolve=None,
    kv_cache: str | None = None,
    act=None,
    pre_scale_ok: bool = False,
) -> tuple[dict[str, QTensor], list[LayerReport]]:
    """Quantize every linear of every decoder layer.

    stream: a calibrate.stream.StreamedModel; each layer is then loaded before and released after.
    on_layer(li, qtensors_of_layer, other_tensors_of_layer, hidden_after, report): called after
    each layer (the work directory persists it); the returned dict then stays empty.
    start_layer / resume_hidden: continue a run whose first layers are done.
    placement: [(device, budget bytes)] the process owns, the first being `device`; a layer that does
    not fit the first is split over them (calibrate/placement.py).
    resolve(full module name) -> (Scheme, WeightSpec) or None (kept in full precision): per-module
    schemes (calibrate/rules.py); its `schemes` attribute lists every scheme it hands out.
    kv_cache: "fp8_e4m3" also calibrates KV-cache scales (calibrate/kvcache.py) on each quantized
    layer's output pass; they land in LayerReport.kv.
    act: calibrate.observers.ActObserver for static activation ranges (--act-observer, --act-asym).
    pre_scale_ok: the output format holds a per-linear pre_quant_scale; layer-level methods may then
    smooth a group they cannot fold through one (smoothing.apply_pre_scale).
    """
    prefix, layers = find_decoder_layers(model)
    if resolve is None:
        resolve = lambda name: (scheme, spec)  # noqa: E731
    static = any(s.calibrated_acts for s in getattr(resolve, "schemes", [scheme]))
    needs_data = bool(method.stats) or static or method.prepare is not None or bool(kv_cache)
    kv_base = None
    if kv_cache:
        from . import kvcache

        kv_base = kvcache.wrap_attention(model)
    if stream is not None:
        out_emb = model.get_output_embeddings()
        skip = [n for n, m in model.named_modules() if m is out_emb]
        stream.materialize("", exclude=(prefix + ".", *(f"{n}." for n in skip)))
    cap = capture_layer_inputs(model, layers, samples if needs_data else samples[:1], device)
    hidden = batched(cap.inputs, batch_size) if resume_hidden is None else resume_hidden
    cap.inputs = []
    result: dict[str, QTensor] = {}
    reports: list[LayerReport] = []
    task = progress.add_task(f"{method.name} {scheme.name}", total=len(layers), completed=start_layer) if progress else None
    for li in range(start_layer, len(layers)):
        t0 = time.time()
        lname = f"{prefix}.{li}"
        layer = layers[li]
        rep = LayerReport(lname, 0.0)
        hooked = _place(layer, lname, placement, hidden, method, model, stream, rep) if placement else None
        if stream is not None:
            stream.materialize(lname)
            if li + 1 < len(layers) and hasattr(stream, "prefetch"):
                stream.prefetch(f"{prefix}.{li + 1}")
        kwargs, args = cap.kwargs.get(li, {}), cap.args.get(li, ())
        mods = dict(layer.named_modules())
        groups = linear_groups(layer, hidden[0][:1], kwargs, args)
        if method.prepare is not None:
            from . import distributed

            if hooked:
                raise QtoolError(f"method {method.name} does not support a layer split over devices ({lname}); give it more memory per device")
            if distributed.active():
                raise QtoolError(f"method {method.name} does not support multi-process calibration yet (run it in one process)")
            ctx = LayerContext(lname, layer, hidden, kwargs, args, groups, scheme, spec, resolve, pre_scale_ok)
            rep.notes.extend(f"{lname}: {n}" for n in method.prepare(ctx, **method.options))
        layer_q: dict[str, QTensor] = {}
        cache = None
        if REUSE and not hooked and hidden and (method.stats or static):
            from .reuse import PassCache

            cache = PassCache(layer, hidden[0][:1], args, kwargs, groups, REUSE_BUDGET * sum(h.numel() * h.element_size() for h in hidden))
        for t, group in enumerate(groups):
            chosen = {n: resolve(f"{lname}.{n}") for n in group}
            group = [n for n in group if chosen[n] is not None]  # the others stay in full precision
            if not group:
                continue
            stats = {n: {} for n in group}
            observed = {n: act for n in group if act is not None and not act.default and chosen[n][0].act_kind == "static"}
            # AWQ/SmoothQuant alone need no per-group pass; static activations and NVFP4's global input scale need the amax
            if method.stats or any(chosen[n][0].calibrated_acts for n in group):
                _collect(layer, hidden, kwargs, args, {n: mods[n] for n in group}, stats, method.stats, observed, cache, t)
            for name in group:
                if not torch.isfinite(mods[name].weight).all():
                    raise QtoolError(f"non-finite values in the weight of {lname}.{name}")
                k, gs = mods[name].in_features, chosen[name][1].group_size
                if gs > 0 and k % gs:
                    raise QtoolError(f"{lname}.{name}: in_features {k} is not a multiple of group size {gs} (choose another --group-size)")
            joint = None
            shared_h = len(group) > 1 and all(stats[n].get("hessian") is stats[group[0]].get("hessian") for n in group)
            one_spec = len({chosen[n][1] for n in group}) == 1
            if method.group_fn is not None and shared_h and one_spec and stats[group[0]].get("n", 0) > 0:
                try:  # one pass over the concatenated rows (q/k/v, gate/up share the Hessian)
                    joint = dict(zip(group, method.group_fn([mods[n].weight.data for n in group], chosen[group[0]][1], stats[group[0]], **method.options)))
                except FloatingPointError as e:
                    raise QtoolError(f"{lname}.{group[0]}: {e}") from None
            for name in group:
                lin_scheme, lin_spec = chosen[name]
                lin = mods[name]
                st = stats[name]
                full = f"{lname}.{name}"
                if method.stats and st.get("n", 0) == 0:
                    rep.notes.append(f"{full}: no calibration tokens reached it; weight-only statistics")
                try:
                    qt, note = joint[name] if joint is not None else method.quantize(lin.weight.data, lin_spec, st)
                except FloatingPointError as e:
                    raise QtoolError(f"{full}: {e}") from None
                if note:
                    rep.notes.append(f"{full}: {note}")
                w = qt.dequantize().to(lin.weight.device)
                if not torch.isfinite(w).all():
                    raise QtoolError(f"non-finite values after quantizing {full}")
                err = float((w - lin.weight.data.float()).norm() / lin.weight.data.float().norm().clamp(min=1e-12))
                if err > 0.5:
                    rep.notes.append(f"{full}: relative weight error {err:.2f} (quantization error exploded)")
                qt.act = _act_quant(lin_scheme, st.get("amax"), st, act)
                pre = getattr(lin, PRE_SCALE_ATTR, None)  # smoothing kept as the linear's own input scale
                if pre is not None:
                    qt.pre_scale = pre.float().clone()
                qt.orig_dtype = lin.weight.dtype
                lin.weight.data.copy_(w.to(lin.weight.dtype))
                layer_q[full] = _to_cpu(qt)
        # --kv-cache: K/V as the engine computes them; with quantized activations in a pass of their own
        acts = bool(kv_cache) and any(qt.act.kind != "none" for qt in layer_q.values())
        if kv_cache and acts:
            rep.kv = _kv_scales(_kv_pass(layer, lname, layer_q, hidden, args, kwargs))
        if li + 1 < len(layers) or (kv_cache and not acts):
            if cache is not None and not (kv_cache and not acts):  # the K/V recorder must see attention run
                cache.begin(None)
            try:
                with torch.no_grad(), (kvcache.Recorder() if kv_cache and not acts else _nullcontext()) as rec:
                    outs = []
                    for i, h in enumerate(hidden):
                        if cache is not None:
                            cache.batch = i
                        outs.append(_layer_out(layer(h, *args, **kwargs)))
                    hidden = outs
            finally:
                if cache is not None:
                    cache.close()
            if not all(torch.isfinite(h).all() for h in hidden):
                raise QtoolError(f"non-finite activations after layer {li} ({lname})")
            if kv_cache and not acts:
                rep.kv = _kv_scales(rec.named(layer, lname))
        rep.seconds = time.time() - t0
        reports.append(rep)
        if on_layer is not None:
            weights = {f"{lname}.{n}.weight" for n in mods if f"{lname}.{n}" in layer_q}
            others = {f"{lname}.{k}": v.detach().cpu() for k, v in layer.state_dict().items() if f"{lname}.{k}" not in weights}
            on_layer(li, layer_q, others, hidden if li + 1 < len(layers) else None, rep)
        else:
            result.update(layer_q)
        if hooked:
            from .placement import undispatch

            undispatch(hooked)
            if stream is None:
                layer.to(device)
        if stream is not None:
            stream.release(lname)
        if progress:
            progress.update(task, advance=1)
    if kv_base is not None:
        kvcache.unwrap_attention(model, kv_base)
    return result, reports


def _place(layer, lname, placement, hidden, method, model, stream, rep) -> list | None:
    """Split the layer over the devices of `placement` when it does not fit the first one; returns the
    hooked units (None: the layer stays whole on the first device)."""
    from . import placement as pl

    devices, budgets = [d for d, _ in placement], [b for _, b in placement]
    h = hidden[0]
    width = max((m.out_features for m in layer.modules() if isinstance(m, nn.Linear)), default=h.shape[-1])
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dbytes = stream.dtype.itemsize if stream is not None else h.element_size()
    units = pl.layer_units(layer, dbytes, "hessian" in method.stats, 8 if torch.device(devices[0]).type == "cpu" else 4)
    tokens = sum(x.shape[0] * x.shape[1] for x in hidden)
    reserve = pl.hidden_bytes(tokens, h.shape[-1], h.element_size()) + pl.batch_bytes(h.shape[0], h.shape[1], h.shape[-1], width, getattr(cfg, "num_attention_heads", 1) or 1)
    plan = pl.plan_layer(units, budgets, [reserve])
    if max(plan) == 0:
        return None
    for u, d in zip(units, plan):
        if stream is not None:
            stream.materialize(f"{lname}.{u.name}" if u.name else lname, device=devices[d])
    hooked = pl.dispatch(layer, [u.name for u in units], [torch.device(devices[d]) for d in plan])
    used = sorted(set(plan))
    rep.notes.append(f"{lname}: split over {len(used)} devices ({', '.join(f'{devices[d]}: {plan.count(d)} modules' for d in used)})")
    return hooked


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def _kv_pass(layer, lname: str, layer_q: dict, hidden, args, kwargs) -> dict:
    """K/V amax of a quantized layer whose linears also quantize their inputs (runtime.qlinear's
    fake_quant_act, as the engine's kernels do), recorded without changing the hidden states passed on."""
    from runtime.qlinear import fake_quant_act

    from . import kvcache

    hooks = []
    for full, qt in layer_q.items():
        if qt.act.kind == "none":
            continue
        mod = layer.get_submodule(full[len(lname) + 1 :])
        a = qt.act
        mv = lambda t, d=mod.weight.device: None if t is None else t.to(d)  # noqa: E731
        act = type(a)(a.kind, a.dtype, a.granularity, mv(a.scale), mv(a.offset), a.group_size)
        hooks.append(mod.register_forward_pre_hook(lambda m, inp, act=act: (fake_quant_act(inp[0], act), *inp[1:])))
    try:
        with torch.no_grad(), kvcache.Recorder() as rec:
            for h in hidden:
                layer(h, *args, **kwargs)
    finally:
        for hk in hooks:
            hk.remove()
    return rec.named(layer, lname)


def _kv_scales(amax: dict) -> dict:
    """Recorded K/V amax of one layer -> {attention module: (k_scale, v_scale)}, max over ranks."""
    from . import distributed, kvcache

    stats = {f"{n}|{i}": {"amax": a[i]} for n, a in amax.items() for i in (0, 1)}
    distributed.reduce_stats(stats)
    return {n: kvcache.scales_from_amax(stats[f"{n}|0"]["amax"], stats[f"{n}|1"]["amax"]) for n in amax}


def _to_cpu(qt: QTensor) -> QTensor:
    if qt.codes.device.type == "cpu":
        return qt
    mv = lambda t: None if t is None else t.cpu()  # noqa: E731
    act = qt.act
    act = type(act)(act.kind, act.dtype, act.granularity, mv(act.scale), mv(act.offset), act.group_size)
    return qt.replace(codes=qt.codes.cpu(), scales=qt.scales.cpu(), zeros=mv(qt.zeros), g_idx=mv(qt.g_idx), global_scale=mv(qt.global_scale), act=act, pre_scale=mv(qt.pre_scale))


def _collect(layer, hidden, kwargs, args, linears: dict[str, nn.Linear], stats: dict, needs: tuple, observed: dict | None = None,
             cache=None, t: int = 0):
    """Run the layer over the batches with hooks on one group; stop as soon as the group has run.

    The linears of a group read the same input, so one Hessian serves them all.
    observed: {linear name: ActObserver} whose static activation ranges are measured (calibrate/observers.py).
    cache: calibrate.reuse.PassCache (replays what the previous pass computed; records for the next), t the group's index.
    """
    from . import distributed, observers
    from .algorithms.gptq import HessianAccumulator

    hooks = []
    shared = len({(m.in_features, m.weight.device) for m in linears.values()}) == 1
    first = next(iter(linears.values()))
    acc = HessianAccumulator(first.in_features, first.weight.device) if "hessian" in needs and shared else None
    for name, mod in linears.items():
        st = stats[name]
        st["n"] = 0
        if "hessian" in needs:
            st["hessian"] = acc if acc is not None else HessianAccumulator(mod.in_features, mod.weight.device)
        owner = acc is None or mod is first
        obs = (observed or {}).get(name)
        if obs is not None:
            observers.init_stats(st, obs, seed=distributed.rank())

        def hook(m, inp, st=st, owner=owner, obs=obs):
            x2 = inp[0].detach().reshape(-1, inp[0].shape[-1])
            st["n"] += x2.shape[0]
            if "hessian" in st and owner:
                st["hessian"].add(inp[0].detach())
            a = x2.abs().amax().float().cpu() if x2.numel() else torch.tensor(0.0)
            st["amax"] = torch.maximum(st.get("amax", torch.tensor(0.0)), a)
            if "act_absmean" in needs:
                st["act_abssum"] = st.get("act_abssum", 0) + x2.abs().float().sum(0)
            if "act_sqmean" in needs:
                st["act_sqsum"] = st.get("act_sqsum", 0) + x2.float().square().sum(0)
            if obs is not None:
                observers.observe(st, inp[0], obs)

        hooks.append(mod.register_forward_pre_hook(hook))
    last = list(linears.values())[-1]

    def stop(m, inp):
        raise _Stop

    hooks.append(last.register_forward_pre_hook(stop))  # registered after the stats hooks: runs after them
    if cache is not None:
        cache.begin(t)
    try:
        with torch.no_grad():
            for i, h in enumerate(hidden):
                if cache is not None:
                    cache.batch = i
                try:
                    layer(h, *args, **kwargs)
                except _Stop:
                    pass
    finally:
        for hk in hooks:
            hk.remove()
        if cache is not None:
            cache.end()
    distributed.reduce_stats(stats)  # data-parallel runs: every rank sees the statistics of all samples
