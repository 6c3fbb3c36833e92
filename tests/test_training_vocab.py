"""Vocabulary adaptation on the packaged SmolLM2: mined terms are frequent in the domain, rare
in general text and split into >= 3 pieces; once added each is ONE token whose embedding (input
and, tied, output) is the mean of its old pieces; the saved tokenizer + model reload and
generate; the result registers as a "base" with its lineage. Untied output embeddings get their
own mean (tiny random model)."""
import json
import random

import pytest
import torch

from training.common import load_config
from training.vocab import VocabConfig, add_terms, mine_terms, run


@pytest.fixture(scope="module")
def vocab_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    cfg = load_config(VocabConfig, "vocab-tiny.yaml", ["name=vocab-tiny"])
    res = run(cfg, output=str(out / "run"), progress_file=str(out / "progress.jsonl"))
    return cfg, res, out


def test_mined_terms_are_domain_frequent_general_rare_and_split(vocab_run, tokenizer):
    cfg, res, out = vocab_run
    terms = res["terms"]
    assert len(terms) == cfg.top_n == len(res["added"])
    for t in terms:
        assert t["term"].startswith(" ") and t["domain_count"] >= cfg.min_count
        assert t["general_count"] == 0 or t["ratio"] >= cfg.min_ratio
        assert t["n_pieces"] >= cfg.min_pieces
        assert len(tokenizer(t["term"], add_special_tokens=False)["input_ids"]) >= 3  # before
    counts = [t["domain_count"] for t in terms]
    assert counts == sorted(counts, reverse=True)
    assert json.loads((out / "run" / "terms.json").read_text())[0]["term"] == terms[0]["term"]


def test_fertility_falls_with_the_new_tokens_and_unk_rate_counts_wordpiece_unknowns(vocab_run):
    from transformers import AutoTokenizer

    from rag_app.embed import packaged_minilm_path
    from training.vocab import fertility

    _, res, _ = vocab_run
    before = res["manifest"]["metrics_before"]["fertility"]["domain-heldout"]
    after = res["manifest"]["metrics_after"]["fertility"]["domain-heldout"]
    assert before["words"] == after["words"] > 0
    assert after["tokens_per_word"] < before["tokens_per_word"]
    assert before["unk_rate"] == after["unk_rate"] == 0.0  # byte-level BPE has no UNK
    wp = AutoTokenizer.from_pretrained(packaged_minilm_path())
    f = fertility(wp, ["insulin and glucose", "the \u16a0\u16a2\u16a6 rune"])  # runic: [UNK]
    assert f["words"] == 6 and f["unk_rate"] == pytest.approx(1 / 6, abs=1e-5)
    assert f["tokens_per_word"] == pytest.approx(1.0)
    assert fertility(wp, ["cardiomyopathy"])["tokens_per_word"] > 1


def test_new_tokens_reload_as_one_token_with_mean_embeddings_and_generate(vocab_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rag_app.models import ModelRegistry

    cfg, res, out = vocab_run
    entry = res["entry"]
    assert entry["kind"] == "base" and entry["training_type"] == "vocab"
    assert ModelRegistry().get("vocab-tiny")["path"] == entry["path"]
    tok = AutoTokenizer.from_pretrained(entry["path"])
    model = AutoModelForCausalLM.from_pretrained(entry["path"], dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    emb, lm_head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert lm_head.data_ptr() == emb.data_ptr()  # still tied after resize + save + reload
    for a in res["added"]:
        assert tok(a["term"], add_special_tokens=False)["input_ids"] == [a["id"]]
        assert torch.allclose(emb[a["id"]], emb[a["piece_ids"]].mean(0), atol=1e-6)
    sentence = f"Patients with{res['added'][0]['term']} were treated."
    ids = tok(sentence, add_special_tokens=False)["input_ids"]
    assert res["added"][0]["id"] in ids and tok.decode(ids) == sentence
    prompt = tok(sentence, return_tensors="pt")
    with torch.inference_mode():
        gen = model.generate(**prompt, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 3
    man = json.loads((out / "run" / "manifest.json").read_text())
    assert man["data"]["lineage"][-1]["training_type"] == "vocab"
    assert man["data"]["added_tokens"] == cfg.top_n
    events = [json.loads(x) for x in open(out / "progress.jsonl")]
    assert [e["event"] for e in events] == ["start", "done"]


def _tiny_untied_llama():
    """SmolLM2's tokenizer + a tiny random Llama with untied input/output embeddings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rag_app.generate import ensure_base_checkpoint

    tok = AutoTokenizer.from_pretrained(ensure_base_checkpoint())
    torch.manual_seed(0)
    return tok, LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16,
                                             intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2,
                                             tie_word_embeddings=False))


def test_untied_output_embeddings_get_their_own_mean():
    tok, model = _tiny_untied_llama()
    terms = [t["term"] for t in mine_terms(
        tok, ["In glomerulonephritis and pheochromocytoma, glomerulonephritis and the"] * 5,
        ["It was a fine day in the village."], top_n=2, min_count=5, min_ratio=1.0)]
    assert terms == [" glomerulonephritis", " pheochromocytoma"]  # by count; "the" is short
    added = add_terms(model, tok, terms)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for a in added:
        assert torch.allclose(emb[a["id"]], emb[a["piece_ids"]].mean(0), atol=1e-6)
        assert torch.allclose(out[a["id"]], out[a["piece_ids"]].mean(0), atol=1e-6)
        assert not torch.allclose(emb[a["id"]], out[a["id"]])
    with pytest.raises(ValueError, match="already tokens"):
        add_terms(model, tok, terms)


def test_rare_term_accuracy_finds_terms_in_either_tokenizer_and_scores_copying(vocab_run,
                                                                              tokenizer):
    """`rag eval lm` scores rare domain terms: spans are found whether a term is several pieces
    (base tokenizer) or one token (adapted); SmolLM2 copies a term it has already seen in the
    block, so most repeated occurrences are predicted whole, the first one rarely."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint
    from training.lm_eval import rare_term_accuracy, term_spans

    _, res, _ = vocab_run
    word = res["added"][0]["term"].strip()
    text = "".join(f"Case {i}: the patient had {word} on admission. " for i in range(6))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    spans = term_spans([ids], tokenizer, [word])[0]
    piece_ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    assert len(spans) == 6 and all(ids[a:b] == piece_ids for a, b in spans)
    adapted = AutoTokenizer.from_pretrained(res["entry"]["path"])
    a_ids = adapted(text, add_special_tokens=False)["input_ids"]
    assert [b - a for a, b in term_spans([a_ids], adapted, [word])[0]] == [1] * 6
    model = AutoModelForCausalLM.from_pretrained(ensure_base_checkpoint(), dtype=torch.float32)
    acc = rare_term_accuracy(model, tokenizer, [ids], [word])
    assert acc["term_occurrences"] == 6 and acc["term_tokens"] == 6 * len(piece_ids)
    assert acc["word_accuracy"] > 0 and acc["token_accuracy"] >= 0.5  # repeats are copied
    first_only = rare_term_accuracy(model, tokenizer, [ids[:spans[0][1]]], [word])
    assert first_only["term_occurrences"] == 1 and first_only["word_accuracy"] == 0.0


def test_new_token_stage_trains_only_the_added_rows_and_lowers_their_loss():
    """`new_token_steps`: only the added tokens' rows move (input and untied output
    embeddings); every other row and weight is bit-identical; the loss on text full of the new
    terms falls; requires_grad is restored."""
    from training.pretrain import PretrainConfig, added_token_ids, warm_new_tokens

    tok, model = _tiny_untied_llama()
    assert added_token_ids(tok) == []  # the chat tokens are special, not added terms
    added = add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])
    new = [a["id"] for a in added]
    assert added_token_ids(tok) == sorted(new)
    text = " In glomerulonephritis and pheochromocytoma the kidney" * 8
    ids = tok(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + 16] for i in range(0, len(ids) - 16, 16)][:4]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss():
        with torch.no_grad():
            x = torch.tensor(blocks)
            return float(model(input_ids=x, labels=x).loss)

    l0 = loss()
    cfg = PretrainConfig(new_token_steps=3, new_token_lr=5e-2, batch_size=4)
    info = warm_new_tokens(model, tok, "clm", blocks, cfg)
    assert info["steps"] == 3 and info["new_tokens"] == 2
    assert loss() < l0
    old = [i for i in range(len(tok)) if i not in new]
    for name, p in model.named_parameters():
        assert p.requires_grad
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(p[old], before[name][old]), name
            assert not torch.allclose(p[new], before[name][new]), name
        else:
            assert torch.equal(p, before[name]), name
    assert warm_new_tokens(model, tok, "clm", blocks, PretrainConfig())["steps"] == 0


def test_frozen_rows_stay_bit_identical_while_the_rest_of_the_model_trains():
    """`new_token_freeze`: in the full run the added rows (input and untied output embeddings)
    keep the row stage's values under AdamW without weight decay; every other row moves; the
    hooks come off; decay with freezing is refused."""
    from training.pretrain import PretrainConfig, freeze_rows

    tok, model = _tiny_untied_llama()
    new = [a["id"] for a in add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])]
    ids = tok(" In glomerulonephritis and pheochromocytoma the kidney" * 16,
              add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids[i:i + 16] for i in range(0, 64, 16)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = freeze_rows(model, new)
    assert len(hooks) == 2  # untied: input and output matrices
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        p = dict(model.named_parameters())[name]
        assert torch.equal(p[new], before[name][new]), name
        old = [i for i in ids[:8] if i not in new]
        assert old and not torch.equal(p[old], before[name][old]), name
    for h in hooks:
        h.remove()
    model(input_ids=x, labels=x).loss.backward()
    assert model.get_input_embeddings().weight.grad[new].abs().sum() > 0
    assert freeze_rows(model, []) == []
    with pytest.raises(ValueError, match="weight_decay 0"):
        PretrainConfig(new_token_freeze=True, weight_decay=0.01)


def test_untie_copies_the_tied_matrix_and_saves_untied(tmp_path):
    """`untie_embeddings`: same outputs at first, then the two matrices train apart, and the
    saved model reloads with its own lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.pretrain import untie_embeddings

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(input_ids=x).logits
    assert untie_embeddings(model) and not untie_embeddings(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
        model.lm_head.weight[3] += 1.0
    model.save_pretrained(tmp_path)
    back = LlamaForCausalLM.from_pretrained(tmp_path)
    assert back.lm_head.weight is not back.get_input_embeddings().weight
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    assert torch.equal(back.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_token_windows_are_cut_around_added_tokens_round_robin_and_train_the_rows():
    """`new_token_window`: windows of N ids with an added token 3/4 of the way in (clamped at
    a block's edges), taken in turn from each added token so a rare one gets as many as its
    occurrences allow; the row stage on them lowers the loss and moves only the added rows."""
    from training.pretrain import PretrainConfig, token_windows, warm_new_tokens

    a, b = 1000, 1001
    blocks = [[1] * 10 + [a] + [2] * 9 + [a] + [3] * 11, [a] + [4] * 30 + [b]]
    wins = token_windows(blocks, [a, b], 8, 10)
    assert all(len(w) == 8 for w in wins)
    firsts = [w for w in wins if b not in w]
    assert [a in w for w in wins].count(True) == 3 and sum(b in w for w in wins) == 1
    assert wins[0] == [1] * 6 + [a, 2] and wins[1][-1] == b  # a, b, a, a: in turn
    assert wins[2] == [2] * 6 + [a, 3] and wins[3] == [a] + [4] * 7  # clamped at the start
    assert len(firsts) == 3 and len(token_windows(blocks, [a, b], 8, 2)) == 2
    assert token_windows(blocks, [a, b], 40, 5) == []  # blocks shorter than the window

    tok, model = _tiny_untied_llama()
    new = [x["id"] for x in add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])]
    ids = tok(" The kidney and the liver were fine." * 6 + " In glomerulonephritis the kidney"
              " fails." + " The kidney was fine." * 6, add_special_tokens=False)["input_ids"]
    blocks = [ids[:64]] + [ids[i:i + 64] for i in range(40, len(ids) - 64, 8)]
    before = model.get_input_embeddings().weight.detach().clone()
    cfg = PretrainConfig(new_token_steps=3, new_token_lr=5e-2, batch_size=2, block_size=64,
                         new_token_window=16)
    info = warm_new_tokens(model, tok, "clm", blocks, cfg)
    assert info["window"] == 16 and info["tokens_covered"] == 1 and info["examples"] >= 1
    after = model.get_input_embeddings().weight
    assert not torch.allclose(after[new[0]], before[new[0]])
    assert torch.equal(after[new[1]], before[new[1]])  # never in a window: no gradient
    assert info["loss_last"] < info["loss_first"]
    with pytest.raises(ValueError, match="new_token_window"):
        PretrainConfig(new_token_window=4)


def test_distill_stage_expands_added_tokens_to_their_old_pieces_and_lowers_its_loss():
    """new_token_objective=distill: the text in the old vocabulary is the added tokens expanded
    back into their pieces (= the old tokenizer's own ids), positions align where both have
    read the same text, and a few steps of row-only training lower the distillation loss
    while every other row and weight stays bit-identical."""
    from transformers import AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint
    from training.pretrain import (PretrainConfig, distill_loss, expand_pieces, old_pieces,
                                   warm_new_tokens)

    tok, model = _tiny_untied_llama()
    old_tok = AutoTokenizer.from_pretrained(ensure_base_checkpoint())
    added = add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])
    new = [a["id"] for a in added]
    pieces = old_pieces(tok, new)
    assert pieces == {a["id"]: a["piece_ids"] for a in added}
    text = " In glomerulonephritis and pheochromocytoma the kidney fails" * 6
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert set(new) <= set(ids)
    expanded, last = expand_pieces(ids, pieces)
    assert expanded == old_tok(text, add_special_tokens=False)["input_ids"]
    for j in range(len(ids)):
        assert tok.decode(expanded[:last[j] + 1]) == tok.decode(ids[:j + 1])
    blocks = [ids[i:i + 16] for i in range(0, len(ids) - 16, 16)][:4]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss():
        with torch.no_grad():
            return float(distill_loss(model, torch.tensor(blocks), pieces))

    l0 = loss()
    cfg = PretrainConfig(new_token_steps=4, new_token_lr=5e-2, batch_size=4,
                         new_token_objective="distill")
    info = warm_new_tokens(model, tok, "clm", blocks, cfg)
    assert info["objective"] == "distill" and info["steps"] == 4
    assert loss() < l0
    old = [i for i in range(len(tok)) if i not in new]
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(p[old], before[name][old]), name
        else:
            assert torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="causal LM"):
        warm_new_tokens(model, tok, "mlm", blocks, cfg)
    with pytest.raises(ValueError, match="new_token_objective"):
        PretrainConfig(new_token_objective="other")


def test_token_attribution_splits_nats_by_span_of_the_adapted_tokenisation():
    """training/token_attribution.py: the same model and tokenizer on both sides put every nat
    in "other", equal on both sides; with added tokens the added words and the tokens after them
    get their own share on both sides."""
    from transformers import AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint
    from training.pretrain import added_token_ids
    from training.token_attribution import attribute

    tok, model = _tiny_untied_llama()
    old_tok = AutoTokenizer.from_pretrained(ensure_base_checkpoint())
    texts = [" In glomerulonephritis the kidney fails, and pheochromocytoma raises blood "
             "pressure."] * 2
    same = attribute((model, old_tok), (model, old_tok), texts, set())
    assert same["new"] == same["after"] == [0.0, 0.0]
    assert same["other"][0] == same["other"][1] > 0
    add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])
    res = attribute((model, old_tok), (model, tok), texts, set(added_token_ids(tok)))
    assert all(v > 0 for c in ("new", "after", "other") for v in res[c])
    assert res["other"][0] == pytest.approx(res["other"][1], rel=0.5)


def test_same_text_blocks_score_every_token_once_and_the_same_characters_across_tokenizers():
    """`rag eval lm --chars N`: all of the first N characters in blocks that overlap by one
    token, so every token but the first is predicted once (the shorter last block too) and a
    vocabulary-adapted tokenizer is scored on the same characters as the old one."""
    from transformers import AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint
    from training.lm_eval import eval_blocks, first_chars, perplexity, text_blocks

    tok, model = _tiny_untied_llama()
    old_tok = AutoTokenizer.from_pretrained(ensure_base_checkpoint())
    add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])
    texts = [" In glomerulonephritis the kidney fails.", "A pheochromocytoma raises pressure."]
    assert first_chars(texts, 45) == [texts[0], texts[1][:45 - len(texts[0])]]
    for t in (old_tok, tok):
        stream = [i for x in t(texts)["input_ids"] for i in x + [t.eos_token_id]]
        blocks = text_blocks(texts, t, 8)
        assert all(len(b) == 8 for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= 8
        assert [i for b in blocks for i in b[1:]] == stream[1:]  # each predicted once
    old = perplexity(model, old_tok, text_blocks(texts, old_tok, 8), "clm", batch_size=3)
    new = perplexity(model, tok, text_blocks(texts, tok, 8), "clm", batch_size=3)
    assert old["tokens"] > new["tokens"]  # the added words are one token each
    assert old["chars"] == new["chars"] == sum(len(t) for t in texts) - len(" In")  # not the 1st
    from training.lmdata import text_split, train_val_split

    val = [d.text for d in train_val_split(text_split("domain")[0])[1]]
    shuffled = list(val)
    random.Random(3).shuffle(shuffled)  # --shuffle-docs 3: a random sample of documents

    def text_of(blocks, t):  # overlapping blocks -> the text they score, once
        return t.decode(blocks[0][:1] + [i for x in blocks for i in x[1:]],
                        skip_special_tokens=True)

    for t in (old_tok, tok):
        b = eval_blocks("domain-val", t, 64, 0, chars=3000)
        assert text_of(b, t) == "".join(first_chars(val, 3000))
        b = eval_blocks("domain-val", t, 64, 0, doc_chars=40)  # every document's first 40
        assert text_of(b, t) == "".join(v[:40] for v in val)
        b = eval_blocks("domain-val", t, 64, 0, chars=500, doc_chars=40)
        assert text_of(b, t) == "".join(first_chars([v[:40] for v in val], 500))
        b = eval_blocks("domain-val", t, 64, 0, chars=3000, shuffle_docs=3)
        assert text_of(b, t) == "".join(first_chars(shuffled, 3000)) != "".join(
            first_chars(val, 3000))


def test_ignored_added_targets_leave_only_old_token_loss():
    """`new_token_targets=ignore`: the full run's labels are -100 at the added tokens (the
    inputs keep them), so the loss is the mean over old-token targets only; other values
    are refused."""
    from training.pretrain import PretrainConfig, clm_collator

    tok, model = _tiny_untied_llama()
    new = [a["id"] for a in add_terms(model, tok, [" glomerulonephritis"])]
    ids = tok(" In glomerulonephritis the kidney filters blood" * 4,
              add_special_tokens=False)["input_ids"][:24]
    assert new[0] in ids
    batch = clm_collator(new)([{"input_ids": ids}])
    assert torch.equal(batch["input_ids"][0], torch.tensor(ids))
    assert (batch["labels"] == -100).sum() == ids.count(new[0]) > 0
    plain = clm_collator()([{"input_ids": ids}])
    assert (plain["labels"] == -100).sum() == 0
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[0, :-1], -1)
        nll = -logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        keep = torch.tensor([t != new[0] for t in ids[1:]])
        assert torch.allclose(model(**batch).loss, nll[keep].mean(), atol=1e-5)
        assert not torch.allclose(model(**plain).loss, nll[keep].mean(), atol=1e-3)
    with pytest.raises(ValueError, match="train or ignore"):
        PretrainConfig(new_token_targets="skip")


def test_per_term_attribution_adds_up_to_the_new_and_after_shares():
    """token_attribution.per_term: each added term's occurrences, the new model's nats on it
    and the token after it against the old model's nats on the same characters; summed over
    terms they are exactly attribute()'s "new" + "after" shares, on both sides."""
    from transformers import AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint
    from training.pretrain import added_token_ids
    from training.token_attribution import attribute, per_term

    tok, model = _tiny_untied_llama()
    old_tok = AutoTokenizer.from_pretrained(ensure_base_checkpoint())
    add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])
    texts = [" In glomerulonephritis the kidney fails, and pheochromocytoma raises blood "
             "pressure.", " Then glomerulonephritis glomerulonephritis again."]
    added = set(added_token_ids(tok))
    rows = per_term((model, old_tok), (model, tok), texts, added)
    g, p = tok.convert_tokens_to_ids([" glomerulonephritis", " pheochromocytoma"])
    assert set(rows) == {g, p} and rows[g]["n"] == 3 and rows[p]["n"] == 1
    shares = attribute((model, old_tok), (model, tok), texts, added)
    for side, i in (("old", 0), ("new", 1)):
        total = sum(r[side] for r in rows.values())
        assert total == pytest.approx(shares["new"][i] + shares["after"][i], abs=0.2)


def test_keep_terms_keeps_only_listed_mined_terms_and_refuses_unmined_words(tmp_path):
    from training.vocab import keep_only, read_words

    terms = [{"term": " insulin", "word": "insulin"}, {"term": " glucagon", "word": "glucagon"},
             {"term": " ketosis", "word": "ketosis"}]
    f = tmp_path / "keep.txt"
    f.write_text("# gaining terms\nketosis\n\ninsulin\n")
    assert [t["word"] for t in keep_only(terms, read_words(str(f)))] == ["insulin", "ketosis"]
    with pytest.raises(ValueError, match="did not select.*aspirin"):
        keep_only(terms, ["insulin", "aspirin"])
    with pytest.raises(ValueError, match="no such file"):
        read_words(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no words"):
        read_words(str(tmp_path / "empty.txt"))


def test_vocab_run_with_keep_terms_adds_only_the_listed_terms(vocab_run, tmp_path):
    cfg, res, _ = vocab_run
    words = [res["terms"][1]["word"], res["terms"][3]["word"]]
    (tmp_path / "keep.txt").write_text("\n".join(words) + "\n")
    kept = run(load_config(VocabConfig, "vocab-tiny.yaml",
                           ["name=vocab-tiny-kept", f"keep_terms={tmp_path / 'keep.txt'}"]),
               output=str(tmp_path / "run"))
    assert [t["word"] for t in kept["terms"]] == words
    assert [a["term"] for a in kept["added"]] == [res["terms"][i]["term"] for i in (1, 3)]
    assert kept["manifest"]["config"]["keep_terms"] == str(tmp_path / "keep.txt")


def test_seed_compare_pairs_each_seed_and_judges_on_the_mean(tmp_path, capsys):
    from training.seed_compare import main

    def result(seed, base, cand):
        p = tmp_path / f"s{seed}.json"
        p.write_text(json.dumps({"text": "domain-heldout", "chars": 0, "doc_chars": 300,
                                 "models": {f"none-s{seed}": {"domain-heldout": {
                                     "bits_per_char": base}}, f"gain-s{seed}": {
                                     "domain-heldout": {"bits_per_char": cand}}}}))
        return str(p)

    files = [result(1, 0.90, 0.88), result(2, 0.88, 0.89), result(3, 0.89, 0.88)]
    out = main(files + ["--out", str(tmp_path / "cmp.json")])
    assert [r["base"] for r in out["seeds"]] == ["none-s1", "none-s2", "none-s3"]
    assert out["mean_diff"] == pytest.approx((-0.02 + 0.01 - 0.01) / 3)
    assert out["cand_mean"] == pytest.approx(0.8833333) and out["cand_not_worse"] == 2
    assert json.loads((tmp_path / "cmp.json").read_text())["n_seeds"] == 3
    assert "not worse at 2 of 3 seeds" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"text": "t", "models": {"a": {"t": {"bits_per_char": 1}}}}))
    with pytest.raises(ValueError, match="exactly 2 models"):
        main([str(bad)])


def test_rows_only_run_moves_only_the_added_rows_of_an_adapted_base(vocab_run, tmp_path):
    """`full_stage=false`: the row stage is the whole run, so the saved model equals its base
    (here the vocab-tiny model) everywhere but the added tokens' rows; refused where nothing
    would train."""
    from transformers import AutoModelForCausalLM

    from training.pretrain import PretrainConfig
    from training.pretrain import run as run_pretrain

    _, res, _ = vocab_run
    base = res["entry"]["path"]
    cfg = load_config(PretrainConfig, "pretrain-tiny.yaml", [
        f"base_model={base}", "lora=false", "full_stage=false", "new_token_steps=2",
        "new_token_window=16", "new_token_pool=400", "new_token_lr=1e-2", "name=rows-tiny"])
    out = run_pretrain(cfg, output=str(tmp_path / "run"))
    assert out["manifest"]["data"]["full_stage"] is False
    assert out["manifest"]["data"]["new_token_stage"]["steps"] == 2
    before = dict(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
                  .named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(out["entry"]["path"], dtype=torch.float32)
                 .named_parameters())
    _only_rows_moved(after, before, [a["id"] for a in res["added"]], "embed_tokens")
    with pytest.raises(ValueError, match="full_stage=false"):
        PretrainConfig(full_stage=False, new_token_steps=0)
    with pytest.raises(ValueError, match="no added tokens"):
        run_pretrain(load_config(PretrainConfig, "pretrain-tiny.yaml", [
            "lora=false", "full_stage=false", "new_token_steps=2", "name=rows-none"]),
            output=str(tmp_path / "none"))


def test_added_mass_is_the_added_rows_share_where_an_old_token_comes_next():
    from training.pretrain import added_token_ids
    from training.token_attribution import added_mass

    tok, model = _tiny_untied_llama()
    add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])
    added = set(added_token_ids(tok))
    text = " In glomerulonephritis the kidney fails, as in pheochromocytoma."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    want = [float(p[i, sorted(added)].sum()) for i in range(len(ids) - 1)
            if ids[i + 1] not in added]
    m = added_mass(model, tok, [text, "x"], added)  # "x": one token, nothing to predict
    assert m["positions"] == len(want) == len(ids) - 1 - 2
    assert m["mean_added_mass"] == pytest.approx(sum(want) / len(want), rel=1e-5)
    with torch.no_grad():  # louder added output rows take more of the probability
        model.get_output_embeddings().weight[sorted(added)] *= 50
    assert added_mass(model, tok, [text], added)["mean_added_mass"] > m["mean_added_mass"]


def test_calibration_and_token_attribution_measure_the_same_added_mass():
    """The two computations of the added rows' share where an old token comes next agree on
    the same ids: calibrate's (from cached hidden states and the old vocabulary's
    log-sum-exp) and token_attribution.added_mass (from the model's own logits)."""
    from training.calibrate import calibrate
    from training.pretrain import added_token_ids
    from training.token_attribution import added_mass

    tok, model = _tiny_untied_llama()
    add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])
    added = added_token_ids(tok)
    texts = [" In glomerulonephritis the kidney fails, as it may in pheochromocytoma.",
             " Blood pressure rises with pheochromocytoma; the kidney may fail too.",
             " The kidney filters the blood."]
    want = added_mass(model, tok, texts, set(added))["mean_added_mass"]
    blocks = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    info = calibrate(model, tok, blocks, l2_grid=(1e-3,))
    assert want > 0 and info["added_mass_before"] == pytest.approx(want, rel=1e-4)


def test_calibration_fits_only_the_added_output_rows_and_lowers_the_loss_on_running_text():
    """training/calibrate.py: with the rows made to over-predict the added tokens, the convex
    fit on running text lowers its next-token loss and the added mass where an old token comes
    next; only the added tokens' OUTPUT rows change (input rows, old rows, body identical);
    the closed-form loss equals the model's own."""
    from training.calibrate import calibrate, natural_blocks, nll, position_features
    from training.pretrain import added_token_ids

    tok, model = _tiny_untied_llama()
    add_terms(model, tok, [" glomerulonephritis", " pheochromocytoma"])
    added = added_token_ids(tok)
    texts = [" In glomerulonephritis the kidney fails, as it may in pheochromocytoma.",
             " The kidney filters the blood and the heart pumps it round the body.",
             " Blood pressure rises with pheochromocytoma; the kidney may fail too."] * 4
    blocks = natural_blocks(texts, tok, 16, 10_000, seed=0)
    assert sum(len(b) for b in blocks) == sum(
        len(tok(t)["input_ids"]) + 1 for t in texts) + (len(blocks) - len(texts))
    h = position_features(model, blocks, added)["h"].mean(0)
    with torch.no_grad():  # added rows that score high wherever the text goes on
        model.get_output_embeddings().weight[added] = 30 * h / h.dot(h)
    f = position_features(model, blocks, added)
    W0 = model.get_output_embeddings().weight[added].detach().clone()
    x = torch.tensor(blocks[0])[None]
    with torch.no_grad():
        own = float(model(input_ids=x, labels=x).loss)
    n0 = len(blocks[0]) - 1
    assert float(nll(W0, f, torch.arange(len(f["h"])) < n0)) == pytest.approx(own, rel=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = calibrate(model, tok, blocks, l2_grid=(1e-3, 1e-1))
    assert info["untied"] is False and info["added_tokens"] == 2
    assert info["added_targets"] == 12 and info["positions"] == len(f["h"])
    assert info["nll_after"] < info["nll_before"]
    assert info["added_mass_before"] > 0.5 > info["added_mass_after"]
    _only_rows_moved(dict(model.named_parameters()), before, added)
    with pytest.raises(ValueError, match="no added tokens"):
        calibrate(_tiny_untied_llama()[1], _tiny_untied_llama()[0], blocks)
    # pieces=True: the old pieces' output rows are fitted too, and nothing else moves
    from training.pretrain import old_pieces

    pieces = sorted({q for ps in old_pieces(tok, added).values() for q in ps})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = calibrate(model, tok, blocks, l2_grid=(1e-3,), pieces=True)
    assert info["pieces_fitted"] == len(pieces) >= 4 and info["nll_after"] <= info["nll_before"]
    _only_rows_moved(dict(model.named_parameters()), before, added + pieces)


def _only_rows_moved(params: dict, before: dict, rows: list[int], matrix: str = "lm_head"):
    """Of all weights (name -> tensor), only rows `rows` of `matrix` differ from `before`."""
    moved = set(rows)
    for name, p in params.items():
        if matrix in name:
            rest = [i for i in range(p.shape[0]) if i not in moved]
            assert torch.equal(p[rest], before[name][rest])
            assert not torch.equal(p[rows], before[name][rows])
        else:
            assert torch.equal(p, before[name]), name


def test_calibration_only_run_unties_and_moves_only_the_added_output_rows(vocab_run, tmp_path,
                                                                        capsys):
    """`full_stage=false new_token_steps=0 calibrate_tokens=N` on the (tied) vocab-tiny base:
    the saved model is untied; its input embeddings and body equal the base's, its output rows
    equal the base's shared matrix except at the added tokens; the manifest has the fit."""
    from transformers import AutoModelForCausalLM

    from training.pretrain import PretrainConfig
    from training.pretrain import run as run_pretrain

    _, res, _ = vocab_run
    base = res["entry"]["path"]
    cfg = load_config(PretrainConfig, "pretrain-tiny.yaml", [
        f"base_model={base}", "lora=false", "full_stage=false", "new_token_steps=0",
        "calibrate_tokens=3000", "name=cal-tiny"])
    out = run_pretrain(cfg, output=str(tmp_path / "run"))
    cal = out["manifest"]["data"]["calibration"]
    assert f"added mass where an old token comes next {cal['added_mass_before']:.4f} -> " \
        f"{cal['added_mass_after']:.4f}" in capsys.readouterr().out
    assert cal["untied"] is True and cal["positions"] >= 3000 - cal["blocks"]
    assert cal["nll_after"] <= cal["nll_before"]
    b = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    a = AutoModelForCausalLM.from_pretrained(out["entry"]["path"], dtype=torch.float32)
    assert b.config.tie_word_embeddings and not a.config.tie_word_embeddings
    new = [x["id"] for x in res["added"]]
    keep = [i for i in range(len(out["tokenizer"])) if i not in set(new)]
    emb = b.get_input_embeddings().weight
    head = a.get_output_embeddings().weight
    assert torch.equal(head[keep], emb[keep]) and not torch.equal(head[new], emb[new])
    before = dict(b.named_parameters())
    for name, p in a.named_parameters():
        if "lm_head" not in name:
            assert torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="lora: false"):
        PretrainConfig(calibrate_tokens=100, lora=True)
    with pytest.raises(ValueError, match="nothing to calibrate"):
        run_pretrain(load_config(PretrainConfig, "pretrain-tiny.yaml", [
            "lora=false", "calibrate_tokens=100", "max_steps=1", "name=cal-none"]),
            output=str(tmp_path / "none"))
