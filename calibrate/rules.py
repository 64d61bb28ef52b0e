"""Mixed precision: which scheme each decoder linear gets (`qtool quantize --rules FILE`).

A rules file (YAML or JSON) is an ordered list of rules, either at the top level or under `rules:`:

    rules:
      - match: 'layers\\.0\\.'          # Python regex, re.search on the full module name
        skip: true                      # keep these in full precision
      - match: 'mlp\\.down_proj$'
        scheme: w8a16                   # a scheme name from qtensor/schemes.py
        group_size: 64                  # optional overrides: group_size, bits, sym
      - match: 'self_attn\\.o_proj$'
        scheme: w4a16
        sym: false

The first rule that matches a module decides; modules no rule matches get the command's --scheme
(with its --group-size / --bits / --asym). A rule scheme takes its settings from schemes.py, or from
the command's flags when it is the command's own scheme; the rule's own keys override both.

Whatever the rules say, the default skips stay in full precision (DEFAULT_SKIPS): lm_head,
embeddings, MoE routers, vision towers and multimodal projectors. Only the decoder layers of the
language model are ever quantized.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from exporters.base import ROUTER_RE, VISION_RE
from qtensor.errors import QtoolError
from qtensor.schemes import SCHEMES, Scheme, WeightSpec

RULE_KEYS = ("match", "scheme", "skip", "group_size", "bits", "sym")
MAX_RULES_BYTES = 1 << 20

# (what, pattern on the full module name): never quantized
DEFAULT_SKIPS = (
    ("lm_head", re.compile(r"(^|\.)lm_head$")),
    ("embeddings", re.compile(r"(^|\.)(embed_tokens|embed_positions|embeddings?|wte|wpe|word_embeddings)$")),
    ("MoE router", ROUTER_RE),
    ("vision tower / multimodal projector", VISION_RE),
)


def default_skip(name: str) -> str | None:
    """Why `name` is always kept in full precision, or None."""
    for what, pat in DEFAULT_SKIPS:
        if pat.search(name):
            return what
    return None


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based position in the file
    match: str
    pattern: re.Pattern
    scheme: str | None  # None: skip (full precision)
    group_size: int | None = None
    bits: int | None = None
    sym: bool | None = None

    @property
    def label(self) -> str:
        return f"rule {self.index} (match {self.match!r})"


def _load_text(path: Path):
    p = Path(path)
    if not p.is_file():
        raise QtoolError(f"rules file not found: {path}")
    if p.stat().st_size > MAX_RULES_BYTES:
        raise QtoolError(f"rules file {path} is larger than {MAX_RULES_BYTES} bytes")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise QtoolError(f"rules file {path} is not UTF-8 text") from None
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as e:
            raise QtoolError(f"rules file {path}: invalid JSON ({str(e).splitlines()[0]})") from None
    import yaml  # JSON is YAML too

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise QtoolError(f"rules file {path}: invalid YAML ({msg[:200]})") from None


def parse_rules(data, where: str = "rules") -> list[Rule]:
    """Validated rules from the loaded file content (a list, or {"rules": list})."""
    if isinstance(data, dict):
        extra = [k for k in data if k != "rules"]
        if extra:
            raise QtoolError(f"{where}: unknown top-level key {extra[0]!r} (expected 'rules')"[:300])
        data = data.get("rules")
    if not isinstance(data, list):
        raise QtoolError(f"{where}: expected a list of rules (or 'rules:' holding one)")
    rules = []
    for i, r in enumerate(data, 1):
        at = f"{where}: rule {i}"
        if not isinstance(r, dict):
            raise QtoolError(f"{at}: not a mapping of {', '.join(RULE_KEYS)}")
        bad = [k for k in r if k not in RULE_KEYS]
        if bad:
            raise QtoolError(f"{at}: unknown key {str(bad[0])!r} (allowed: {', '.join(RULE_KEYS)})"[:300])
        m = r.get("match")
        if not isinstance(m, str) or not m:
            raise QtoolError(f"{at}: 'match' must be a non-empty regex string")
        try:
            pat = re.compile(m)
        except re.error as e:
            raise QtoolError(f"{at}: 'match' {m!r} is not a valid regex ({e})"[:300]) from None
        at = f"{where}: rule {i} (match {m!r})"
        skip = r.get("skip", False)
        if not isinstance(skip, bool):
            raise QtoolError(f"{at}: 'skip' must be true or false")
        scheme = r.get("scheme")
        if skip:
            others = [k for k in r if k not in ("match", "skip")]
            if others:
                raise QtoolError(f"{at}: 'skip: true' takes no {others[0]!r}")
            rules.append(Rule(i, m, pat, None))
            continue
        if scheme is None:
            raise QtoolError(f"{at}: needs 'scheme: NAME' or 'skip: true'")
        if not isinstance(scheme, str) or scheme not in SCHEMES:
            raise QtoolError(f"{at}: unknown scheme {scheme!r} (choose from: {', '.join(SCHEMES)})"[:400])
        gs, bits, sym = r.get("group_size"), r.get("bits"), r.get("sym")
        if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or gs == 0 or gs >= 1)):
            raise QtoolError(f"{at}: group_size {gs!r} is invalid (-1 per channel, 0 per tensor, or a positive group length)"[:300])
        if bits is not None:
            s = SCHEMES[scheme]
            if isinstance(bits, bool) or bits not in (2, 3, 4, 8) or s.weight_dtype != "int" or s.act_kind != "none":
                raise QtoolError(f"{at}: bits {bits!r} is not valid for scheme {scheme} (weight-only int schemes take 2, 3, 4 or 8)"[:300])
        if sym is not None and not isinstance(sym, bool):
            raise QtoolError(f"{at}: sym must be true or false")
        rules.append(Rule(i, m, pat, scheme, gs, bits, sym))
    return rules


def load_rules(path) -> list[Rule]:
    return parse_rules(_load_text(Path(path)), f"rules file {path}")


@dataclass(frozen=True)
class Choice:
    scheme: Scheme
    spec: WeightSpec
    rule: Rule | None  # None: the command's --scheme


class Resolver:
    """Module name -> (Scheme, WeightSpec), or None for a module kept in full precision.

    Callable as the pipeline's `resolve`; `schemes` lists every scheme it can hand out."""

    def __init__(self, scheme: Scheme, spec: WeightSpec, rules: list[Rule] = ()):
        self.scheme, self.spec, self.rules = scheme, spec, list(rules)
        self.default = Choice(scheme, spec, None)
        self._per_rule: dict[int, Choice] = {}
        for r in self.rules:
            if r.scheme is None:
                continue
            if r.scheme == scheme.name:
                sch = scheme  # the command's scheme, with its --bits
                gs, sym = spec.group_size, spec.sym
            else:
                sch, gs, sym = SCHEMES[r.scheme], None, None
            if r.bits is not None:
                sch = replace(sch, weight_bits=r.bits)
            gs = r.group_size if r.group_size is not None else gs
            sym = r.sym if r.sym is not None else sym
            try:
                sp = WeightSpec.of(sch, gs, sym)
            except QtoolError as e:
                raise QtoolError(f"{r.label}: {e}") from None
            self._per_rule[r.index] = Choice(sch, sp, r)
        self.schemes = [scheme, *(c.scheme for c in self._per_rule.values())]

    def why_skipped(self, name: str) -> str | None:
        d = default_skip(name)
        if d is not None:
            return f"default skip: {d}"
        r = self.rule_for(name)
        return r.label if r is not None and r.scheme is None else None

    def rule_for(self, name: str) -> Rule | None:
        for r in self.rules:
            if r.pattern.search(name):
                return r
        return None

    def choice(self, name: str) -> Choice | None:
        if default_skip(name) is not None:
            return None
        r = self.rule_for(name)
        if r is None:
            return self.default
        return None if r.scheme is None else self._per_rule[r.index]

    def __call__(self, name: str) -> tuple[Scheme, WeightSpec] | None:
        c = self.choice(name)
        return None if c is None else (c.scheme, c.spec)

    def plan(self, linears: dict[str, int], method=None, fmt=None) -> list[str]:
        """Check every decoder linear (name -> in_features) against the rules, the method and the
        format before any work; returns the notes to report (skips, per-rule counts, unused rules)."""
        hits = {r.index: 0 for r in self.rules}
        skipped: dict[str, list[str]] = {}
        for name, k in linears.items():
            d = default_skip(name)
            r = None if d is not None else self.rule_for(name)
            if r is not None:
                hits[r.index] += 1
            if d is not None or (r is not None and r.scheme is None):
                skipped.setdefault(f"default skip: {d}" if d else r.label, []).append(name)
                continue
            c = self.default if r is None else self._per_rule[r.index]
            who = f"{r.label}: {name}" if r else name
            if method is not None and not method.accepts(c.scheme):
                raise QtoolError(f"{who}: method {method.name} cannot produce scheme {c.scheme.name} ({c.scheme.weight_dtype} weights)")
            if fmt is not None and c.scheme.name not in getattr(fmt, "schemes", ()):
                raise QtoolError(f"{who}: format {fmt.name} cannot hold scheme {c.scheme.name} (it holds: {', '.join(getattr(fmt, 'schemes', ()))})")
            gs = c.spec.group_size
            if gs > 0 and k % gs:
                raise QtoolError(f"{who}: in_features {k} is not a multiple of group size {gs}"
                                 + (" (choose another --group-size)" if r is None else " (change the rule's group_size)"))
        notes = []
        for why, names in skipped.items():
            notes.append(f"full precision ({why}): {len(names)} linear(s): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
        for r in self.rules:
            if hits[r.index] == 0:
                notes.append(f"warning: {r.label} matches no decoder linear")
            elif r.scheme is not None:
                c = self._per_rule[r.index]
                notes.append(f"{r.label}: {hits[r.index]} linear(s) -> {c.scheme.name} ({c.spec.bits}-bit g{c.spec.group_size} {'sym' if c.spec.sym else 'asym'})")
        return notes

    def describe(self) -> list[dict]:
        """The rules as recorded in qtool.json."""
        out = []
        for r in self.rules:
            d = {"match": r.match}
            if r.scheme is None:
                d["skip"] = True
            else:
                c = self._per_rule[r.index]
                d.update(scheme=r.scheme, bits=c.spec.bits, group_size=c.spec.group_size, sym=c.spec.sym)
            out.append(d)
        return out
