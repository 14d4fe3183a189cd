"""`reference_gradients`: the rebuild's forward/backward, on a small pure-torch causal LM (no LLaMA-Factory)."""

from __future__ import annotations

import torch

from helpers import tiny_lm

from ogpsa.plugin.methods.gradient_span.gradients import reference_gradients
from ogpsa.plugin.reference import ReferenceSet


def _sets(gen: torch.Generator) -> list[ReferenceSet]:
    def row(n_prompt: int, n_answer: int) -> dict:
        ids = torch.randint(0, 11, (n_prompt + n_answer,), generator=gen).tolist()
        return {"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]}

    return [ReferenceSet("a", [row(3, 4) for _ in range(5)]), ReferenceSet("b", [row(2, 5) for _ in range(3)])]


def collate(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}


def _expected(model: torch.nn.Module, ref: ReferenceSet) -> tuple[list[torch.Tensor], int]:
    """Gradient of the summed answer-token NLL over the whole set, in one batch."""
    batch = collate(ref.features)
    n = int((batch["labels"][:, 1:] != -100).sum())
    grads = torch.autograd.grad(model(**batch).loss * n, list(model.parameters()))
    return list(grads), n


def test_gradients_accumulate_into_the_given_rows():
    gen = torch.Generator().manual_seed(0)
    model, sets = tiny_lm(), _sets(gen)
    params = list(model.parameters())
    handed: list[list[torch.Tensor]] = []

    def rows():
        handed.append([torch.zeros(p.numel()) for p in params])
        return handed[-1]

    got = {g.name: (g.rows, g.answer_tokens)
           for g in reference_gradients(model, params, sets, collate, 2, torch.device("cpu"), rows)}
    for ref, bufs in zip(sets, handed):
        grads, n = got[ref.name]
        want, n_want = _expected(model, ref)
        assert n == n_want
        assert [g.data_ptr() for g in grads] == [b.data_ptr() for b in bufs]  # the rows themselves, no copy
        for g, w, b in zip(grads, want, bufs):
            assert torch.allclose(g, w, atol=1e-5) and torch.equal(b.view_as(w), g)


def test_a_gradient_that_autograd_moved_elsewhere_still_lands_in_the_row():
    # A post-accumulate hook that swaps .grad for a copy: autograd then accumulates the later
    # micro-batches into that copy, not into the row. The row must still end up with the whole sum.
    gen = torch.Generator().manual_seed(1)
    model, sets = tiny_lm(), _sets(gen)
    model.emb.weight.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", p.grad.clone()))
    params = list(model.parameters())
    got = {g.name: g.rows for g in reference_gradients(
        model, params, sets, collate, 2, torch.device("cpu"), lambda: [torch.zeros(p.numel()) for p in params])}
    assert all(p.grad is None for p in params)
    for ref in sets:
        grads = got[ref.name]
        want, _ = _expected(model, ref)
        for g, w in zip(grads, want):
            assert torch.allclose(g, w, atol=1e-5)


def test_answer_nll_weights_every_answer_token_alike_whatever_the_batching():
    # rows of one length whose answers differ in length (4 and 2 tokens): averaging per-batch means would
    # weight a 2-token answer's tokens twice; the token-weighted mean must equal the one-batch loss
    from ogpsa.plugin.reference import answer_nll

    gen = torch.Generator().manual_seed(3)
    rows = []
    for n_prompt, n_answer in [(3, 4), (5, 2), (3, 4), (5, 2), (5, 2)]:
        ids = torch.randint(0, 11, (n_prompt + n_answer,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    ref = ReferenceSet("mixed", rows)
    model = tiny_lm().eval()
    with torch.no_grad():
        whole = float(model(**collate(rows)).loss)
    per_batch_mean = sum(float(model(**collate([r])).loss) for r in rows) / len(rows)
    assert abs(per_batch_mean - whole) > 1e-3  # the rows are unequal enough for the weighting to matter
    for batch_size in (1, 2, 8):
        assert abs(answer_nll(model, ref, collate, batch_size) - whole) < 1e-5
