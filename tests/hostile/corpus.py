"""A generated corpus of malformed checkpoints, configs and data files (issue 9, hostile input).

Every case starts from a small valid checkpoint (a tiny Llama, and that model quantized by qtool to
the gptq and qtool formats), copies it into the case's workspace and breaks one thing. `Case.build`
returns the `qtool` argument list that meets the damage (inspect / export / eval / quantize with
--calib / eval with --data). The test (tests/test_hostile.py) runs each through the CLI in-process
and requires one `error:` line, exit code 2, no traceback and nothing written outside --out.

Layout of a case workspace: `ws/m` the (mutated) model, `ws/out` the output (must not appear),
data and decoy files beside them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

QUANT_ARGS = ("--scheme", "w4a16", "--method", "rtn", "--samples", "1", "--seqlen", "32")
Q = "model.layers.0.self_attn.q_proj"  # the module most mutations hit
EVIL_MARK = "EVIL_CODE_RAN"  # a hostile module or pickle would create this file in the workspace


@dataclass
class Case:
    id: str
    category: str
    build: Callable[[Path, dict], list[str]]  # (workspace, bases) -> qtool argv
    needle: str = ""  # a piece of the expected error line
    owner: str = ""  # a format another helper owns (xfail "owner fixing" when listed in OWNER_FAILING)


# --- safetensors byte-level helpers ---------------------------------------------------------------

def st_read(p: Path) -> tuple[dict, bytes]:
    b = p.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def st_write(p: Path, header: dict | bytes, data: bytes, n: int | None = None) -> None:
    hb = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    p.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)


def model_file(m: Path) -> Path:
    return m / "model.safetensors"


def mutate_header(fn: Callable[[dict], None]):
    def go(m: Path):
        h, data = st_read(model_file(m))
        fn(h)
        st_write(model_file(m), h, data)

    return go


def mutate_tensors(fn: Callable[[dict], None]):
    def go(m: Path):
        t = load_file(str(model_file(m)))
        fn(t)
        save_file(t, str(model_file(m)), metadata={"format": "pt"})

    return go


def mutate_config(fn: Callable[[dict], object]):
    def go(m: Path):
        c = json.loads((m / "config.json").read_text())
        fn(c)
        (m / "config.json").write_text(json.dumps(c))

    return go


def mutate_qc(fn: Callable[[dict], None]):
    return mutate_config(lambda c: fn(c["quantization_config"]))


def raw_config(content: bytes):
    def go(m: Path):
        (m / "config.json").write_bytes(content)

    return go


def _two_same_size(h: dict) -> tuple[str, str]:
    by = {}
    for k, v in h.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        by.setdefault(b - a, []).append(k)
    return next(sorted(v)[:2] for v in by.values() if len(v) >= 2)


def _first(h: dict, suffix: str) -> str:
    return sorted(k for k in h if k.endswith(suffix))[0]


def _set(h: dict, name: str, **kw):
    h[name].update(kw)


def _shard(m: Path, weight_map_fn: Callable[[dict, Path], dict]) -> None:
    """Turn model.safetensors into an indexed shard, then let `weight_map_fn` rewrite the map."""
    h, _ = st_read(model_file(m))
    os.replace(model_file(m), m / "model-00001-of-00001.safetensors")
    wm = {k: "model-00001-of-00001.safetensors" for k in h if k != "__metadata__"}
    idx = {"metadata": {}, "weight_map": weight_map_fn(wm, m)}
    (m / "model.safetensors.index.json").write_text(json.dumps(idx))


def _all_to(path: str):
    return lambda wm, m: {k: path for k in wm}


def _outside_shard(m: Path) -> Path:
    """A perfectly valid safetensors file outside the model directory (a decoy to read)."""
    p = m.parent / "outside.safetensors"
    shutil.copyfile(m / "model-00001-of-00001.safetensors" if (m / "model-00001-of-00001.safetensors").exists() else model_file(m), p)
    return p


# --- mutation tables --------------------------------------------------------------------------------

def container_mutations() -> list[tuple[str, Callable[[Path], None], str]]:
    """(id, mutate(model_dir), needle): damage to the safetensors container itself."""

    def truncate(n):
        def go(m):
            b = model_file(m).read_bytes()
            model_file(m).write_bytes(b[: n if n >= 0 else len(b) + n])
        return go

    def cut_half(m):
        b = model_file(m).read_bytes()
        model_file(m).write_bytes(b[: len(b) // 2])

    def set_len(n):
        def go(m):
            b = bytearray(model_file(m).read_bytes())
            b[:8] = struct.pack("<Q", n)
            model_file(m).write_bytes(bytes(b))
        return go

    def len_short(m):
        b = bytearray(model_file(m).read_bytes())
        (n,) = struct.unpack("<Q", b[:8])
        b[:8] = struct.pack("<Q", n // 2)
        model_file(m).write_bytes(bytes(b))

    def header_bytes(raw: bytes):
        def go(m):
            _, data = st_read(model_file(m))
            st_write(model_file(m), raw, data)
        return go

    def sparse_huge_header(m):
        with model_file(m).open("wb") as f:
            f.write(struct.pack("<Q", 200 * 1024 * 1024))
        os.truncate(model_file(m), 300 * 1024 * 1024)  # sparse: costs no disk

    def overlap(h):
        a, b = _two_same_size(h)
        h[b]["data_offsets"] = list(h[a]["data_offsets"])

    def shape_double(h):
        k = _first(h, "embed_tokens.weight")
        h[k]["shape"] = [h[k]["shape"][0] * 2, h[k]["shape"][1]]

    def shape_huge(h):
        k = _first(h, "embed_tokens.weight")
        h[k]["shape"] = [1 << 40, 1 << 30]

    def offsets_past_end(h):
        k = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        h[k]["data_offsets"] = [h[k]["data_offsets"][0], h[k]["data_offsets"][1] + 4096]

    def offsets_far(h):
        k = _first(h, "embed_tokens.weight")
        h[k]["data_offsets"] = [1 << 50, (1 << 50) + 100]

    def reversed_offsets(h):
        k = _first(h, "embed_tokens.weight")
        a, b = h[k]["data_offsets"]
        h[k]["data_offsets"] = [b, a]

    def emb(**kw):
        def fn(h):
            h[_first(h, "embed_tokens.weight")].update(kw)
        return fn

    def drop_offsets(h):
        del h[_first(h, "embed_tokens.weight")]["data_offsets"]

    def as_directory(m):
        model_file(m).unlink()
        model_file(m).mkdir()

    def as_fifo(m):
        model_file(m).unlink()
        os.mkfifo(model_file(m))

    def dangling(m):
        model_file(m).unlink()
        model_file(m).symlink_to(m.parent / "does-not-exist.safetensors")

    def symlink_out(m):
        p = m.parent / "outside.safetensors"
        os.replace(model_file(m), p)
        model_file(m).symlink_to(p)

    def symlink_loop(m):
        model_file(m).unlink()
        model_file(m).symlink_to(model_file(m))

    def duplicate_in_two_files(m):
        shutil.copyfile(model_file(m), m / "model-copy.safetensors")

    def pickle_renamed(m):
        torch.save({"w": torch.zeros(4)}, model_file(m))

    def gap(h):
        # shift every tensor by 64 bytes: a hole at the start of the data area, end past the file
        for k, v in h.items():
            if k != "__metadata__":
                v["data_offsets"] = [v["data_offsets"][0] + 64, v["data_offsets"][1] + 64]

    return [
        ("empty-file", truncate(0), "truncated"),
        ("five-bytes", truncate(5), "truncated"),
        ("header-only-length", truncate(8), "exceeds the file"),
        ("cut-in-half", cut_half, ""),
        ("last-byte-missing", truncate(-1), ""),
        ("header-length-beyond-file", set_len(1 << 30), "exceeds the file"),
        ("header-length-2^63", set_len(1 << 63), "exceeds the file"),
        ("header-length-short", len_short, "corrupt safetensors header"),
        ("header-length-sparse-200MB", sparse_huge_header, "header length"),
        ("header-garbage", header_bytes(b"\x00\x01garbage{{"), "corrupt safetensors header"),
        ("header-invalid-utf8", header_bytes(b'{"\xff\xfe": 1}'), "corrupt safetensors header"),
        ("header-json-array", header_bytes(b"[1, 2, 3]"), "corrupt safetensors header"),
        ("header-json-string", header_bytes(b'"hello"'), "corrupt safetensors header"),
        ("header-nested-deep", header_bytes(b"[" * 100000 + b"]" * 100000), "corrupt safetensors header"),
        ("tensor-info-not-object", mutate_header(lambda h: h.__setitem__(_first(h, "embed_tokens.weight"), 7)), "embed_tokens.weight"),
        ("offsets-missing", mutate_header(drop_offsets), "embed_tokens.weight"),
        ("offsets-strings", mutate_header(emb(data_offsets=["0", "10"])), "embed_tokens.weight"),
        ("offsets-three", mutate_header(emb(data_offsets=[0, 1, 2])), "embed_tokens.weight"),
        ("offsets-float", mutate_header(emb(data_offsets=[0.5, 10.5])), "embed_tokens.weight"),
        ("offsets-negative", mutate_header(emb(data_offsets=[-16, 16])), "embed_tokens.weight"),
        ("offsets-past-end", mutate_header(offsets_past_end), "outside the file"),
        ("offsets-2^50", mutate_header(offsets_far), "outside the file"),
        ("offsets-reversed", mutate_header(reversed_offsets), "embed_tokens.weight"),
        ("offsets-overlap", mutate_header(overlap), "overlap"),
        ("offsets-hole", mutate_header(gap), ""),
        ("shape-disagrees-with-bytes", mutate_header(shape_double), "embed_tokens.weight"),
        ("shape-huge", mutate_header(shape_huge), "embed_tokens.weight"),
        ("shape-negative", mutate_header(emb(shape=[-1, 128])), "embed_tokens.weight"),
        ("shape-string", mutate_header(emb(shape="512x128")), "embed_tokens.weight"),
        ("shape-floats", mutate_header(emb(shape=[512.0, 128.0])), "embed_tokens.weight"),
        ("dtype-unknown", mutate_header(emb(dtype="F7")), "embed_tokens.weight"),
        ("dtype-wider-than-bytes", mutate_header(emb(dtype="F64")), "embed_tokens.weight"),
        ("dtype-not-string", mutate_header(emb(dtype=16)), "embed_tokens.weight"),
        ("metadata-not-strings", mutate_header(lambda h: h.__setitem__("__metadata__", {"format": 1})), ""),
        ("file-is-directory", as_directory, "model.safetensors"),
        ("file-is-fifo", as_fifo, "model.safetensors"),
        ("dangling-symlink", dangling, "model.safetensors"),
        ("symlink-out-of-dir", symlink_out, "leaves the model directory"),
        ("symlink-loop", symlink_loop, "model.safetensors"),
        ("tensor-in-two-files", duplicate_in_two_files, "more than one file"),
        ("pickle-renamed-safetensors", pickle_renamed, "model.safetensors"),
    ]


def index_mutations() -> list[tuple[str, Callable[[Path], None], str]]:
    def sharded(fn):
        return lambda m: _shard(m, fn)

    def dotdot(wm, m):
        _outside_shard(m)
        return {k: "../outside.safetensors" for k in wm}

    def absolute(wm, m):
        p = _outside_shard(m)
        return {k: str(p.resolve()) for k in wm}

    def symlinked(wm, m):
        p = _outside_shard(m)
        (m / "link.safetensors").symlink_to(p)
        return {k: "link.safetensors" for k in wm}

    def symlinked_dir(wm, m):
        d = m.parent / "elsewhere"
        d.mkdir()
        shutil.copyfile(m / "model-00001-of-00001.safetensors", d / "s.safetensors")
        (m / "sub").symlink_to(d)
        return {k: "sub/s.safetensors" for k in wm}

    def raw_index(content: bytes):
        def go(m):
            _shard(m, lambda wm, m: wm)
            (m / "model.safetensors.index.json").write_bytes(content)
        return go

    def index_dir(m):
        _shard(m, lambda wm, m: wm)
        (m / "model.safetensors.index.json").unlink()
        (m / "model.safetensors.index.json").mkdir()

    def wrong_shard(wm, m):
        from safetensors.torch import save_file as sf

        sf({"x": torch.zeros(2)}, str(m / "other.safetensors"))
        k = sorted(wm)[0]
        return {**wm, k: "other.safetensors"}

    return [
        ("index-dotdot", sharded(dotdot), "leaves the model directory"),
        ("index-absolute", sharded(absolute), "leaves the model directory"),
        ("index-symlink-out", sharded(symlinked), "leaves the model directory"),
        ("index-symlinked-subdir", sharded(symlinked_dir), "leaves the model directory"),
        ("index-dot", sharded(_all_to(".")), "leaves the model directory"),
        ("index-empty-name", sharded(_all_to("")), "invalid shard path"),
        ("index-missing-shard", sharded(_all_to("model-00002-of-00002.safetensors")), "missing"),
        ("index-nul-byte", sharded(_all_to("a\x00b.safetensors")), "index"),
        ("index-name-too-long", sharded(_all_to("x" * 400 + ".safetensors")), "index"),
        ("index-name-not-string", sharded(lambda wm, m: {k: 5 for k in wm}), "index"),
        ("index-names-config", sharded(_all_to("config.json")), "config.json"),
        ("index-tensor-not-in-shard", sharded(wrong_shard), "index"),
        ("index-not-json", raw_index(b"{nope"), "index"),
        ("index-not-utf8", raw_index(b'{"weight_map": {"\xff": "x"}}'), "index"),
        ("index-no-weight-map", raw_index(b'{"metadata": {}}'), "index"),
        ("index-weight-map-list", raw_index(b'{"weight_map": ["model-00001-of-00001.safetensors"]}'), "index"),
        ("index-is-json-array", raw_index(b"[]"), "index"),
        ("index-is-directory", index_dir, "index"),
    ]


def gptq_mutations() -> list[tuple[str, Callable[[Path], None], str]]:
    def t(fn):
        return mutate_tensors(fn)

    def qw(fn):
        return t(lambda d: d.__setitem__(f"{Q}.qweight", fn(d[f"{Q}.qweight"])))

    def sc(fn):
        return t(lambda d: d.__setitem__(f"{Q}.scales", fn(d[f"{Q}.scales"])))

    def qz(fn):
        return t(lambda d: d.__setitem__(f"{Q}.qzeros", fn(d[f"{Q}.qzeros"])))

    def gi(fn):
        return t(lambda d: d.__setitem__(f"{Q}.g_idx", fn(d[f"{Q}.g_idx"])))

    def nan_at(x, v):
        x = x.clone()
        x.view(-1)[3] = v
        return x

    def drop(suffix):
        return t(lambda d: d.pop(f"{Q}.{suffix}"))

    def drop_all_qweight(d):
        for k in [k for k in d if k.endswith(".qweight")]:
            del d[k]

    def narrow_n(d):
        d[f"{Q}.qweight"] = d[f"{Q}.qweight"][:, :100].contiguous()
        d[f"{Q}.scales"] = d[f"{Q}.scales"][:, :100].contiguous()
        d[f"{Q}.qzeros"] = d[f"{Q}.qzeros"][:, :12].contiguous()

    def orphan(d):
        d["model.layers.0.input_layernorm.qweight"] = d[f"{Q}.qweight"].clone()
        for s in ("qzeros", "scales", "g_idx"):
            d[f"model.layers.0.input_layernorm.{s}"] = d[f"{Q}.{s}"].clone()

    qc = mutate_qc
    return [
        ("qweight-float", qw(lambda x: x.float()), f"{Q}.qweight"),
        ("qweight-int16", qw(lambda x: x.to(torch.int16)), f"{Q}.qweight"),
        ("qweight-1d", qw(lambda x: x.reshape(-1)), f"{Q}.qweight"),
        ("qweight-3d", qw(lambda x: x.reshape(2, -1, x.shape[1])), f"{Q}.qweight"),
        ("qweight-row-missing", qw(lambda x: x[:-1].contiguous()), Q),
        ("qweight-n-not-packable", t(narrow_n), Q),
        ("scales-int", sc(lambda x: x.to(torch.int32)), f"{Q}.scales"),
        ("scales-transposed", sc(lambda x: x.t().contiguous()), f"{Q}.scales"),
        ("scales-nan", sc(lambda x: nan_at(x, float("nan"))), f"{Q}.scales"),
        ("scales-inf", sc(lambda x: nan_at(x, float("inf"))), f"{Q}.scales"),
        ("scales-neg-inf", sc(lambda x: nan_at(x, float("-inf"))), f"{Q}.scales"),
        ("scales-fp8", sc(lambda x: x.to(torch.float8_e4m3fn)), f"{Q}.scales"),
        ("scales-missing", drop("scales"), f"{Q}.scales"),
        ("qzeros-missing", drop("qzeros"), f"{Q}.qzeros"),
        ("qzeros-float", qz(lambda x: x.float()), f"{Q}.qzeros"),
        ("qzeros-wrong-shape", qz(lambda x: torch.cat([x, x], 1)), f"{Q}.qzeros"),
        ("qzeros-overflow", qz(lambda x: torch.full_like(x, -1)), f"{Q}.qzeros"),
        ("qzeros-sym-mismatch", qz(lambda x: torch.full_like(x, 0x11111111)), f"{Q}"),
        ("g_idx-wrong-length", gi(lambda x: x[:-3].contiguous()), f"{Q}.g_idx"),
        ("g_idx-float", gi(lambda x: x.float() + 0.5), f"{Q}.g_idx"),
        ("g_idx-out-of-range", gi(lambda x: x + 7), f"{Q}.g_idx"),
        ("g_idx-negative", gi(lambda x: x - 1), f"{Q}.g_idx"),
        ("g_idx-2d", gi(lambda x: x.reshape(2, -1)), f"{Q}.g_idx"),
        ("no-qweight-at-all", t(drop_all_qweight), "no .qweight"),
        ("bits-5", qc(lambda q: q.update(bits=5)), "bits"),
        ("bits-0", qc(lambda q: q.update(bits=0)), "bits"),
        ("bits-string", qc(lambda q: q.update(bits="four")), "bits"),
        ("bits-null", qc(lambda q: q.update(bits=None)), "bits"),
        ("bits-float", qc(lambda q: q.update(bits=4.5)), "bits"),
        ("bits-missing", qc(lambda q: q.pop("bits")), "bits"),
        ("bits-8-on-4bit-data", qc(lambda q: q.update(bits=8)), "has shape"),
        ("group_size-0", qc(lambda q: q.update(group_size=0)), "group_size"),
        ("group_size-96-not-dividing", qc(lambda q: q.update(group_size=96)), "group"),
        ("group_size-negative", qc(lambda q: q.update(group_size=-5)), "group_size"),
        ("group_size-string", qc(lambda q: q.update(group_size="g128")), "group_size"),
        ("group_size-64-contradicts-scales", qc(lambda q: q.update(group_size=64)), "has shape"),
        ("sym-not-bool", qc(lambda q: q.update(sym="yes")), "sym"),
        ("checkpoint_format-unknown", qc(lambda q: q.update(checkpoint_format="marlin_v9")), "checkpoint_format"),
        ("dynamic-bad-regex", qc(lambda q: q.update(dynamic={"+:[": {"bits": 8}})), "dynamic"),
        ("dynamic-list", qc(lambda q: q.update(dynamic=["a"])), "dynamic"),
        ("dynamic-override-not-object", qc(lambda q: q.update(dynamic={".*": "bits=8"})), "dynamic"),
        ("dynamic-bits-5", qc(lambda q: q.update(dynamic={"+:.*q_proj.*": {"bits": 5}})), "bits"),
        ("dynamic-group-size-0", qc(lambda q: q.update(dynamic={"+:.*q_proj.*": {"group_size": 0}})), "group_size"),
        ("orphan-quantized-norm", t(orphan), "input_layernorm"),
    ]


def qtool_mutations() -> list[tuple[str, Callable[[Path], None], str]]:
    def t(key, fn):
        return mutate_tensors(lambda d: d.__setitem__(f"{Q}.qt.{key}", fn(d[f"{Q}.qt.{key}"])))

    def add(key, value):
        return mutate_tensors(lambda d: d.__setitem__(f"{Q}.qt.{key}", value))

    def drop(key):
        return mutate_tensors(lambda d: d.pop(f"{Q}.qt.{key}"))

    def mod(fn):
        return mutate_qc(lambda q: fn(q["modules"][Q]))

    def nan_at(x, v):
        x = x.clone()
        x.view(-1)[0] = v
        return x

    qc = mutate_qc
    return [
        ("codes-missing", drop("codes"), f"{Q}.qt.codes"),
        ("scales-missing", drop("scales"), f"{Q}.qt.scales"),
        ("codes-float", t("codes", lambda x: x.float()), f"{Q}.qt.codes"),
        ("codes-int32", t("codes", lambda x: x.to(torch.int32)), f"{Q}.qt.codes"),
        ("codes-1d", t("codes", lambda x: x.reshape(-1)), f"{Q}.qt.codes"),
        ("codes-3d", t("codes", lambda x: x.reshape(2, -1, x.shape[1])), f"{Q}.qt.codes"),
        ("codes-out-of-range", t("codes", lambda x: torch.full_like(x, 100)), f"{Q}.qt.codes"),
        ("codes-uint8-without-zeros", t("codes", lambda x: x.view(torch.uint8)), f"{Q}.qt.codes"),
        ("scales-int", t("scales", lambda x: x.to(torch.int32)), f"{Q}.qt.scales"),
        ("scales-nan", t("scales", lambda x: nan_at(x, float("nan"))), f"{Q}.qt.scales"),
        ("scales-inf", t("scales", lambda x: nan_at(x, float("inf"))), f"{Q}.qt.scales"),
        ("scales-wrong-shape", t("scales", lambda x: torch.cat([x, x], 1)), f"{Q}.qt.scales"),
        ("scales-fewer-rows", t("scales", lambda x: x[:-1].contiguous()), f"{Q}.qt.scales"),
        ("zeros-wrong-shape", add("zeros", torch.zeros(3, 3, dtype=torch.uint8)), f"{Q}.qt."),
        ("zeros-float", add("zeros", torch.zeros(256, 1)), f"{Q}.qt."),
        ("g_idx-wrong-length", add("g_idx", torch.zeros(100, dtype=torch.int32)), f"{Q}.qt.g_idx"),
        ("g_idx-out-of-range", add("g_idx", torch.full((128,), 9, dtype=torch.int32)), f"{Q}.qt.g_idx"),
        ("g_idx-float", add("g_idx", torch.zeros(128)), f"{Q}.qt.g_idx"),
        ("global_scale-nan", add("global_scale", torch.tensor([float("nan")])), f"{Q}.qt.global_scale"),
        ("global_scale-many", add("global_scale", torch.ones(4)), f"{Q}.qt.global_scale"),
        ("pre_scale-wrong-length", add("pre_scale", torch.ones(7)), f"{Q}.qt.pre_scale"),
        ("pre_scale-inf", add("pre_scale", torch.full((128,), float("inf"))), f"{Q}.qt.pre_scale"),
        ("input_scale-nan", add("input_scale", torch.tensor([float("nan")])), f"{Q}.qt.input_scale"),
        ("modules-missing", qc(lambda q: q.pop("modules")), "modules"),
        ("modules-list", qc(lambda q: q.update(modules=[Q])), "modules"),
        ("modules-empty", qc(lambda q: q.update(modules={})), "no quantized"),
        ("module-entry-string", qc(lambda q: q["modules"].update({Q: "int4"})), Q),
        ("module-without-tensors", qc(lambda q: q["modules"].update({"model.layers.0.mlp.nothing": q["modules"][Q]})), "model.layers.0.mlp.nothing"),
        ("dtype-missing", mod(lambda e: e.pop("dtype")), Q),
        ("dtype-unknown", mod(lambda e: e.update(dtype="float7")), Q),
        ("bits-5-int", mod(lambda e: e.update(bits=5)), Q),
        ("bits-0", mod(lambda e: e.update(bits=0)), Q),
        ("bits-string", mod(lambda e: e.update(bits="4bit")), Q),
        ("bits-2-on-4bit-codes", mod(lambda e: e.update(bits=2)), Q),
        ("fp8-dtype-on-int-codes", mod(lambda e: e.update(dtype="fp8_e4m3", bits=8)), Q),
        ("group_size-0-with-group-scales", mod(lambda e: e.update(group_size=0)), Q),
        ("group_size-96", mod(lambda e: e.update(group_size=96)), Q),
        ("group_size--7", mod(lambda e: e.update(group_size=-7)), Q),
        ("group_size-null", mod(lambda e: e.update(group_size=None)), Q),
        ("block-three-numbers", mod(lambda e: e.update(block=[1, 2, 3])), Q),
        ("block-negative", mod(lambda e: e.update(block=[-128, 128])), Q),
        ("act-kind-unknown", mod(lambda e: e["act"].update(kind="sometimes")), Q),
        ("act-dtype-unknown", mod(lambda e: e["act"].update(kind="dynamic", dtype="int3")), Q),
        ("act-static-without-scale", mod(lambda e: e["act"].update(kind="static", dtype="int8")), Q),
        ("act-not-object", mod(lambda e: e.update(act="dynamic")), Q),
        ("orig_dtype-not-a-dtype", mod(lambda e: e.update(orig_dtype="nn")), Q),
        ("orig_dtype-unknown", mod(lambda e: e.update(orig_dtype="float99")), Q),
        ("orig_dtype-number", mod(lambda e: e.update(orig_dtype=16)), Q),
    ]


BUILD_ONLY = {"model_type-unknown", "trust-remote-code-needed"}  # only building the model meets these


def config_mutations() -> list[tuple[str, Callable[[Path], None], str]]:
    def write_evil_module(m: Path):
        (m / "modeling_evil.py").write_text(
            "from pathlib import Path\n"
            f"Path(__file__).resolve().parent.parent.joinpath('{EVIL_MARK}').write_text('ran')\n"
        )

    def remote_code(m):
        write_evil_module(m)
        mutate_config(lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}))(m)

    def remote_code_known_type(m):
        write_evil_module(m)
        mutate_config(lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"}, num_hidden_layers=10**9))(m)

    def sparse_config(m):
        with (m / "config.json").open("wb") as f:
            f.write(b"{")
        os.truncate(m / "config.json", 1 << 30)

    def fifo_config(m):
        (m / "config.json").unlink()
        os.mkfifo(m / "config.json")

    def cfg(**kw):
        return mutate_config(lambda c: c.update(kw))

    def text_config(m):
        mutate_config(lambda c: c.update(text_config={"num_hidden_layers": 1 << 40, "hidden_size": 128}))(m)

    return [
        ("config-list", raw_config(b"[1, 2]"), "not a JSON object"),
        ("config-null", raw_config(b"null"), "not a JSON object"),
        ("config-string", raw_config(b'"llama"'), "not a JSON object"),
        ("config-not-utf8", raw_config(b'{"model_type": "ll\xe9ama", "x": "\xff\xfe"}'), "config.json"),
        ("config-utf16", raw_config('{"model_type": "llama"}'.encode("utf-16")), "config.json"),
        ("config-invalid-json", raw_config(b'{"model_type": "llama",'), "config.json"),
        ("config-empty", raw_config(b""), "config.json"),
        ("config-nested-deep", raw_config(b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"), "config.json"),
        ("config-nan-literal", mutate_config(lambda c: c.update(rms_norm_eps=float("nan"))), "config.json"),
        ("config-infinity-literal", mutate_config(lambda c: c.update(rope_theta=float("inf"))), "config.json"),
        ("config-sparse-1GB", sparse_config, "config.json"),
        ("config-is-fifo", fifo_config, "config.json"),
        ("config-is-directory", lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir()), "config.json"),
        ("config-missing", lambda m: (m / "config.json").unlink(), "config.json"),
        ("layers-1e9", cfg(num_hidden_layers=10**9), "num_hidden_layers"),
        ("layers-2^62", cfg(num_hidden_layers=1 << 62), "num_hidden_layers"),
        ("layers-negative", cfg(num_hidden_layers=-1), "num_hidden_layers"),
        ("layers-zero", cfg(num_hidden_layers=0), "num_hidden_layers"),
        ("layers-string", cfg(num_hidden_layers="2"), "num_hidden_layers"),
        ("layers-float", cfg(num_hidden_layers=2.5), "num_hidden_layers"),
        ("layers-bool", cfg(num_hidden_layers=True), "num_hidden_layers"),
        ("layers-more-than-tensors", cfg(num_hidden_layers=3), "num_hidden_layers"),
        ("hidden-2^40", cfg(hidden_size=1 << 40), "hidden_size"),
        ("hidden-zero", cfg(hidden_size=0), "hidden_size"),
        ("hidden-disagrees-with-embedding", cfg(hidden_size=64), "hidden_size"),
        ("vocab-2^40", cfg(vocab_size=1 << 40), "vocab_size"),
        ("vocab-beyond-embedding", cfg(vocab_size=4096), "vocab_size"),
        ("intermediate-2^40", cfg(intermediate_size=1 << 40), "intermediate_size"),
        ("intermediate-negative", cfg(intermediate_size=-256), "intermediate_size"),
        ("heads-zero", cfg(num_attention_heads=0), "num_attention_heads"),
        ("heads-huge", cfg(num_attention_heads=1 << 30), "num_attention_heads"),
        ("kv-heads-huge", cfg(num_key_value_heads=1 << 30), "num_key_value_heads"),
        ("head_dim-huge", cfg(head_dim=1 << 40), "head_dim"),
        ("experts-1e6", cfg(num_experts=10**6), "num_experts"),
        ("local-experts-1e6", cfg(num_local_experts=10**6), "num_local_experts"),
        ("max-position-2^40", cfg(max_position_embeddings=1 << 40), "max_position_embeddings"),
        ("text_config-layers-2^40", text_config, "num_hidden_layers"),
        ("model_type-missing", mutate_config(lambda c: c.pop("model_type")), "model_type"),
        ("model_type-unknown", cfg(model_type="definitely_not_a_model"), "definitely_not_a_model"),
        ("model_type-number", cfg(model_type=123), "model_type"),
        ("trust-remote-code-needed", remote_code, "evil"),
        ("auto_map-with-huge-layers", remote_code_known_type, "num_hidden_layers"),
    ]


def quant_config_mutations() -> list[tuple[str, Callable[[Path], None], str]]:
    """Contradicting quantization blocks, applied to both quantized bases."""
    return [
        ("quant_method-unknown", mutate_qc(lambda q: q.update(quant_method="superquant")), "superquant"),
        ("quant_method-missing", mutate_qc(lambda q: q.pop("quant_method")), "quantization"),
        ("quant_method-number", mutate_qc(lambda q: q.update(quant_method=7)), "quantization"),
        ("quantization_config-list", mutate_config(lambda c: c.update(quantization_config=[1])), "quantization"),
        ("quantization_config-string", mutate_config(lambda c: c.update(quantization_config="gptq")), "quantization"),
        ("quant-block-removed", mutate_config(lambda c: c.pop("quantization_config")), "not a quantized checkpoint"),
        ("qtool.json-list", lambda m: (m / "qtool.json").write_text("[]"), "qtool.json"),
        ("qtool.json-invalid", lambda m: (m / "qtool.json").write_bytes(b"{\xff"), "qtool.json"),
    ]


def pickle_cases() -> list[Case]:
    class Evil:
        def __init__(self, mark: Path):
            self.mark = mark

        def __reduce__(self):
            return (os.system, (f"touch '{self.mark}'",))

    def only_bin(name="pytorch_model.bin", evil=False):
        def go(m: Path):
            t = load_file(str(model_file(m)))
            model_file(m).unlink()
            torch.save({**t, "evil": Evil(m.parent / EVIL_MARK)} if evil else t, m / name)
        return go

    def bin_index(m: Path):
        names = list(load_file(str(model_file(m))))
        only_bin("pytorch_model-00001-of-00001.bin")(m)
        wm = {k: "pytorch_model-00001-of-00001.bin" for k in names}
        (m / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))

    def payload(obj):
        def go(m: Path):
            model_file(m).unlink()
            torch.save(obj, m / "pytorch_model.bin")
        return go

    def damaged(how):
        def go(m: Path):
            only_bin()(m)
            b = (m / "pytorch_model.bin").read_bytes()
            (m / "pytorch_model.bin").write_bytes(b[: len(b) // 2] if how == "cut" else bytes((i * 37 + 11) % 256 for i in range(4096)))
        return go

    def bin_index_out(m: Path):
        only_bin()(m)
        os.replace(m / "pytorch_model.bin", m.parent / "outside.bin")
        (m / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.bin"}}))

    cases = []
    variants = [("bin", only_bin()), ("pt", only_bin("model.pt")), ("ckpt", only_bin("model.ckpt")), ("bin-index", bin_index), ("evil-reduce", only_bin(evil=True))]
    for vid, fn in variants:
        for cmd, base in (("quantize", "llama"), ("inspect", "gptq"), ("export", "gptq"), ("eval", "qtool")):
            cases.append(Case(f"pickle/{vid}/{cmd}", "pickle weights", _model_case(base, fn, cmd), "pickle"))
    # --allow-pickle reads with torch.load(weights_only=True): code in the pickle must not run either
    allowed = [("evil-reduce", only_bin(evil=True), "unsupported GLOBAL"), ("list-payload", payload([torch.zeros(2)]), "not a state dict"),
               ("int-values", payload({"a": 1}), "not a state dict"), ("cut-in-half", damaged("cut"), "pytorch_model.bin"),
               ("garbage", damaged("garbage"), "pytorch_model.bin"), ("index-leaves-dir", bin_index_out, "leaves the model directory"),
               ("shape-contradicts-config", payload({"model.embed_tokens.weight": torch.zeros(3, 3)}), "")]
    for vid, fn, needle in allowed:
        def build(ws, bases, fn=fn):
            return [*_model_case("llama", fn, "quantize")(ws, bases), "--allow-pickle"]
        cases.append(Case(f"pickle/allow-pickle-{vid}/quantize", "pickle weights", build, needle))
    return cases


def data_cases() -> list[Case]:
    """Calibration (--calib) and evaluation (--data) files."""

    def f(name: str, content: bytes | Callable[[Path], None]):
        def make(ws: Path) -> Path:
            p = ws / name
            if callable(content):
                content(p)
            else:
                p.write_bytes(content)
            return p
        return make

    def fifo(p):
        os.mkfifo(p)

    def sparse_zeros(p):
        with p.open("wb") as fh:
            fh.write(b"\0")
        os.truncate(p, 1 << 30)

    def parquet_no_text(p):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": ["hello world"] * 3}), p)

    def parquet_nulls(p):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": pa.array([None, None], type=pa.string())}), p)

    def parquet_ints(p):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [1, 2, 3]}), p)

    def ds_empty(p):
        p.mkdir()

    def ds_garbage(p):
        p.mkdir()
        (p / "dataset_info.json").write_bytes(b"\xff\x00garbage")
        (p / "state.json").write_text("{}")
        (p / "data-00000-of-00001.arrow").write_bytes(b"not arrow")

    def ds_no_text(p):
        import datasets

        datasets.Dataset.from_dict({"content": ["a b c"] * 4}).save_to_disk(str(p))

    def dangling(p):
        p.symlink_to(p.parent / "nowhere.txt")

    def long_name(ws):
        return ws / ("d" * 300 + ".txt")

    rng = bytes((i * 131 + 7) % 255 + 1 for i in range(4096))  # no NUL: fails as "not UTF-8"
    files = [
        ("empty-txt", f("calib.txt", b""), "holds no text"),
        ("whitespace-txt", f("calib.txt", b" \n\t\n   \n"), "holds no text"),
        ("binary-txt", f("calib.txt", rng), "not UTF-8"),
        ("nul-bytes-txt", f("calib.txt", b"hello\x00world\x00" * 200), "binary"),
        ("sparse-1GB-zeros-txt", f("calib.txt", sparse_zeros), "binary"),
        ("utf16-txt", f("calib.txt", ("text " * 200).encode("utf-16")), "binary"),
        ("latin1-txt", f("calib.txt", "caf\xe9 na\xefve " .encode("latin-1") * 50), "not UTF-8"),
        ("too-short-txt", f("calib.txt", b"hi"), "tokens"),
        ("fifo-txt", f("calib.txt", fifo), "calib.txt"),
        ("dangling-symlink-txt", f("calib.txt", dangling), "not found"),
        ("empty-jsonl", f("c.jsonl", b""), "holds no text"),
        ("jsonl-invalid-line", f("c.jsonl", b'{"text": "ok"}\n{broken\n'), "c.jsonl"),
        ("jsonl-line-is-list", f("c.jsonl", b'["text"]\n'), "line 1"),
        ("jsonl-missing-field", f("c.jsonl", b'{"content": "x"}\n'), "line 1"),
        ("jsonl-field-number", f("c.jsonl", b'{"text": 5}\n'), "line 1"),
        ("jsonl-field-null", f("c.jsonl", b'{"text": null}\n'), "line 1"),
        ("jsonl-empty-strings", f("c.jsonl", b'{"text": ""}\n{"text": "  "}\n'), "holds no text"),
        ("jsonl-binary", f("c.jsonl", rng), "c.jsonl"),
        ("jsonl-nested-deep", f("c.jsonl", b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}\n"), "c.jsonl"),
        ("parquet-garbage", f("c.parquet", rng), "c.parquet"),
        ("parquet-empty", f("c.parquet", b""), "c.parquet"),
        ("parquet-no-text-column", f("c.parquet", parquet_no_text), "no column 'text'"),
        ("parquet-nulls", f("c.parquet", parquet_nulls), "holds no text"),
        ("parquet-ints", f("c.parquet", parquet_ints), "holds no text"),
        ("datasets-dir-empty", f("ds", ds_empty), "ds"),
        ("datasets-dir-garbage", f("ds", ds_garbage), "ds"),
        ("datasets-no-text-column", f("ds", ds_no_text), "no column 'text'"),
        ("csv-extension", f("c.csv", b"text\nhello\n"), "unsupported data file"),
        ("no-extension", f("calibdata", b"hello"), "unsupported data file"),
        ("missing-file", lambda ws: ws / "nope.txt", "not found"),
        ("unicode-name-empty", f("données-калибровка-数据-🦙.txt", b""), "holds no text"),
        ("unicode-name-binary", f("\u202eevil\u200b.txt", rng), "not UTF-8"),
        ("newline-in-name", f("a\nb.txt", b""), "holds no text"),
        ("name-too-long", long_name, "name"),
    ]
    cases = []
    for did, make, needle in files:
        cases.append(Case(f"data/{did}/quantize-calib", "data files", _data_case("quantize", make), needle))
        cases.append(Case(f"data/{did}/eval-data", "data files", _data_case("eval", make), needle))
    return cases


def name_cases() -> list[Case]:
    """Unicode, control characters and long names in model, shard and output paths."""

    def renamed_model(name: str, then: Callable[[Path], None]):
        def build(ws: Path, bases: dict) -> list[str]:
            m = ws / name
            shutil.copytree(bases["gptq"], m, symlinks=True)
            then(m)
            return ["inspect", m]
        return build

    def no_config(m):
        (m / "config.json").unlink()  # the error names the directory

    def shard_named(name: str):
        def go(m):
            _shard(m, _all_to(name))
            os.replace(m / "model-00001-of-00001.safetensors", m / name)
            b = (m / name).read_bytes()
            (m / name).write_bytes(b[:100])
        return go

    def out_case(outname: str | Callable[[Path], Path], base="gptq", prep=None):
        def build(ws: Path, bases: dict) -> list[str]:
            m = ws / "m"
            shutil.copytree(bases[base], m, symlinks=True)
            out = outname(ws) if callable(outname) else ws / outname
            if prep:
                prep(ws, out)
            return ["export", m, "--format", "qtool", "--out", out]
        return build

    cases = [
        ("unicode-model-dir", renamed_model("модель-模型-🦙", no_config), "no config.json"),
        ("rtl-model-dir", renamed_model("\u202edom\u200f", no_config), "no config.json"),
        ("newline-model-dir", renamed_model("line1\nline2", no_config), "no config.json"),
        ("long-model-dir", renamed_model("m" * 250, no_config), "no config.json"),
        ("escape-codes-model-dir", renamed_model("\x1b[31mred\x1b[0m", no_config), "no config.json"),
        ("unicode-shard", renamed_model("m", shard_named("分片-🦙.safetensors")), "safetensors"),
        ("newline-shard", renamed_model("m", shard_named("a\nb.safetensors")), "safetensors"),
        ("control-char-shard", renamed_model("m", shard_named("a\rb\x07.safetensors")), "safetensors"),
        ("out-name-too-long", out_case("o" * 300), "name"),
        ("out-parent-missing", out_case("no/such/dir/out"), "does not exist"),
        ("out-is-a-file", out_case("out", prep=lambda ws, out: out.write_text("keep")), "exists"),
        ("out-under-a-file", out_case(lambda ws: ws / "afile" / "out", prep=lambda ws, out: (ws / "afile").write_text("x")), "afile"),
    ]
    return [Case(f"names/{i}", "names", b, n) for i, b, n in cases]


# --- assembling --------------------------------------------------------------------------------------

def _command(cmd: str, m: Path, ws: Path, base: str) -> list[str]:
    out = ws / "out"
    if cmd == "inspect":
        return ["inspect", m]
    if cmd == "eval":
        return ["eval", m, "--windows", "1"]
    if cmd == "export":
        return ["export", m, "--format", "gptq" if base == "qtool" else "qtool", "--out", out]
    if cmd == "quantize":
        return ["quantize", m, *QUANT_ARGS, "--format", "gptq", "--out", out]
    raise ValueError(cmd)


def _model_case(base: str, mutate: Callable[[Path], None], cmd: str):
    def build(ws: Path, bases: dict) -> list[str]:
        m = ws / "m"
        shutil.copytree(bases[base], m, symlinks=True)
        mutate(m)
        return _command(cmd, m, ws, base)

    return build


def _data_case(cmd: str, make: Callable[[Path], Path]):
    def build(ws: Path, bases: dict) -> list[str]:
        p = make(ws)
        if cmd == "quantize":
            return ["quantize", bases["llama"], *QUANT_ARGS, "--format", "gptq", "--out", ws / "out", "--calib", p]
        return ["eval", bases["gptq"], "--windows", "1", "--data", p]

    return build


# which command meets which kind of damage, per base (round-robin keeps the file fast)
CONTAINER_CMDS = {"llama": ("quantize", "inspect"), "gptq": ("inspect", "export"), "qtool": ("export", "eval")}


def cases() -> list[Case]:
    out: list[Case] = []
    for i, (cid, fn, needle) in enumerate(container_mutations()):
        for base, cmds in CONTAINER_CMDS.items():
            cmd = cmds[i % len(cmds)]
            out.append(Case(f"safetensors/{cid}/{base}-{cmd}", "safetensors container", _model_case(base, fn, cmd), needle))
    for i, (cid, fn, needle) in enumerate(index_mutations()):
        for base, cmds in CONTAINER_CMDS.items():
            cmd = cmds[i % len(cmds)]
            out.append(Case(f"index/{cid}/{base}-{cmd}", "index and paths", _model_case(base, fn, cmd), needle))
    for i, (cid, fn, needle) in enumerate(gptq_mutations()):
        cmd = "eval" if cid.startswith("orphan") else ("inspect", "export")[i % 2]
        out.append(Case(f"gptq/{cid}/{cmd}", "gptq tensors and config", _model_case("gptq", fn, cmd), needle))
    for i, (cid, fn, needle) in enumerate(qtool_mutations()):
        cmd = ("export", "inspect", "eval")[i % 3]
        out.append(Case(f"qtool/{cid}/{cmd}", "qtool tensors and config", _model_case("qtool", fn, cmd), needle))
    for i, (cid, fn, needle) in enumerate(config_mutations()):
        for base, cmd in (("llama", "quantize"), ("gptq", ("inspect", "eval")[i % 2]), ("qtool", "export")):
            if cid in BUILD_ONLY and cmd in ("inspect", "export"):
                cmd = "eval"
            out.append(Case(f"config/{cid}/{base}-{cmd}", "config.json", _model_case(base, fn, cmd), needle))
    for i, (cid, fn, needle) in enumerate(quant_config_mutations()):
        for base in ("gptq", "qtool"):
            cmd = ("inspect", "export")[i % 2]
            out.append(Case(f"quant-config/{cid}/{base}-{cmd}", "quantization_config", _model_case(base, fn, cmd), needle))
    out += pickle_cases()
    out += data_cases()
    out += name_cases()
    out += owner_cases(owner_format_names())
    ids = [c.id for c in out]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return out


# --- formats other helpers own: generic damage, found from each format's own tensors -------------

OWN = {"gptq", "qtool"}
# cases in formats other helpers own that fail today (their decode lets the damage through): run as
# xfail(strict=True), so the list must shrink as the owners fix them
OWNER_FAILING: set[str] = set()  # cases a format's owner is still fixing (xfail strict); none left
SCHEME_TRIES = ("w4a16", "w8a8-int8", "fp8-dynamic", "fp8-block", "fp8", "w8a16", "nvfp4", "w4a4")


def owner_format_names() -> list[str]:
    from exporters import FORMATS
    from exporters.base import get_format

    get_format("qtool")  # every module registered
    return sorted(n for n in FORMATS if n not in OWN)


def _st_files(m: Path) -> list[Path]:
    return sorted(m.glob("*.safetensors"), key=lambda f: -f.stat().st_size)


def _module_tensors(m: Path) -> tuple[Path, str, str]:
    """(file, main weight tensor, scale tensor) of one quantized module of a checkpoint in any format."""
    f = _st_files(m)[0]
    h, _ = st_read(f)
    names = [k for k in h if k != "__metadata__"]
    scales = [k for k in names if "scale" in k.rsplit(".", 1)[-1] and "input" not in k and ".layers.0." in k]
    mod = sorted(scales)[0].rsplit(".", 1)[0]
    mine = [k for k in names if k.startswith(mod + ".") and k not in scales and not k.endswith(".bias")]
    main = max(mine, key=lambda k: (h[k]["data_offsets"][1] - h[k]["data_offsets"][0], k))
    return f, main, sorted(scales)[0]


def _qc_key(c: dict) -> str:
    return "quantization_config" if "quantization_config" in c else "compression_config"


def _walk_set(obj, keys: tuple[str, ...], value):
    if isinstance(obj, dict):
        for k in list(obj):
            if k in keys and not isinstance(obj[k], (dict, list)):
                obj[k] = value
            else:
                _walk_set(obj[k], keys, value)
    elif isinstance(obj, list):
        for v in obj:
            _walk_set(v, keys, value)


def _walk_numbers_to_strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                obj[k] = str(v)
            else:
                _walk_numbers_to_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            _walk_numbers_to_strings(v)


def owner_mutations() -> list[tuple[str, Callable[[Path], None], str, bool]]:
    """(id, mutate, needle, needs safetensors): damage applied to any format's checkpoint."""

    def tensor(which: int, fn):
        def go(m):
            f, main, scale = _module_tensors(m)
            t = load_file(str(f))
            key = (main, scale)[which]
            r = fn(t[key])
            if r is None:
                del t[key]
            else:
                t[key] = r
            save_file(t, str(f), metadata={"format": "pt"})
        return go

    def poke(v):
        def fn(x):
            y = x.float().clone().reshape(-1)
            y[0] = v
            return y.reshape(x.shape).to(x.dtype) if x.is_floating_point() else y.reshape(x.shape)
        return fn

    def grow(x):
        return torch.cat([x.reshape(-1), x.reshape(-1)]) if x.dim() <= 1 else torch.cat([x, x], 0)

    def qc(fn):
        return mutate_config(lambda c: fn(c[_qc_key(c)]))

    def strip(q):
        keep = {k: q[k] for k in ("quant_method", "format") if k in q}
        q.clear()
        q.update(keep)

    def truncate_any(m):
        f = max((p for p in m.iterdir() if p.suffix in (".safetensors", ".gguf")), key=lambda p: p.stat().st_size)
        b = f.read_bytes()
        f.write_bytes(b[: len(b) // 2])

    def garbage_any(m):
        f = max((p for p in m.iterdir() if p.suffix in (".safetensors", ".gguf")), key=lambda p: p.stat().st_size)
        f.write_bytes(bytes((i * 37 + 11) % 256 for i in range(4096)))

    return [
        ("weight-float32", tensor(0, lambda x: x.float() * 1.5), "", True),
        ("weight-1d", tensor(0, lambda x: x.reshape(-1)), "", True),
        ("weight-row-missing", tensor(0, lambda x: x[:-1].contiguous()), "", True),
        ("scale-nan", tensor(1, poke(float("nan"))), "", True),
        ("scale-inf", tensor(1, poke(float("inf"))), "", True),
        ("scale-missing", tensor(1, lambda x: None), "", True),
        ("scale-int32", tensor(1, lambda x: x.float().to(torch.int32)), "", True),
        ("scale-wrong-shape", tensor(1, grow), "", True),
        ("file-truncated", truncate_any, "", False),
        ("file-garbage", garbage_any, "", False),
    ]


def _set_path(path: str, value):
    """Set config.json quantization_config.<a.b.c>, or '@file:a/b' in a side JSON file."""
    def go(m: Path):
        if path.startswith("@"):
            fname, _, rest = path[1:].partition(":")
            c = json.loads((m / fname).read_text())
            target, write, keys = c, lambda: (m / fname).write_text(json.dumps(c)), rest.split("/")
        else:
            c = json.loads((m / "config.json").read_text())
            target, write, keys = c[_qc_key(c)], lambda: (m / "config.json").write_text(json.dumps(c)), path.split(".")
        for k in keys[:-1]:
            target = target[k]
        if value is _DELETE:
            target.pop(keys[-1])
        else:
            target[keys[-1]] = value
        write()
    return go


_DELETE = object()
_W = "config_groups.group_0.weights."
# per format: (id, quantization_config path, bad value); written from each format's own config block
OWNER_CONFIG_DAMAGE = {
    "auto-round": [("bits-5", "bits", 5), ("group_size-96", "group_size", 96), ("group_size-0", "group_size", 0), ("sym-string", "sym", "yes"),
                   ("packing-format-unknown", "packing_format", "auto_round:warp9"), ("data_type-unknown", "data_type", "int7x")],
    "awq": [("bits-5", "bits", 5), ("group_size-96", "group_size", 96), ("group_size-string", "group_size", "g128"),
            ("zero_point-string", "zero_point", "maybe"), ("version-unknown", "version", "exllama-v9")],
    "compressed-tensors": [("num_bits-5", _W + "num_bits", 5), ("group_size-96", _W + "group_size", 96), ("strategy-unknown", _W + "strategy", "diagonal"),
                           ("type-unknown", _W + "type", "complex"), ("format-unknown", "format", "dense-magic"), ("config_groups-list", "config_groups", []),
                           ("weights-missing", "config_groups.group_0.weights", _DELETE)],
    "fp8": [("block-96", "weight_block_size", [96, 96]), ("block-zero", "weight_block_size", [0, 128]), ("block-string", "weight_block_size", "128"),
            ("activation-static-without-scales", "activation_scheme", "static"), ("fmt-e5m2", "fmt", "e5m2")],
    "gguf": [("gguf_file-dotdot", "gguf_file", "../outside.gguf"), ("gguf_file-absolute", "gguf_file", "/etc/hostname"), ("gguf_file-missing", "gguf_file", "nope.gguf"),
             ("gguf_file-number", "gguf_file", 7)],
    "modelopt": [("quant_algo-unknown", "quant_algo", "FP9"), ("quant_algo-nvfp4-on-fp8-data", "quant_algo", "NVFP4"), ("num_bits-5", _W + "num_bits", 5),
                 ("hf_quant_config-algo-unknown", "@hf_quant_config.json:quantization/quant_algo", "FP9")],
    "msmodelslim": [("q_proj-type-unknown", "@quant_model_description.json:model.layers.0.self_attn.q_proj.weight", "W9A9"),
                    ("q_proj-type-list", "@quant_model_description.json:model.layers.0.self_attn.q_proj.weight", ["W8A8"]),
                    ("q_proj-scale-described-float", "@quant_model_description.json:model.layers.0.self_attn.q_proj.weight_scale", "FLOAT")],
}
NO_SAFETENSORS = {"gguf"}


def _gguf_outside(m: Path):
    """A decoy .gguf beside the model directory for the path-leaving cases."""
    src = next(m.glob("*.gguf"))
    shutil.copyfile(src, m.parent / "outside.gguf")


def owner_cases(available: list[str]) -> list[Case]:
    out = []
    for fmt in available:
        muts = [(cid, fn) for cid, fn, _, needs_st in owner_mutations() if not (needs_st and fmt in NO_SAFETENSORS)]
        for cid, path, value in OWNER_CONFIG_DAMAGE.get(fmt, []):
            fn = _set_path(path, value)
            if fmt == "gguf":
                fn = (lambda f: lambda m: (_gguf_outside(m), f(m)))(fn)
            muts.append((f"config-{cid}", fn))
        if fmt == "msmodelslim":
            muts.append(("description-list", lambda m: (m / "quant_model_description.json").write_text("[]")))
            muts.append(("description-not-utf8", lambda m: (m / "quant_model_description.json").write_bytes(b'{"\xff": 1}')))
        for i, (cid, fn) in enumerate(muts):
            cmd = ("inspect", "export", "eval")[i % 3]
            out.append(Case(f"format-{fmt}/{cid}/{cmd}", f"format {fmt}", _model_case(f"fmt:{fmt}", fn, cmd), "", owner=fmt))
    return out


def build_owner_bases(root: Path, bases: dict[str, Path]) -> dict[str, str]:
    """A valid checkpoint per format other helpers own (quantized to qtool with a scheme the format
    holds, then exported); {format: reason} for those that could not be built."""
    from exporters import FORMATS
    from quantize_cli import api

    made: dict[tuple, Path] = {}
    failed = {}
    for fmt in owner_format_names():
        schemes = [s for s in SCHEME_TRIES if s in getattr(FORMATS[fmt], "schemes", ())]
        last = "no scheme to try"
        for scheme in schemes:
            for gs, sym in ((None, None), (None, False), (32, None)):
                key = (scheme, gs, sym)
                try:
                    if key not in made:
                        q = root / f"q-{scheme}-{gs}-{sym}"
                        api.quantize(str(bases["llama"]), scheme=scheme, method="rtn", format="qtool", out=q, samples=1, seqlen=32, group_size=gs, sym=sym)
                        made[key] = q
                    out = root / f"fmt-{fmt}"
                    api.export(made[key], fmt, out)
                    bases[f"fmt:{fmt}"] = out
                    break
                except Exception as e:  # noqa: BLE001 - try the next scheme
                    last = f"{scheme}/{gs}/{sym}: {str(e)[:120]}"
            if f"fmt:{fmt}" in bases:
                break
        if f"fmt:{fmt}" not in bases:
            failed[fmt] = last
    return failed


def build_bases(root: Path, llama_dir: Path) -> dict[str, Path]:
    """The valid checkpoints every case starts from, built once per session."""
    from quantize_cli import api

    bases = {"llama": Path(llama_dir)}
    for fmt in ("gptq", "qtool"):
        out = root / fmt
        api.quantize(str(llama_dir), scheme="w4a16", method="rtn", format=fmt, out=out, samples=1, seqlen=32)
        bases[fmt] = out
    bases["failed"] = build_owner_bases(root, bases)
    return bases
