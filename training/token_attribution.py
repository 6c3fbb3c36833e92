"""Where a vocabulary-adapted model loses (or gains) against the model without the new tokens:
each model's next-token NLL over the same texts, attributed to character spans of the adapted
tokenisation: the added tokens themselves ("new"), the token right after one ("after"), and the
rest ("other"). A token of the old tokenisation counts where it overlaps such a span.

    python -m training.token_attribution OLD NEW [--docs 40] [--chars 1500]
        (OLD, NEW: registered base names or paths; texts: the train side's validation slice)
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


def attribute(old, new, texts: list[str], added: set[int], max_tokens: int = 400) -> dict:
    """{category: [old model's nats, new model's nats]} over the characters both scored.
    `old`, `new`: (model, tokenizer); `added`: the added token ids of the new tokenizer."""
    tot = {c: [0.0, 0.0] for c in CATEGORIES}
    for text in texts:
        ia, oa, na = token_nats(*old, text, max_tokens)
        ib, ob, nb = token_nats(*new, text, max_tokens)
        if not oa or not ob:
            continue
        end = min(oa[-1][1], ob[-1][1])
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--chars", type=int, default=1500)
    a = ap.parse_args(argv)
    from .lm_eval import load_lm, resolve_lm
    from .lmdata import text_split, train_val_split
    from .pretrain import added_token_ids

    _, val = train_val_split(text_split("domain")[0])
    texts = [d.text[:a.chars] for d in val[:a.docs]]
    old = load_lm(resolve_lm(a.old)[0])[:2]
    new = load_lm(resolve_lm(a.new)[0])[:2]
    res = attribute(old, new, texts, set(added_token_ids(new[1])))
    print(f"nats on {len(texts)} domain-val documents ({a.chars} chars each), old vs new:")
    for c, (x, y) in res.items():
        print(f"  {c:6s} {x:10.1f} {y:10.1f}  ({y - x:+.1f})")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
