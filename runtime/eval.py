"""Perplexity, KL divergence and top-1 agreement against a reference model, per shared/EVAL.md."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class EvalResult:
    perplexity: float
    reference_perplexity: float | None
    kl_divergence: float | None
    top1_agreement: float | None
    tokens: int
    windows: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ppl_increase_pct(self) -> float | None:
        if self.reference_perplexity is None:
            return None
        return 100.0 * (self.perplexity / self.reference_perplexity - 1.0)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids.unsqueeze(0).to(next(model.parameters()).device), use_cache=False)
    return out.logits[0, :-1].float()


@torch.no_grad()
def evaluate(model, windows: list[torch.Tensor], reference=None, progress=None) -> EvalResult:
    """Each window (BOS + tokens, or tokens alone) scores every token after the first position."""
    t0 = time.time()
    nll = ref_nll = kl = 0.0
    agree = 0
    n = 0
    task = progress.add_task("evaluating", total=len(windows)) if progress else None
    for ids in windows:
        targets = ids[1:]
        lq = _logits(model, ids)
        logp_q = F.log_softmax(lq, -1)
        del lq
        nll += float(-logp_q.gather(1, targets[:, None].to(logp_q.device)).sum())
        if reference is not None:
            logp_r = F.log_softmax(_logits(reference, ids), -1)
            ref_nll += float(-logp_r.gather(1, targets[:, None].to(logp_r.device)).sum())
            kl += float((logp_r.exp() * (logp_r - logp_q)).sum())
            agree += int((logp_r.argmax(-1) == logp_q.argmax(-1)).sum())
            del logp_r
        n += len(targets)
        del logp_q
        if progress:
            progress.update(task, advance=1)
    return EvalResult(
        perplexity=math.exp(nll / n),
        reference_perplexity=math.exp(ref_nll / n) if reference is not None else None,
        kl_divergence=kl / n if reference is not None else None,
        top1_agreement=agree / n if reference is not None else None,
        tokens=n,
        windows=len(windows),
        seconds=time.time() - t0,
    )


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for _ in range(max_new_tokens):
        nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if tokenizer.eos_token_id is not None and int(nxt) == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0], skip_special_tokens=True)
