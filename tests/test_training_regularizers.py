"""EWC / Synaptic-Intelligence maths on tiny models (penalty zero at theta0, positive after a
move, gradient pointing away from theta0, Fisher non-negative and equal to mean squared
per-sample gradients, SI restoring the weights), the penalty wired into Trainer.compute_loss,
and the text helpers of continued pre-training (Gutenberg stripping, split by document,
packing, recipes). Seconds, no real model."""
import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput

from training import regularizers as R
from training.lmdata import TextDoc, pack, split_documents, strip_gutenberg, train_val_split


class TinyLM(torch.nn.Module):
    """model(**{"input_ids", "labels"}).loss, like a transformers model."""

    def __init__(self, vocab=11, dim=4):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, labels=None, **kw):
        logits = self.out(self.emb(input_ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


def batches(n=3, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 11, (1, length), generator=g)),
             "labels": ids.clone()} for _ in range(n)]


def test_penalty_zero_at_theta0_positive_after_move_and_gradient_direction():
    model = TinyLM()
    imp = {n: torch.rand_like(p) + 0.5 for n, p in model.named_parameters()}
    pen = R.QuadraticPenalty(model, imp, lam=0.7)
    assert float(pen().detach()) == 0.0
    with torch.no_grad():
        model.out.bias += 0.1
    value = pen()
    expected = 0.7 * float((imp["out.bias"] * 0.01).sum())
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5) and float(value.detach()) > 0
    value.backward()  # d/dtheta = 2 lam imp (theta - theta0): points away from theta0
    assert torch.allclose(model.out.bias.grad, 2 * 0.7 * imp["out.bias"] * 0.1, atol=1e-6)
    assert model.emb.weight.grad is None or float(model.emb.weight.grad.abs().sum()) == 0
    with torch.no_grad():  # a gradient step on the penalty moves back towards theta0
        model.out.bias -= 0.1 * model.out.bias.grad
    assert float(pen().detach()) < float(value.detach())


def test_penalty_only_on_trainable_params_and_validation():
    model = TinyLM()
    model.emb.weight.requires_grad = False  # like a frozen base under LoRA
    assert set(R.trainable_params(model)) == {"out.weight", "out.bias"}
    with pytest.raises(ValueError, match="not trainable"):
        R.QuadraticPenalty(model, {"emb.weight": torch.ones(11, 4)}, 1.0)
    with pytest.raises(ValueError, match="reg_lambda"):
        R.QuadraticPenalty(model, {}, -1.0)


def test_fisher_is_mean_of_squared_per_sample_gradients():
    model = TinyLM()
    bs = batches(3)
    fisher = R.fisher_diagonal(model, bs)
    manual = torch.zeros_like(model.out.weight)
    for b in bs:
        model.zero_grad()
        model(**b).loss.backward()
        manual += model.out.weight.grad ** 2
    assert torch.allclose(fisher["out.weight"], manual / 3, atol=1e-7)
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert float(fisher["out.bias"].sum()) > 0
    assert model.training  # mode restored


def test_si_importance_nonnegative_and_weights_restored():
    model = TinyLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    omega = R.si_importance(model, batches(2), steps=4, lr=0.05, xi=1e-3)
    assert set(omega) == set(before)
    assert all(bool((o >= 0).all()) for o in omega.values())
    assert sum(float(o.sum()) for o in omega.values()) > 0  # the loss fell along the path
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_normalize_and_summary():
    imp = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.0, 4.0])}
    scaled, div = R.normalize(imp, "mean")
    assert div == 2.0 and float(torch.cat(list(scaled.values())).mean()) == pytest.approx(1.0)
    assert R.normalize(imp, "max")[1] == 4.0
    assert R.summarize(scaled)["zero_share"] == 0.25
    with pytest.raises(ValueError, match="all importances are 0"):
        R.normalize({"a": torch.zeros(3)}, "mean")


def test_penalty_trainer_adds_penalty_in_compute_loss(tmp_path):
    from transformers import TrainingArguments

    model = TinyLM()
    pen = R.QuadraticPenalty(model, {n: torch.ones_like(p) for n, p in model.named_parameters()},
                             lam=5.0)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             max_steps=1)
    trainer = R.penalty_trainer_class()(model=model, args=args, penalty=pen)
    b = batches(1)[0]
    model.train()
    plain = float(model(**b).loss.detach())
    assert float(trainer.compute_loss(model, b).detach()) == pytest.approx(plain)  # theta = theta0
    with torch.no_grad():
        model.out.weight += 0.05
    moved = float(model(**b).loss.detach())
    with_pen = float(trainer.compute_loss(model, b).detach())
    assert with_pen > moved and with_pen == pytest.approx(moved + float(pen().detach()), rel=1e-5)
    model.eval()  # evaluation losses carry no penalty
    assert float(trainer.compute_loss(model, b).detach()) == pytest.approx(moved)


def test_strip_gutenberg_header_and_footer():
    book = ("\ufeffThe Project Gutenberg eBook of X\r\n\r\n*** START OF THE PROJECT GUTENBERG "
            "EBOOK X ***\r\nCHAPTER I.\r\n\r\nIt was a dark night.\r\n\r\n*** END OF THE PROJECT "
            "GUTENBERG EBOOK X ***\r\nSection 1. General Terms of Use\r\n")
    body = strip_gutenberg(book)
    assert body.startswith("CHAPTER I.") and body.endswith("dark night.")
    no_start = ("Title: X\n\nAuthor: Y\n\nChapter I.\n\nText.\n"
                "*** END OF THE PROJECT GUTENBERG EBOOK")
    assert strip_gutenberg(no_start) == "Chapter I.\n\nText."


def test_general_documents_have_no_licence_text():
    from training.lmdata import general_documents

    docs = general_documents()
    text = "\n".join(d.text for d in docs)
    assert len(docs) > 20 and "It is a truth universally acknowledged" in docs[0].text
    assert "Gutenberg" not in text and "Title: " not in text


def test_split_by_document_is_deterministic_disjoint_and_forces_holdouts():
    docs = [TextDoc(f"d{i}", f"text {i}") for i in range(200)]
    train, held = split_documents(docs, 0.2, seed=3, force_heldout={"d0", "d1"})
    assert {d.key for d in train}.isdisjoint({d.key for d in held})
    assert len(train) + len(held) == 200 and {"d0", "d1"} <= {d.key for d in held}
    assert 20 < len(held) < 70
    again = split_documents(list(reversed(docs)), 0.2, seed=3, force_heldout={"d0", "d1"})
    assert [d.key for d in again[1]] == [d.key for d in held]  # order-independent
    other = split_documents(docs, 0.2, seed=4)[1]
    assert {d.key for d in other} != {d.key for d in held}


def test_validation_slice_is_the_tail_of_the_train_side_and_leaves_its_front_unchanged(
        tokenizer):
    """Hyper-parameters are chosen on the train side's tail (`rag eval lm --text domain-val`):
    it is disjoint from the pool, and the blocks packed from the front of the pool (what a run
    trains on) are the same as without the slice."""
    docs = [TextDoc(f"d{i}", f"document {i} " + "word " * (i % 7 + 3)) for i in range(100)]
    pool, val = train_val_split(docs, 0.05)
    assert [d.key for d in val] == ["d95", "d96", "d97", "d98", "d99"]
    assert len(pool) == 95 and {d.key for d in pool}.isdisjoint({d.key for d in val})
    front = pack([d.text for d in docs], tokenizer, 16, max_blocks=10)
    assert pack([d.text for d in pool], tokenizer, 16, max_blocks=10) == front
    assert train_val_split(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(docs, 1.0)


def test_pack_blocks_exact_length_with_eos_between_documents(tokenizer):
    blocks = pack(["alpha beta gamma " * 20, "delta " * 50], tokenizer, 16, max_blocks=5)
    assert len(blocks) == 5 and all(len(b) == 16 for b in blocks)
    allb = pack(["alpha beta gamma " * 20, "delta " * 50], tokenizer, 16)
    assert tokenizer.eos_token_id in sum(allb, [])
    with pytest.raises(ValueError, match="block_size"):
        pack(["x"], tokenizer, 4)


def test_recipes_load_and_group_under_their_kind():
    from rag_app.jobs import list_recipes
    from training.common import load_config
    from training.pretrain import PretrainConfig
    from training.vocab import VocabConfig

    kinds = list_recipes()
    assert {"pretrain.yaml", "pretrain-ewc.yaml", "pretrain-si.yaml", "pretrain-tiny.yaml",
            "pretrain-ewc-tiny.yaml", "pretrain-si-tiny.yaml"} <= \
        {p.rsplit("/", 1)[-1] for p in kinds["pretrain"]}
    assert {p.rsplit("/", 1)[-1] for p in kinds["vocab"]} == {"vocab.yaml", "vocab-tiny.yaml"}
    for name in ("pretrain", "pretrain-ewc", "pretrain-si"):
        full, tiny = (load_config(PretrainConfig, f"{name}{s}.yaml") for s in ("", "-tiny"))
        assert full.regularizer == tiny.regularizer
    assert load_config(VocabConfig, "vocab-tiny.yaml").top_n > 0
    with pytest.raises(ValueError, match="regularizer"):
        load_config(PretrainConfig, "pretrain.yaml", ["regularizer=l2"])
    with pytest.raises(ValueError, match="objective"):
        load_config(PretrainConfig, "pretrain.yaml", ["objective=seq2seq"])
