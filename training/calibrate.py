"""Calibrate the OUTPUT rows of tokens added by `rag train vocab` on natural domain text.

The row stage of `rag train pretrain` trains the added rows on windows cut around their
occurrences, where they are far more frequent than in running text; the rows then keep
predicting them where an old token comes next (`python -m training.token_attribution OLD NEW
--added-mass`), and every such position pays -log(1 - mass). With the body and every old row
frozen, the next-token loss of running text as a function of the added tokens' output rows W
alone is convex (a softmax regression: each position's hidden state h and its old-vocabulary
logits are fixed), so it is solved directly: the hidden states of `tokens` ids of natural text
are computed once, then L-BFGS minimises

    mean over positions of  logaddexp(lse_old(h), lse(W h)) - target logit  +  l2 ||W - W0||^2

(W0: the rows as they came). With `pieces` the output rows of the old pieces the added tokens
were written with are fitted as well (W then holds those rows too; still convex). The model
is untied first when its input and output embeddings
are one matrix (SmolLM2), so the input rows -- what the following text reads -- stay as they
were. `l2` is picked from a grid by the loss on a held-back tenth of the same text; the
evaluation splits are never read.
"""
from __future__ import annotations

import math


def natural_blocks(texts: list[str], tokenizer, block_size: int, n_tokens: int,
                   seed: int = 0) -> list:
    """Running text to fit on: whole documents in a seeded order, each cut into blocks of up to
    `block_size` ids from its start (`lm_eval.text_blocks`: every token predicted once), until
    `n_tokens` ids; the added tokens occur as often as they do in the text."""
    import random

    from .lm_eval import text_blocks

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    blocks, n = [], 0
    for i in order:
        if n >= n_tokens:
            break
        new = text_blocks([texts[i]], tokenizer, block_size)
        blocks += new
        n += sum(len(b) for b in new)
    return blocks


def position_features(model, blocks: list, added: list[int], batch_size: int = 8,
                      progress=None) -> dict:
    """For every position of `blocks` (lists of ids) that has a next token: the final hidden
    state h [N, d], the log-sum-exp of the OLD vocabulary's logits [N], the target's logit
    when the target is an old token [N] (0 where it is added) and the target's index into
    `added` [N] (-1 where it is old). The hidden states do not depend on the added OUTPUT
    rows, so they are computed once. `progress(done, total)` after each batch."""
    from itertools import groupby

    import torch

    head = model.get_output_embeddings()
    keep = torch.ones(head.weight.shape[0], dtype=torch.bool)
    keep[added] = False
    where = torch.full((head.weight.shape[0],), -1, dtype=torch.long)
    where[added] = torch.arange(len(added))
    hs, lse, tgt, idx = [], [], [], []
    model.eval()
    for i in range(0, len(blocks), batch_size):
        chunk = [b for b in blocks[i:i + batch_size] if len(b) > 1]
        for _, run in groupby(chunk, key=len):  # runs of equal length go in one batch,
            ids = torch.tensor(list(run))         # in block order
            with torch.inference_mode():
                h = model.base_model(input_ids=ids).last_hidden_state[:, :-1].float()
                h = h.reshape(-1, h.shape[-1])
                logits = head(h.to(head.weight.dtype)).float()
            y = ids[:, 1:].reshape(-1)
            hs.append(h)
            lse.append(torch.logsumexp(logits[:, keep], -1))
            tgt.append(torch.where(where[y] < 0, logits.gather(1, y[:, None])[:, 0],
                                   torch.zeros(())))
            idx.append(where[y])
        if progress is not None:
            progress(min(i + batch_size, len(blocks)), len(blocks))
    return {"h": torch.cat(hs), "lse_old": torch.cat(lse), "target_logit": torch.cat(tgt),
            "target_added": torch.cat(idx)}


def nll(W, f: dict, rows=None):
    """Mean next-token loss (nats) of the positions `rows` (all when None) with added output
    rows W [k, d] (`position_features`' f)."""
    import torch

    sel = (lambda t: t) if rows is None else (lambda t: t[rows])
    h, lse_old, tl, ta = sel(f["h"]), sel(f["lse_old"]), sel(f["target_logit"]), \
        sel(f["target_added"])
    z = h @ W.T
    total = torch.logaddexp(lse_old, torch.logsumexp(z, -1))
    target = torch.where(ta >= 0, z.gather(1, ta.clamp(min=0)[:, None])[:, 0], tl)
    return (total - target).mean()


def fit_rows(W0, f: dict, l2: float, rows=None, max_iter: int = 100):
    """argmin over W of nll(W, f, rows) + l2 * ||W - W0||^2 (convex), by L-BFGS from W0."""
    import torch

    W = W0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = nll(W, f, rows) + l2 * ((W - W0) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach()


def calibrate(model, tokenizer, blocks: list, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1),
              holdout: float = 0.1, max_iter: int = 100, seed: int = 0, progress=None,
              pieces: bool = False) -> dict:
    """Fit the added tokens' output rows of `model` (in place; untied first if tied) on the
    positions of `blocks`. l2 from `l2_grid` by the loss on a held-back share `holdout` of the
    blocks (fitted on the rest); then refitted on all. Returns the figures for the manifest:
    the loss before/after on the held-back share and on all, the added probability mass where
    an old token comes next before/after, the chosen l2, positions and added-token targets.
    `pieces`: also fit the output rows of the old tokens the added ones were written with
    before (`pretrain.old_pieces`): with an added token the old first piece no longer covers
    that word, and the continuation piece cannot follow it any more (the new tokenisation
    never writes it so), which rows fitted on running text can learn; other rows unchanged."""
    import random

    import torch

    from .pretrain import added_token_ids, old_pieces, untie_embeddings

    added = added_token_ids(tokenizer)
    if not added:
        raise ValueError("the model has no added tokens (rag train vocab adds them): nothing "
                         "to calibrate")
    piece_ids = sorted({p for ps in old_pieces(tokenizer, added).values() for p in ps}
                       - set(added)) if pieces else []
    fitted = added + piece_ids  # the added tokens first: W[:n_added] are theirs
    n_added = len(added)
    untied = untie_embeddings(model)
    f = position_features(model, blocks, fitted, progress=progress)
    n_blocks = len(blocks)
    order = list(range(n_blocks))
    random.Random(seed).shuffle(order)
    back = sorted(order[:max(1, round(holdout * n_blocks))]) if n_blocks > 1 else []
    # each position's block (position_features keeps block order; 1-id blocks have none)
    owner = torch.repeat_interleave(torch.arange(n_blocks),
                                    torch.tensor([max(len(b) - 1, 0) for b in blocks]))
    back_rows = torch.isin(owner, torch.tensor(back, dtype=torch.long))
    fit_rows_mask = ~back_rows
    head = model.get_output_embeddings().weight
    W0 = head.data[fitted].float().clone()

    def mass(W, rows):
        z = f["h"][rows] @ W.T
        p = torch.softmax(torch.cat([f["lse_old"][rows, None], z], -1), -1)
        p = p[:, 1:n_added + 1].sum(-1)
        old = (f["target_added"][rows] < 0) | (f["target_added"][rows] >= n_added)
        return float(p[old].mean()) if bool(old.any()) else 0.0

    scores = {}
    if bool(back_rows.any()) and bool(fit_rows_mask.any()):
        for l2 in l2_grid:
            W = fit_rows(W0, f, l2, fit_rows_mask, max_iter)
            with torch.no_grad():
                scores[l2] = float(nll(W, f, back_rows))
        l2 = min(scores, key=scores.get)
    else:
        l2 = l2_grid[len(l2_grid) // 2]
    W = fit_rows(W0, f, l2, None, max_iter)
    with torch.no_grad():
        every = torch.ones_like(back_rows)
        info = {"positions": len(f["h"]),
                "added_targets": int(((f["target_added"] >= 0) &
                                      (f["target_added"] < n_added)).sum()),
                "held_back_positions": int(back_rows.sum()),
                "l2": l2, "l2_scores_held_back": {str(a): v for a, v in scores.items()},
                "held_back_nll_before": float(nll(W0, f, back_rows)) if back else None,
                "held_back_nll_chosen": scores.get(l2),
                "nll_before": float(nll(W0, f)), "nll_after": float(nll(W, f)),
                "added_mass_before": mass(W0, every), "added_mass_after": mass(W, every),
                "untied": untied, "added_tokens": len(added),
                "pieces_fitted": len(piece_ids),
                "row_shift_rms": float(((W - W0) ** 2).mean().sqrt())}
        head.data[fitted] = W.to(head.dtype)
    for k in ("nll_before", "nll_after", "held_back_nll_before", "held_back_nll_chosen"):
        if info[k] is not None and not math.isfinite(info[k]):
            raise ValueError(f"calibration diverged ({k}={info[k]})")
    return info


def summary_line(info: dict) -> str:
    """One printed line of `calibrate`'s figures."""
    def nats(v):
        return "n/a" if v is None else f"{v:.4f}"  # one block: nothing was held back

    pieces = f" + {info['pieces_fitted']} old pieces'" if info["pieces_fitted"] else ""
    return (f"calibration: {info['added_tokens']} added output rows{pieces} fitted on "
            f"{info['positions']} positions (l2 {info['l2']}): held-back next-token loss "
            f"{nats(info['held_back_nll_before'])} -> {nats(info['held_back_nll_chosen'])}; "
            f"added mass where an old token comes next {info['added_mass_before']:.4f} -> "
            f"{info['added_mass_after']:.4f}")
