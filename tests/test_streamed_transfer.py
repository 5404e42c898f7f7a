"""Streaming attention transfer equals the fused path and the reference losses, values and gradients."""

import pytest
import torch
from conftest import tiny_classifier

import hf_attn_distill.attention.streamed as streamed
from hf_attn_distill import (
    AttentionRecorder,
    attention_kl_loss,
    attention_mse_loss,
    enable_attention_capture,
    find_attention_modules,
    group_teacher_heads,
)
from hf_attn_distill.attention.fused import TransferTarget
from hf_attn_distill.attention.streamed import AttentionMask, AttentionRows, streamed_transfer

LOSSES = ["kl", "mse_scores", "mse_probs"]
_MIN = torch.finfo(torch.float32).min


def _case(site, teacher_kv_heads=4, bias=False, seed=0):
    """Student (2 heads) and teacher (4 query heads) inputs of one layer, with padding; ``site`` picks the mask."""
    g = torch.Generator().manual_seed(seed)
    batch, num_q = 3, 7
    num_k = 9 if site == "cross" else num_q
    q = torch.randn(batch, 2, num_q, 8, generator=g) * 0.8
    k = torch.randn(batch, 2, num_k, 8, generator=g) * 0.8
    v = torch.randn(batch, 2, num_k, 8, generator=g)
    t_q = torch.randn(batch, 4, num_q, 6, generator=g)
    t_k = torch.randn(batch, teacher_kv_heads, num_k, 6, generator=g)
    key_valid = torch.ones(batch, num_k, dtype=torch.bool)
    key_valid[1, num_k - 3 :] = False
    key_valid[2, 2:] = False
    query_valid = torch.ones(batch, num_q, dtype=torch.bool)
    query_valid[1, 5:] = False
    causal = site == "decoder"
    blocked = ~key_valid[:, None, None, :].expand(batch, 1, num_q, num_k)
    if causal:
        blocked = blocked | torch.ones(num_q, num_k, dtype=torch.bool).triu(1)
    s_bias = torch.randn(1, 2, num_q, num_k, generator=g, requires_grad=True) if bias else None
    t_bias = torch.randn(1, 4, num_q, num_k, generator=g) if bias else None
    target_query = query_valid if site != "encoder" else None
    return dict(
        q=q.requires_grad_(),
        k=k.requires_grad_(),
        v=v.requires_grad_(),
        t_q=t_q,
        t_k=t_k,
        blocked=blocked,
        causal=causal,
        key_valid=key_valid,
        query_valid=target_query,
        s_bias=s_bias,
        t_bias=t_bias,
    )


def _teacher_full(c, quantity):
    """The teacher's [B, 4, Q, K] record computed directly."""
    keys = c["t_k"].repeat_interleave(4 // c["t_k"].shape[1], dim=1)
    scores = c["t_q"] @ keys.transpose(-1, -2)
    if c["t_bias"] is not None:
        scores = scores + c["t_bias"]
    if quantity == "scores":
        return scores
    return torch.log_softmax(scores.masked_fill(c["blocked"], _MIN), -1)


def _reference(c, loss):
    """Output and loss by the plain formulas, with autograd."""
    scores = c["q"] @ c["k"].transpose(-1, -2)
    if c["s_bias"] is not None:
        scores = scores + c["s_bias"]
    masked = scores.masked_fill(c["blocked"], _MIN)
    log_p = torch.log_softmax(masked, -1)
    out = log_p.exp() @ c["v"]
    quantity = "scores" if loss == "mse_scores" else "log_probs"
    teacher = group_teacher_heads(_teacher_full(c, quantity), 2, quantity)
    masks = (c["key_valid"], c["query_valid"], c["causal"])
    if loss == "kl":
        value = attention_kl_loss(log_p, teacher, *masks)
    elif loss == "mse_scores":
        value = attention_mse_loss(masked, teacher, *masks)
    else:
        value = attention_mse_loss(log_p.exp(), teacher.exp(), *masks)
    return out, value


def _streamed(c, loss, compact=True):
    rows = AttentionRows(c["t_q"], c["t_k"], c["t_bias"], AttentionMask.compact(c["blocked"], False))
    if not compact:
        rows = AttentionRows(c["t_q"], c["t_k"], c["t_bias"], AttentionMask(blocked=c["blocked"]))
    target = TransferTarget(rows, loss, c["key_valid"], c["query_valid"], c["causal"])
    return streamed_transfer(c["q"], c["k"], c["v"], c["s_bias"], AttentionMask(blocked=c["blocked"]), target)


def _grads(c, out, value, weight=0.7):
    names = [n for n in ("q", "k", "v", "s_bias") if c[n] is not None]
    g = torch.Generator().manual_seed(5)
    probe = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * probe).sum() + weight * value, [c[n] for n in names])
    return dict(zip(names, grads))


@pytest.mark.parametrize("budget", [None, 2 * 2 * 9], ids=["one-block", "row-blocks"])
@pytest.mark.parametrize("site", ["encoder", "decoder", "cross"])
@pytest.mark.parametrize("loss", LOSSES)
def test_values_and_gradients_equal_the_reference(loss, site, budget, monkeypatch):
    if budget is not None:
        monkeypatch.setattr(streamed, "ROW_BLOCK_ELEMENTS", budget)  # blocks of a few query rows
    c = _case(site)
    want_out, want_loss = _reference(c, loss)
    want = _grads(c, want_out, want_loss)
    got_out, got_loss = _streamed(c, loss)
    got = _grads(c, got_out, got_loss)
    assert want_loss.item() > 1e-3
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("loss", LOSSES)
def test_grouped_query_teacher_and_trainable_bias(loss, monkeypatch):
    """Teacher with 2 key/value heads for 4 query heads, T5-style position bias on both (the student's learnt)."""
    monkeypatch.setattr(streamed, "ROW_BLOCK_ELEMENTS", 2 * 2 * 7 * 3)
    c = _case("decoder", teacher_kv_heads=2, bias=True)
    want_out, want_loss = _reference(c, loss)
    want = _grads(c, want_out, want_loss)
    got_out, got_loss = _streamed(c, loss, compact=False)
    got = _grads(c, got_out, got_loss)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_masks_are_stored_as_key_padding():
    c = _case("decoder")
    compact = AttentionMask.compact(c["blocked"], False)
    assert compact.blocked is None and compact.causal and torch.equal(compact.key_valid, c["key_valid"])
    for causal in (False, True):  # sliding windows, bidirectional (ModernBERT) and causal (Qwen2), with padding
        base = c["blocked"] if causal else ~c["key_valid"][:, None, None, :].expand(3, 1, 7, 7)
        window = base | (torch.arange(7)[:, None] - torch.arange(7)[None, :]).abs().gt(2)
        compact = AttentionMask.compact(window, False)
        assert (compact.blocked, compact.window, compact.causal) == (None, 2, causal)
        assert torch.equal(compact.dense(7, 7).expand_as(window), window)
        scores = torch.randn(3, 2, 7, 7)
        torch.testing.assert_close(
            AttentionMask(blocked=window).apply_(scores[:, :, 2:5].clone(), slice(2, 5), 7),
            compact.apply_(scores[:, :, 2:5].clone(), slice(2, 5), 7),
        )
    odd = c["blocked"].clone()
    odd[0, 0, 3, 1] = True  # no padding, causal or window pattern: kept as it is
    assert AttentionMask.compact(odd, False).blocked is odd


def test_fully_masked_rows_output_zeros_as_sdpa_does():
    c = _case("encoder")
    c["blocked"] = c["blocked"].clone()
    c["blocked"][0, :, 3, :] = True
    out, _ = _streamed(c, "kl", compact=False)
    assert torch.count_nonzero(out[0, :, 3]) == 0


@pytest.mark.parametrize("site", ["encoder", "decoder"])
@pytest.mark.parametrize("budget", [None, 2 * 2 * 7 * 2], ids=["one-block", "row-blocks"])
def test_every_mask_form_gives_the_same_output_and_zero_dead_rows(site, budget, monkeypatch):
    """A padding (and causal) mask given as its boolean tensor or in compact form: the same output and gradients,
    and zero output for query rows that see no key (an example that is all padding), as "sdpa" gives."""
    if budget is not None:
        monkeypatch.setattr(streamed, "ROW_BLOCK_ELEMENTS", budget)
    c = _case(site)
    c["key_valid"][0] = False  # example 0: every key is padding
    c["blocked"] = c["blocked"].clone()
    c["blocked"][0] = True
    rows = AttentionRows(c["t_q"], c["t_k"], None, AttentionMask(blocked=c["blocked"]))
    target = TransferTarget(rows, "kl", c["key_valid"], c["query_valid"], c["causal"])
    results = []
    for mask in (AttentionMask(blocked=c["blocked"]), AttentionMask(key_valid=c["key_valid"], causal=c["causal"])):
        out, loss = streamed_transfer(c["q"], c["k"], c["v"], None, mask, target)
        results.append((out, _grads(c, out, loss)))
    (want_out, want), (got_out, got) = results
    assert torch.count_nonzero(want_out[0]) == 0
    torch.testing.assert_close(got_out, want_out, atol=0, rtol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("budget", [None, 2 * 2 * 7 * 2], ids=["one-block", "row-blocks"])
def test_dropout_is_redrawn_identically_in_backward(budget, monkeypatch):
    """With dropout, output and gradients are those of the plain formulas with the same dropout mask (the loss
    is taken before dropout), also when backward recomputes the blocks."""
    if budget is not None:
        monkeypatch.setattr(streamed, "ROW_BLOCK_ELEMENTS", budget)
    c = _case("encoder")
    torch.manual_seed(1)  # a call draws its dropout seed from the default generator
    got_out, got_loss = streamed.streamed_transfer(
        c["q"],
        c["k"],
        c["v"],
        None,
        AttentionMask(blocked=c["blocked"]),
        TransferTarget(
            AttentionRows(c["t_q"], c["t_k"], None, AttentionMask(blocked=c["blocked"])), "kl", c["key_valid"]
        ),
        0.5,
    )
    got = _grads(c, got_out, got_loss)
    torch.manual_seed(1)
    dropout = streamed._Dropout(0.5, "cpu")
    blocks = streamed.row_blocks(3, 2, 7, 7)
    keep = torch.cat([dropout.keep((3, 2, b.stop - b.start, 7), i) for i, b in enumerate(blocks)], dim=2)
    assert 0.3 < keep.float().mean() < 0.7
    log_p = torch.log_softmax((c["q"] @ c["k"].transpose(-1, -2)).masked_fill(c["blocked"], _MIN), -1)
    want_out = (log_p.exp() * keep / 0.5) @ c["v"]
    teacher = group_teacher_heads(_teacher_full(c, "log_probs"), 2, "log_probs")
    want_loss = attention_kl_loss(log_p, teacher, c["key_valid"])
    want = _grads(c, want_out, want_loss)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_teacher_keeps_no_query_by_key_tensor(tmp_path):
    """What the trainer's teacher recorder stores between the teacher's forward and the student's layer: queries
    and keys and a [B, K] key padding, nothing of Q x K elements."""
    from hf_attn_distill import DistillConfig, DistillTrainer

    teacher = tiny_classifier(0, num_hidden_layers=4)
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=DistillConfig(output_dir=str(tmp_path)))
    (transfer,) = trainer.transfers
    ids = torch.randint(1000, 2000, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 20:] = 0
    records = transfer.teacher.start()
    with torch.inference_mode():
        teacher(input_ids=ids, attention_mask=mask)
    records = transfer.teacher.collect()
    transfer.teacher.stop()
    for index, record in enumerate(records):
        assert isinstance(record, AttentionRows)
        assert record.query.shape == record.key.shape == (3, 4, 24, 8)  # [B, H, L, d]
        assert record.mask.key_valid.shape == (3, 24)
        assert record.bias is None and record.mask.blocked is None and record.mask.additive is None
        # and they recompute exactly what the explicit recording gives
        layer = transfer.teacher.layers[index]
        enable_attention_capture(teacher)
        with torch.inference_mode(), AttentionRecorder([layer]).record() as full:
            teacher(input_ids=ids, attention_mask=mask)
        valid = mask.bool()[:, None, None, :].expand_as(full[0])
        torch.testing.assert_close(record.materialize("log_probs")[valid], full[0][valid], atol=1e-6, rtol=1e-5)
    assert find_attention_modules(teacher)  # still discoverable


def test_a_sliding_window_teacher_keeps_its_window_not_its_mask(tmp_path):
    """ModernBERT's local layers: the record keeps the key padding and the window; it recomputes the eager rows."""
    from test_model_families import batch, modernbert

    from hf_attn_distill import DistillConfig, DistillTrainer

    teacher, student = modernbert(4, 4, 0), modernbert(2, 2, 1)
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, layer_map="0:0,1:2")
    (transfer,) = DistillTrainer(model=student, teacher_model=teacher, args=args).transfers
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    transfer.teacher.start()
    with torch.inference_mode():
        teacher(**inputs)
    global_, local = transfer.teacher.collect()
    transfer.teacher.stop()
    assert global_.mask.window is None and local.mask.window == 2
    assert local.mask.blocked is None and local.mask.key_valid.shape == (3, 9)
    teacher.set_attn_implementation("eager")
    eager = teacher(**inputs, output_attentions=True).attentions[2]
    valid = inputs["attention_mask"].bool()
    valid = (valid[:, None, :, None] & valid[:, None, None, :]).expand_as(eager)
    torch.testing.assert_close(local.materialize("log_probs").exp()[valid], eager[valid], atol=1e-6, rtol=1e-5)


class _CountingRows(AttentionRows):
    """Teacher rows that count the blocks they are asked for."""

    calls = 0

    def block(self, rows, quantity, heads):
        type(self).calls += 1
        return super().block(rows, quantity, heads)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("keep", [0, 10**6], ids=["streamed", "kept"])
def test_a_layer_within_keep_elements_recomputes_nothing(loss, keep, monkeypatch):
    """``keep_elements`` picks the path, the row-block size only the blocks: a layer within it keeps its blocks, one
    above it recomputes the student's in backward; neither asks the teacher for a row in backward (the loss's own
    gradient is taken in forward). Both equal the reference."""
    monkeypatch.setattr(streamed, "ROW_BLOCK_ELEMENTS", 3 * 2 * 7 * 2)  # 4 blocks (2, 2, 2, 1 rows) when streamed
    c = _case("decoder")
    want_out, want_loss = _reference(c, loss)
    want = _grads(c, want_out, want_loss)
    _CountingRows.calls = 0
    rows = _CountingRows(c["t_q"], c["t_k"], None, AttentionMask.compact(c["blocked"], False))
    target = TransferTarget(rows, loss, c["key_valid"], c["query_valid"], c["causal"], keep_elements=keep)
    got_out, got_loss = streamed_transfer(c["q"], c["k"], c["v"], None, AttentionMask(blocked=c["blocked"]), target)
    assert _CountingRows.calls == 4
    got = _grads(c, got_out, got_loss)
    assert _CountingRows.calls == 4
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    assert streamed.keeps_attention(3, 2, 7, 7, keep) is bool(keep)
    assert streamed.keeps_attention(3, 2, 7, 7, 3 * 2 * 7 * 7) and not streamed.keeps_attention(3, 2, 7, 7, 293)


def test_kept_dropout_equals_streamed_dropout(monkeypatch):
    """With dropout, the kept path (its masks kept, the dropped probabilities redrawn from them in backward), the
    recomputing path with its masks kept (they fit the budget, the attention does not) and the recomputing path
    drawing them again in backward give the same output and gradients for the same draws, in one block and in
    several; only the last draws in backward."""
    c = _case("encoder")  # attention 3 x 2 x 7 x 7 = 294 entries
    assert not streamed.keeps_dropout_masks(3, 2, 7, 7, 146)  # masks above half the budget are drawn again
    assert streamed.keeps_dropout_masks(8, 12, 512, 512, 16 << 20)  # the default 64 MB: 512 tokens at batch 8
    assert not streamed.keeps_dropout_masks(1, 12, 2048, 2048, 16 << 20)  # but not 2,048 at batch 1
    draws = []
    original = streamed._Dropout.keep
    monkeypatch.setattr(streamed._Dropout, "keep", lambda self, *a: draws.append(1) or original(self, *a))
    for block, blocks in ((None, 1), (3 * 2 * 7 * 3, 3)):
        if block is not None:
            monkeypatch.setattr(streamed, "ROW_BLOCK_ELEMENTS", block)
        results = []
        for keep, drawn in ((10**6, blocks), (150, blocks), (0, 2 * blocks)):  # 294 <= 2 * 150: masks kept
            assert streamed.keeps_dropout_masks(3, 2, 7, 7, keep) is (keep > 0)
            rows = AttentionRows(c["t_q"], c["t_k"], None, AttentionMask(blocked=c["blocked"]))
            target = TransferTarget(rows, "kl", c["key_valid"], keep_elements=keep)
            torch.manual_seed(1)
            draws.clear()
            out, loss = streamed_transfer(
                c["q"], c["k"], c["v"], None, AttentionMask(blocked=c["blocked"]), target, 0.5
            )
            results.append((out, loss, _grads(c, out, loss)))
            assert len(draws) == drawn, (block, keep)
        want_out, want_loss, want = results[0]
        assert 0 < torch.count_nonzero(want_out) < want_out.numel()
        for got_out, got_loss, got in results[1:]:
            torch.testing.assert_close(got_out, want_out, atol=0, rtol=0)
            torch.testing.assert_close(got_loss, want_loss, atol=0, rtol=0)
            for name in want:
                torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_trainer_logs_each_layers_path_once(tmp_path, caplog):
    """``attention_keep_mb`` reaches the student's layers: with 0 they stream, with the default they keep, and the
    choice of each mapped layer is logged once, at the first step."""
    import logging

    from hf_attn_distill import DistillConfig, DistillTrainer

    ids = torch.randint(1000, 2000, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    for keep_mb, path in ((0.0, "blocks recomputed in backward"), (64.0, "kept for backward")):
        teacher = tiny_classifier(0, num_hidden_layers=4)
        student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)
        args = DistillConfig(output_dir=str(tmp_path), report_to="none", attention_keep_mb=keep_mb)
        trainer = DistillTrainer(model=student, teacher_model=teacher, args=args)
        (transfer,) = trainer.transfers
        assert transfer.keep_elements == int(keep_mb * 2**20) // 4
        if keep_mb == 64.0:  # the default keeps up to 384 tokens at batch 8, 12 heads (docs/internals.md)
            assert args.attention_keep_mb == DistillConfig.attention_keep_mb
            assert streamed.keeps_attention(8, 12, 384, 384, transfer.keep_elements)
            assert not streamed.keeps_attention(8, 12, 512, 512, transfer.keep_elements)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_attn_distill.terms.attention"):
            for _ in range(2):
                trainer.compute_loss(student, dict(batch))
        lines = [r.getMessage() for r in caplog.records if "loss_attn_enc" in r.getMessage()]
        assert len(lines) == 2, lines  # two mapped layers, once each
        assert all(path in line and "2x2x16x16" in line for line in lines), lines


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("keep", [0, 10**6], ids=["recomputed", "kept"])
@pytest.mark.parametrize("bias_rows", [7, 1], ids=["bias-per-query", "bias-broadcast-over-queries"])
def test_a_trainable_bias_over_several_blocks(keep, bias_rows, loss, monkeypatch):
    """A student bias, per query or broadcast over the queries (``[1, H, 1, K]``), gets the reference gradient when
    the layer runs in several blocks, kept or recomputed. A bias broadcast over the queries takes the loss's share
    of its gradient in forward, as the queries and keys do (the teacher is asked for each block once); one per
    query takes it in backward, from the teacher's rows asked again (a ``Q x K`` gradient is not held until
    backward)."""
    monkeypatch.setattr(streamed, "ROW_BLOCK_ELEMENTS", 3 * 2 * 7 * 2)  # 4 blocks (2, 2, 2, 1 rows)
    c = _case("encoder", bias=True)
    c["s_bias"] = torch.randn(1, 2, bias_rows, 7, generator=torch.Generator().manual_seed(3), requires_grad=True)
    want_out, want_loss = _reference(c, loss)
    want = _grads(c, want_out, want_loss)
    _CountingRows.calls = 0
    rows = _CountingRows(c["t_q"], c["t_k"], c["t_bias"], AttentionMask.compact(c["blocked"], False))
    target = TransferTarget(rows, loss, c["key_valid"], c["query_valid"], c["causal"], keep_elements=keep)
    got_out, got_loss = streamed_transfer(
        c["q"], c["k"], c["v"], c["s_bias"], AttentionMask(blocked=c["blocked"]), target
    )
    blocks = 4
    assert _CountingRows.calls == blocks
    got = _grads(c, got_out, got_loss)
    assert _CountingRows.calls == (2 * blocks if bias_rows > 1 else blocks)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_only_the_values_training_takes_no_loss_gradient(monkeypatch):
    """Where only the values train (the loss does not depend on them), forward takes no loss gradient and the
    values' gradient is the reference's."""
    c = _case("encoder")
    c["q"].requires_grad_(False)
    c["k"].requires_grad_(False)
    want_out, _ = _reference(c, "kl")
    (want,) = torch.autograd.grad((want_out * 2.0).sum(), [c["v"]])
    made = []
    original = streamed._LossGrads
    monkeypatch.setattr(streamed, "_LossGrads", lambda *a: made.append(1) or original(*a))
    rows = AttentionRows(c["t_q"], c["t_k"], None, AttentionMask.compact(c["blocked"], False))
    target = TransferTarget(rows, "kl", c["key_valid"], c["query_valid"], c["causal"])
    got_out, got_loss = streamed_transfer(c["q"], c["k"], c["v"], None, AttentionMask(blocked=c["blocked"]), target)
    (got,) = torch.autograd.grad((got_out * 2.0).sum() + got_loss, [c["v"]])
    assert made == []
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kept", [False, True])
def test_model_laid_out_keys_and_values_are_copied_once_a_layer_not_once_a_block(monkeypatch, kept):
    """Keys and values as attention modules pass them (``[B, L, H, d]`` projections viewed as ``[B, H, L, d]``) do
    not fold into one batch dimension, so ``matmul`` would copy them at every block: the layer-sized copies are as
    many with 8 blocks as with 2 (copied at every block they were 59 against 17), and values and gradients are those
    of the same inputs laid out contiguously."""
    from torch.utils._python_dispatch import TorchDispatchMode

    batch, heads, length, dim = 2, 3, 16, 5
    g = torch.Generator().manual_seed(0)

    def model_view(d, h=heads):
        return torch.randn(batch, length, h * d, generator=g).view(batch, length, h, d).transpose(1, 2)

    q, k, v, t_q, t_k = model_view(dim), model_view(dim), model_view(dim), model_view(6, 6), model_view(6, 2)
    layer_sized = {(length, dim), (dim, length), (length, 6), (6, length)}  # a whole layer's keys or values
    copied = []

    class CountCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
                copied.append(tuple(args[0].shape[-2:]) in layer_sized)
            return func(*args, **(kwargs or {}))

    def run(contiguous: bool, rows_a_block: int):
        monkeypatch.setattr(streamed, "ROW_BLOCK_ELEMENTS", batch * heads * rows_a_block * length)
        inputs = [(x.contiguous() if contiguous else x).detach().requires_grad_() for x in (q, k, v)]
        rows = AttentionRows(t_q, t_k.contiguous() if contiguous else t_k, None, AttentionMask())
        target = TransferTarget(rows, "kl", keep_elements=(1 << 30) if kept else 0)
        out, loss = streamed_transfer(*inputs, None, AttentionMask(), target)
        (out.square().sum() + loss).backward()
        return [out, loss, *(x.grad for x in inputs)]

    counts = []
    for rows_a_block in (8, 2):
        copied.clear()
        with CountCopies():
            got = run(contiguous=False, rows_a_block=rows_a_block)
        counts.append(sum(copied))
        for a, b in zip(got, run(contiguous=True, rows_a_block=rows_a_block)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counts[0] == counts[1] > 0, counts
