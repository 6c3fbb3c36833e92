"""Where a vocabulary-adapted model loses (or gains) against the model without the new tokens:
each model's next-token NLL over the same texts, attributed to character spans of the adapted
tokenisation: the added tokens themselves ("new"), the token right after one ("after"), and the
rest ("other"). A token of the old tokenisation counts where it overlaps such a span.

    python -m training.token_attribution OLD NEW [--docs 40] [--chars 1500]
        [--per-term --keep-out FILE] [--added-mass]
        (OLD, NEW: registered base names or paths; texts: the train side's validation slice,
        never the held-out side)

--per-term splits the "new" and "after" nats by added token: for each term, the nats the old
model spent on the characters of its occurrences and of the token after each, against the new
model's. The terms whose new token costs fewer nats than their old pieces go to --keep-out (one
per line), for `rag train vocab --set keep_terms=FILE`: vocabulary pruned by measured gain.
"""
from __future__ import annotations

import argparse
import json

CATEGORIES = ("new", "after", "other")


def token_nats(model, tokenizer, text: str, max_tokens: int = 400) -> tuple[list, list, list]:
    """(ids, character offsets, NLL in nats) of each token after the first."""
    import torch

    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = enc["input_ids"][:max_tokens]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    nats = [-float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    return ids[1:], enc["offset_mapping"][1:len(ids)], nats


def both_scored(old, new, texts: list[str], max_tokens: int):
    """Per text: (old offsets, old nats, new ids, new offsets, new nats, the last character
    both models scored); texts either model scores nothing of are skipped."""
    for text in texts:
        _, oa, na = token_nats(*old, text, max_tokens)
        ib, ob, nb = token_nats(*new, text, max_tokens)
        if oa and ob:
            yield oa, na, ib, ob, nb, min(oa[-1][1], ob[-1][1])


def attribute(old, new, texts: list[str], added: set[int], max_tokens: int = 400) -> dict:
    """{category: [old model's nats, new model's nats]} over the characters both scored.
    `old`, `new`: (model, tokenizer); `added`: the added token ids of the new tokenizer."""
    tot = {c: [0.0, 0.0] for c in CATEGORIES}
    for oa, na, ib, ob, nb, end in both_scored(old, new, texts, max_tokens):
        spans = [(s, e, "new" if t in added else "after" if j and ib[j - 1] in added
                  else "other") for j, (t, (s, e)) in enumerate(zip(ib, ob))]
        for (s, e, c), n in zip(spans, nb):
            if e <= end:
                tot[c][1] += n
        for (s, e), n in zip(oa, na):
            if e <= end:
                c = next((c for s2, e2, c in spans if s < e2 and e > s2 and c != "other"),
                         "other")
                tot[c][0] += n
    return {c: [round(a, 1), round(b, 1)] for c, (a, b) in tot.items()}


def per_term(old, new, texts: list[str], added: set[int], max_tokens: int = 400) -> dict:
    """{added token id: {"n": occurrences, "old": nats, "new": nats}}: per occurrence, the new
    model's nats on the added token and the token after it (unless that is added too: then it
    is its own occurrence), against the old model's nats on the old tokens overlapping those
    characters (each old token counted once, for the first occurrence it overlaps)."""
    out: dict[int, dict] = {}
    for oa, na, ib, ob, nb, end in both_scored(old, new, texts, max_tokens):
        spans = []  # (term id, start, end)
        for j, t in enumerate(ib):
            if t not in added or ob[j][1] > end:
                continue
            r = out.setdefault(t, {"n": 0, "old": 0.0, "new": 0.0})
            r["n"] += 1
            r["new"] += nb[j]
            s, e = ob[j]
            if j + 1 < len(ib) and ib[j + 1] not in added and ob[j + 1][1] <= end:
                r["new"] += nb[j + 1]
                e = ob[j + 1][1]
            spans.append((t, s, e))
        for (s, e), n in zip(oa, na):
            t = next((t for t, s2, e2 in spans if s < e2 and e > s2), None)
            if t is not None and e <= end:
                out[t]["old"] += n
    return out


def added_mass(model, tokenizer, texts: list[str], added: set[int],
               max_tokens: int = 400) -> dict:
    """The mean probability the model puts on the added tokens where the next token is an old
    one (what the added rows take from the old vocabulary: -log(1 - mass) nats each), over
    the positions counted."""
    import torch

    cols, tot, n = sorted(added), 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) < 2:
            continue
        with torch.inference_mode():
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        old = torch.tensor([t not in added for t in ids[1:]])
        tot += float(p[:, cols].sum(-1)[old].sum())
        n += int(old.sum())
    return {"mean_added_mass": tot / n if n else 0.0, "positions": n}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--chars", type=int, default=1500)
    ap.add_argument("--per-term", action="store_true",
                    help="nats per added term, and the terms whose new token gains")
    ap.add_argument("--windows", action="store_true",
                    help="score all of each document in --chars windows (else its first "
                         "--chars characters)")
    ap.add_argument("--keep-out", help="--per-term: write the gaining terms here")
    ap.add_argument("--out", help="--per-term: the per-term table as JSON")
    ap.add_argument("--added-mass", action="store_true",
                    help="also print NEW's mean probability on the added tokens where an old "
                         "token comes next")
    a = ap.parse_args(argv)
    from .lm_eval import load_lm, resolve_lm
    from .lmdata import text_split, train_val_split
    from .pretrain import added_token_ids

    _, val = train_val_split(text_split("domain")[0])
    docs = val[:a.docs] if a.docs else val
    texts = [d.text[i:i + a.chars] for d in docs
             for i in (range(0, len(d.text), a.chars) if a.windows else [0])]
    old = load_lm(resolve_lm(a.old)[0])[:2]
    new = load_lm(resolve_lm(a.new)[0])[:2]
    added = set(added_token_ids(new[1]))
    if a.per_term:
        return term_table(per_term(old, new, texts, added), new[1], len(docs), a)
    res = attribute(old, new, texts, added)
    print(f"nats on {len(texts)} domain-val documents ({a.chars} chars each), old vs new:")
    for c, (x, y) in res.items():
        print(f"  {c:6s} {x:10.1f} {y:10.1f}  ({y - x:+.1f})")
    if a.added_mass:
        m = added_mass(*new, texts, added)
        print(f"new model: mean probability on the added tokens where an old token comes next "
              f"{m['mean_added_mass']:.4f} ({m['positions']} positions)")
        res = res | {"added_mass": m}
    print(json.dumps(res))
    return res


def term_table(rows: dict, tokenizer, n_docs: int, a) -> dict:
    """Print and save the per-term nats; the gaining terms (new < old) -> a.keep_out."""
    from pathlib import Path

    table = sorted(({"term": tokenizer.convert_ids_to_tokens(t), "id": t, "n": r["n"],
                     "old_nats": round(r["old"], 2), "new_nats": round(r["new"], 2),
                     "gain_nats": round(r["old"] - r["new"], 2)} for t, r in rows.items()),
                   key=lambda r: -r["gain_nats"])
    keep = [r for r in table if r["gain_nats"] > 0]
    print(f"{len(table)} added terms occur in {n_docs} domain-val documents; {len(keep)} gain "
          f"(old - new nats > 0), {len(table) - len(keep)} lose")
    for r in table:
        print(f"  {r['term']!r:28s} n={r['n']:4d}  old {r['old_nats']:8.1f}  new "
              f"{r['new_nats']:8.1f}  gain {r['gain_nats']:+8.1f}")
    print(f"total gain {sum(r['gain_nats'] for r in table):+.1f} nats; of the kept terms "
          f"{sum(r['gain_nats'] for r in keep):+.1f}")
    res = {"old": a.old, "new": a.new, "docs": n_docs, "chars": a.chars,
           "windows": bool(a.windows), "terms": table}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))
    if a.keep_out:  # the words, as `rag train vocab --set keep_terms=FILE` reads them
        words = [tokenizer.convert_tokens_to_string([r["term"]]).strip() for r in keep]
        Path(a.keep_out).write_text("".join(w + "\n" for w in words))
    return res


if __name__ == "__main__":
    main()
