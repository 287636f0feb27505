"""The pretraining objective against straightforward per-sample loops of the reference formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip_recipes.objectives import pretrain as objective


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _loop_itc(img, txt, img_m, txt_m, img_q, txt_q, temp, alpha):
    batch = img.shape[0]
    text_all = [txt_m[j] for j in range(batch)] + [txt_q[:, j] for j in range(txt_q.shape[1])]
    image_all = [img_m[j] for j in range(batch)] + [img_q[:, j] for j in range(img_q.shape[1])]
    total_i2t = total_t2i = 0.0
    for b in range(batch):
        for query, query_m, keys, direction in (
            (img[b], img_m[b], text_all, "i2t"),
            (txt[b], txt_m[b], image_all, "t2i"),
        ):
            logits = [float(query @ k) / temp for k in keys]
            logits_m = [float(query_m @ k) / temp for k in keys]
            norm = math.log(sum(math.exp(v) for v in logits))
            norm_m = sum(math.exp(v) for v in logits_m)
            loss = 0.0
            for j in range(len(keys)):
                target = alpha * math.exp(logits_m[j]) / norm_m + (1 - alpha) * (j == b)
                loss -= target * (logits[j] - norm)
            if direction == "i2t":
                total_i2t += loss
            else:
                total_t2i += loss
    return (total_i2t / batch + total_t2i / batch) / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_loss_matches_loop(alpha):
    batch, dim, queue = 4, 8, 6
    img, txt = _unit(batch, dim, seed=0), _unit(batch, dim, seed=1)
    img_m, txt_m = _unit(batch, dim, seed=2), _unit(batch, dim, seed=3)
    img_q, txt_q = _unit(queue, dim, seed=4).t(), _unit(queue, dim, seed=5).t()
    temp = torch.tensor([0.07])
    result = objective.itc_loss(img, txt, img_m, txt_m, img_q, txt_q, temp, alpha)
    expected = _loop_itc(img.double(), txt.double(), img_m.double(), txt_m.double(),
                         img_q.double(), txt_q.double(), 0.07, alpha)  # fmt: skip
    assert result.sim_i2t.shape == (batch, batch + queue)
    assert result.loss.item() == pytest.approx(expected, abs=1e-4)


def test_itc_runs_in_fp32_under_bf16_autocast():
    img, txt = _unit(4, 8, seed=0).bfloat16(), _unit(4, 8, seed=1).bfloat16()
    queue = _unit(6, 8, seed=2).t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = objective.itc_loss(img, txt, img, txt, queue, queue, torch.tensor([0.001]), 0.4)
    assert result.sim_i2t.dtype == torch.float32 and result.loss.dtype == torch.float32
    assert torch.isfinite(result.loss)


def test_itm_loss_matches_loop_and_diagnostics():
    logits = torch.randn(9, 2, generator=torch.Generator().manual_seed(0))
    result = objective.itm_loss(logits)
    labels = [1] * 3 + [0] * 6
    expected = sum(-F.log_softmax(logits[i], 0)[labels[i]].item() for i in range(9)) / 9
    assert result.loss.item() == pytest.approx(expected, abs=1e-6)
    probs = logits.softmax(1)[:, 1]
    assert result.pos_prob.item() == pytest.approx(probs[:3].mean().item(), abs=1e-6)
    assert result.neg_prob.item() == pytest.approx(probs[3:].mean().item(), abs=1e-6)
    correct = sum(int(logits[i].argmax().item() == labels[i]) for i in range(9))
    assert result.accuracy.item() == pytest.approx(correct / 9)


def test_collapsed_itm_head_sits_at_prior_entropy():
    logits = torch.tensor([[math.log(2.0), 0.0]]).repeat(9, 1)
    assert objective.itm_loss(logits).loss.item() == pytest.approx(0.6365, abs=1e-4)


def test_lm_loss_matches_loop_with_label_smoothing():
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab, eps = 2, 6, 11, 0.1
    logits = torch.randn(batch, length, vocab, generator=gen)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    ids[1, 4:] = 0
    labels = objective.lm_labels(objective.replace_first_token(ids, 10), pad_token_id=0)
    total, count = 0.0, 0
    for b in range(batch):
        for t in range(length - 1):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            log_probs = F.log_softmax(logits[b, t].double(), 0)
            total += -(1 - eps) * log_probs[target].item() - eps * log_probs.mean().item()
            count += 1
    assert objective.lm_loss(logits, labels, eps).item() == pytest.approx(total / count, abs=1e-5)
    assert labels[:, 0].eq(10).all()  # [DEC] is the input at t=0, never a target


def test_hard_negatives_never_equal_the_positive():
    sim = torch.eye(5) * 50.0  # positives dominate: only the 1e-4 floor is left for negatives
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        neg_image, neg_text = objective.sample_hard_negatives(sim, sim, gen)
        assert (neg_image != torch.arange(5)).all() and (neg_text != torch.arange(5)).all()


def test_hard_negative_sampling_follows_the_weights():
    gen = torch.Generator().manual_seed(0)
    sim_i2t = torch.randn(4, 4, generator=gen) * 2
    sim_t2i = torch.randn(4, 4, generator=gen) * 2
    calls = 1500
    counts_image, counts_text = torch.zeros(4, 4), torch.zeros(4, 4)
    rows = torch.arange(4)
    for _ in range(calls):
        neg_image, neg_text = objective.sample_hard_negatives(sim_i2t, sim_t2i, gen)
        counts_image[rows, neg_image] += 1
        counts_text[rows, neg_text] += 1
    for counts, sim in ((counts_image, sim_t2i), (counts_text, sim_i2t)):
        weights = objective.hard_negative_weights(sim)
        expected = weights / weights.sum(1, keepdim=True) * calls
        off_diagonal = ~torch.eye(4, dtype=torch.bool)
        chi2 = ((counts - expected) ** 2 / expected.clamp_min(1e-9))[off_diagonal].sum().item()
        assert chi2 < 40.0  # 8 degrees of freedom: p < 1e-5 under the null
        assert counts.diagonal().sum() == 0


def test_sampling_is_reproducible_with_a_generator():
    sim = torch.randn(6, 6)
    first = objective.sample_hard_negatives(sim, sim, torch.Generator().manual_seed(7))
    second = objective.sample_hard_negatives(sim, sim, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_negatives_are_the_draws_torch_multinomial_makes():
    """The exponential race on the same generator picks what `torch.multinomial` picked (the
    numbers the golden losses were trained with)."""
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        sim_i2t, sim_t2i = torch.randn(6, 9, generator=gen) * 3, torch.randn(6, 9, generator=gen)
        gen.manual_seed(100 + seed)
        want_image = torch.multinomial(objective.hard_negative_weights(sim_t2i[:, :6]), 1,
                                       generator=gen).squeeze(1)  # fmt: skip
        want_text = torch.multinomial(objective.hard_negative_weights(sim_i2t[:, :6]), 1,
                                      generator=gen).squeeze(1)  # fmt: skip
        got = objective.sample_hard_negatives(sim_i2t, sim_t2i, gen.manual_seed(100 + seed))
        assert torch.equal(got[0], want_image) and torch.equal(got[1], want_text)


def _itc_case(batch=6, dim=8, queue=12):
    img, txt = _unit(batch, dim, seed=0), _unit(batch, dim, seed=1)
    img_m, txt_m = _unit(batch, dim, seed=2), _unit(batch, dim, seed=3)
    queues = _unit(queue, dim, seed=4).t().contiguous(), _unit(queue, dim, seed=5).t().contiguous()
    return img, txt, img_m, txt_m, *queues


def _run_itc_itm(losses: objective.ItcItmLosses, case, temp, alpha, seed):
    """One step's ITC + negatives + ITM forward and backward: values and input gradients."""
    img, txt, img_m, txt_m, img_q, txt_q = case
    img, txt, temp = (t.clone().requires_grad_() for t in (img, txt, temp))
    logits = torch.randn(3 * img.shape[0], 2, generator=torch.Generator().manual_seed(seed))
    logits.requires_grad_()
    gen = torch.Generator().manual_seed(seed)
    loss, neg_image, neg_text = losses.itc_and_negatives(img, txt, img_m, txt_m, img_q, txt_q,
                                                         temp, alpha, gen)  # fmt: skip
    itm = losses.itm(logits)
    (loss + itm.loss).backward()
    return (loss, *itm, neg_image, neg_text, img.grad, txt.grad, temp.grad, logits.grad)


def test_itc_itm_compile_to_two_graphs_and_the_alpha_ramp_does_not_recompile():
    """fullgraph=True (a graph break raises); every step of the alpha ramp, a new queue content
    and a new temperature reuse the two graphs of the first step."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list):
        graphs.append(gm)
        return gm.forward

    losses, eager = objective.ItcItmLosses(counting_backend), objective.ItcItmLosses()
    case = _itc_case()
    for step, alpha in enumerate([0.0, 0.1, 0.2, 0.4]):
        case[4].mul_(-1.0)  # the queue changes in place between steps, as an enqueue does
        temp = torch.tensor([0.07 + 0.01 * step])
        got = _run_itc_itm(losses, case, temp, alpha, step)
        want = _run_itc_itm(eager, case, temp, alpha, step)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), step
        assert len(graphs) == 2, step
    for fn in (objective.itc_loss_and_negatives, objective.itm_loss):
        assert len(_debug_get_cache_entry_list(fn.__code__)) == 1


@pytest.mark.slow  # inductor cold compile of two small graphs, ~20-60 s on 2 cores
def test_inductor_itc_itm_equal_eager_in_fp32():
    torch._dynamo.reset()
    losses, eager = objective.ItcItmLosses("inductor"), objective.ItcItmLosses()
    case = _itc_case(batch=8, dim=16, queue=32)
    for step, alpha in enumerate([0.0, 0.4]):
        temp = torch.tensor([0.05])
        got = _run_itc_itm(losses, case, temp, alpha, step)
        want = _run_itc_itm(eager, case, temp, alpha, step)
        assert torch.equal(got[5], want[5]) and torch.equal(got[6], want[6])  # the negatives
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), step


def _lm_case(dtype=torch.float32, rows=37, vocab=53, width=16):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.3
    bias = torch.randn(vocab, generator=gen) * 0.1
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::5] = objective.LM_IGNORE_INDEX
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_chunked_lm_loss_equals_the_full_fp32_loss(chunks):
    """fp32: the chunked loss and its gradients equal full logits + `lm_loss` (tight)."""
    hidden, weight, bias, targets = _lm_case()
    results = []
    for chunked in (True, False):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if chunked:
            loss = objective.ChunkedLMLoss(chunks)(h, w, b, targets, 0.1)
        else:
            labels = torch.cat([torch.zeros(1, dtype=torch.long), targets])[None]
            loss = objective.lm_loss(torch.nn.functional.linear(h, w, b)[None], labels, 0.1)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad, b.grad))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_chunked_lm_loss_in_bf16_is_within_bf16_tolerance_and_compiles():
    hidden, weight, bias, targets = _lm_case(rows=64, vocab=301, width=32)
    full = objective.ChunkedLMLoss(1)(hidden, weight, bias, targets, 0.1)
    compiled = objective.ChunkedLMLoss(4, compile_backend="eager")
    loss = compiled(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), targets, 0.1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - full.item()) < 2e-2 * full.item()
