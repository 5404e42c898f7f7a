"""The SST-2 setup of the demo, shared with the SST-2 quality benchmark: its arguments and the classification
recipe's flags of its teacher (all-MiniLM-L6-v2 fine-tuned) and student (teacher layers, KD + attention KL)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_attn_distill.utils.pretrained import minilm_path

__all__ = ["DEFAULT_DATA", "DemoArguments", "data_args", "student_recipe_args", "teacher_recipe_args"]

#: Relative to the working directory: ``../shared/data/sst2`` from a checkout's root; anywhere else pass --data_dir.
DEFAULT_DATA = str(Path("..") / "shared" / "data" / "sst2")


@dataclass
class DemoArguments:
    """Knobs of the SST-2 demo."""

    output_dir: str = field(default="outputs/sst2_demo", metadata={"help": "Where teacher/ and student/ are written."})
    data_dir: str = field(
        default=DEFAULT_DATA,
        metadata={
            "help": "Folder with SST-2 train.tsv, dev.tsv, test.tsv (default: ../shared/data/sst2, relative to the "
            "working directory)."
        },
    )
    teacher_steps: int = field(default=500, metadata={"help": "Teacher fine-tuning steps (ignored with --full)."})
    student_steps: int = field(default=400, metadata={"help": "Student distillation steps (ignored with --full)."})
    full: bool = field(default=False, metadata={"help": "Train both on the whole training set for --epochs."})
    epochs: float = field(default=3.0, metadata={"help": "Epochs per model with --full."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Teacher learning rate."})
    student_learning_rate: float = field(default=2e-4, metadata={"help": "Student learning rate."})
    student_layers: str = field(default="1,3,5", metadata={"help": "Teacher layers that initialise the student."})
    attention_loss: str = field(
        default="kl", metadata={"help": "'kl', 'mse_scores' or 'mse_probs' attention transfer."}
    )
    attention_weight: float = field(default=1.0, metadata={"help": "Weight of the attention loss."})
    max_seq_length: int = field(default=64, metadata={"help": "Truncation length (SST-2 sentences are short)."})
    reuse_teacher: bool = field(default=False, metadata={"help": "Skip teacher training if output_dir/teacher exists."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    latency_sentences: int = field(default=200, metadata={"help": "Test sentences timed one by one for latency."})


def data_args(demo: DemoArguments) -> list[str]:
    data = Path(demo.data_dir)
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        if not (data / name).exists():
            raise SystemExit(
                f"{data / name} is missing (--data_dir {demo.data_dir}, from {Path.cwd()}): pass --data_dir <the "
                "folder with SST-2's train.tsv, dev.tsv and test.tsv>, e.g. the sst2 folder of shared/data."
            )
    return [
        "--train_file",
        str(data / "train.tsv"),
        "--validation_file",
        str(data / "dev.tsv"),
        "--test_file",
        str(data / "test.tsv"),
        "--max_seq_length",
        str(demo.max_seq_length),
        "--card_dataset_id",  # the shared SST-2 folder is GLUE's SST-2 (train re-split; GLUE dev as test)
        "nyu-mll/glue",
    ]


def budget_args(demo: DemoArguments, steps: int) -> list[str]:
    if demo.full:
        return ["--num_train_epochs", str(demo.epochs)]
    return ["--max_steps", str(steps)]


def common_args(demo: DemoArguments, output_dir: Path) -> list[str]:
    return [
        "--print_summary",
        "false",  # the demo prints one table, with one latency measurement
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        str(demo.batch_size),
        "--per_device_eval_batch_size",
        "64",
        "--warmup_steps",
        "0.06",
        "--weight_decay",
        "0.01",
        "--logging_steps",
        "50",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--seed",
        str(demo.seed),
        "--do_train",
        "--do_predict",
        "--max_eval_samples",
        "1000",
        "--dataloader_num_workers",
        "0",
    ]


def teacher_recipe_args(demo: DemoArguments, teacher_dir: Path) -> list[str]:
    return [
        "--training_mode",
        "finetune",
        "--teacher_model_name_or_path",
        minilm_path(),
        "--learning_rate",
        str(demo.teacher_learning_rate),
        *data_args(demo),
        *budget_args(demo, demo.teacher_steps),
        *common_args(demo, teacher_dir),
    ]


def student_recipe_args(demo: DemoArguments, teacher_dir: Path, student_dir: Path) -> list[str]:
    return [
        "--training_mode",
        "distill",
        "--teacher_model_name_or_path",
        str(teacher_dir),
        "--student_teacher_layers",
        demo.student_layers,
        "--student_layers_from",
        minilm_path(),
        "--learning_rate",
        str(demo.student_learning_rate),
        "--attention_loss",
        demo.attention_loss,
        "--attention_weight",
        str(demo.attention_weight),
        "--layer_map",
        "uniform",
        "--temperature",
        "2.0",
        "--alpha_ce",
        "0.5",
        "--alpha_kd",
        "0.5",
        *data_args(demo),
        *budget_args(demo, demo.student_steps),
        *common_args(demo, student_dir),
    ]
