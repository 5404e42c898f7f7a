"""Attention figures and loss curves are written as PNGs from real recorded attention and logs."""

import pytest
import torch
from conftest import tiny_classifier
from transformers import DataCollatorWithPadding

from hf_attn_distill import DistillConfig, DistillTrainer, group_teacher_heads
from hf_attn_distill.hub.plots import attention_maps, plot_attention, plot_loss_curves

pytest.importorskip("matplotlib")


def test_attention_figure_and_loss_curves(tmp_path, tokenizer, sentiment_dataset):
    from PIL import Image

    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        max_steps=4,
        logging_steps=1,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DistillTrainer(
        model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
        teacher_model=tiny_classifier(0),
        args=args,
        train_dataset=sentiment_dataset,
        eval_dataset=sentiment_dataset.select(range(8)),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    transfer = trainer.transfers[0]
    inputs = tokenizer(["a gripping , funny film"], return_tensors="pt")
    teacher = attention_maps(trainer.teacher_model, transfer.teacher.modules, inputs)
    student = attention_maps(trainer.model, transfer.student.modules, inputs)
    assert teacher[0].shape == (4, inputs["input_ids"].shape[1], inputs["input_ids"].shape[1])
    torch.testing.assert_close(student[0].sum(-1), torch.ones(2, inputs["input_ids"].shape[1]))
    teacher = [group_teacher_heads(t[None], 2, "probs")[0] for t in teacher]
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    figure = plot_attention(teacher, student, transfer.pairs, tmp_path / "attention.png", tokens, tokens)
    width, height = Image.open(figure).size
    assert width >= 2 * 2.2 * 100 * 0.9 and height >= 4 * 4.4 * 100 * 0.9 / 2  # 2 heads wide, 2 pairs x 2 rows high
    curves = plot_loss_curves(trainer.state.log_history, tmp_path / "losses.png")
    assert Image.open(curves).size == (700, 400)
    with pytest.raises(ValueError, match="no loss terms"):
        plot_loss_curves([{"step": 1, "learning_rate": 0.1}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="one teacher map"):
        plot_attention(teacher, student[:1], transfer.pairs, tmp_path / "y.png")
