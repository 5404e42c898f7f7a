"""What the task recipes share: model arguments, argument parsing, building the student, publishing."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, HfArgumentParser

from hf_attn_distill.hub.model_card import (
    CardInfo,
    card_metrics,
    count_parameters,
    describe_layers,
    distillation_settings,
    hub_model_id,
    public_model_name,
    summary_table,
    task_of,
    write_model_card,
)
from hf_attn_distill.students import student_from_config, student_from_teacher_layers
from hf_attn_distill.trainer import DistillTrainer
from hf_attn_distill.training.checkpoints import last_complete_checkpoint, resolve_resume
from hf_attn_distill.training.eval_order import InOrderTrainer
from hf_attn_distill.training.pairing import check_same_tokenizer
from hf_attn_distill.utils.hardware import emulated_bf16_warning
from hf_attn_distill.utils.profiling import machine_info, measure_forward_latency_ms

logger = logging.getLogger(__name__)

__all__ = [
    "Evaluation",
    "run",
    "describe_data",
    "MODES",
    "ModelArguments",
    "build_student",
    "card_settings",
    "check_tokenizers",
    "evaluate",
    "finish",
    "is_sharded",
    "parse_args",
    "parse_overrides",
    "public_model_name",
    "push_folder_to_hub",
    "train",
    "write_card",
]

MODES = ("distill", "finetune")


@dataclass
class ModelArguments:
    """Which teacher, which student, and whether to distill or fine-tune."""

    teacher_model_name_or_path: str = field(
        metadata={
            "help": "Teacher: Hub id or local folder. In finetune mode without a student, the model to fine-tune."
        }
    )
    training_mode: str = field(
        default="distill",
        metadata={
            "help": "'distill': train the student with DistillTrainer. 'finetune': plain Trainer, no teacher signal; "
            "fine-tunes the student if one is given (the no-teacher baseline), else the teacher model itself.",
            "choices": list(MODES),
        },
    )
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student as a Hub id or folder (must share the teacher's tokenizer)."}
    )
    student_teacher_layers: str | None = field(
        default=None,
        metadata={"help": "Build the student from these 0-based layers of --student_layers_from, e.g. '1,3,5'."},
    )
    student_layers_from: str | None = field(
        default=None,
        metadata={"help": "Model whose embeddings and layers initialise the student (default: the teacher)."},
    )
    student_config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Random-init student from the teacher's config with overrides: 'num_hidden_layers=4,hidden_size=312'."
        },
    )
    print_summary: bool = field(
        default=True,
        metadata={"help": "Print the closing teacher-vs-student table (the model card's results) at the end."},
    )
    card_teacher_id: str | None = field(
        default=None,
        metadata={
            "help": "The teacher's Hub id, when --teacher_model_name_or_path is a local copy of it: the model card "
            "names the teacher by it and links it as base_model (a local folder is named by its folder name only)."
        },
    )
    card_dataset_id: str | None = field(
        default=None,
        metadata={
            "help": "The Hub id of the dataset that the local data files hold (a copy or a re-split of it, e.g. "
            "'nyu-mll/glue'): the model card names it in its datasets metadata and results (else 'local data')."
        },
    )
    evaluate_teacher: bool = field(
        default=True,
        metadata={
            "help": "In distill mode, also evaluate the teacher on the same data (metrics prefixed 'teacher_'; "
            "the model card's teacher row)."
        },
    )

    def __post_init__(self):
        if self.training_mode not in MODES:
            raise ValueError(f"training_mode must be one of {MODES}, got {self.training_mode!r}")
        given = [
            n
            for n in ("student_model_name_or_path", "student_teacher_layers", "student_config_overrides")
            if getattr(self, n)
        ]
        if len(given) > 1:
            raise ValueError(f"Give one way to build the student, not {given}.")
        if self.training_mode == "distill" and not given:
            raise ValueError(
                "Distillation needs a student: --student_model_name_or_path, --student_teacher_layers '1,3,5' or "
                "--student_config_overrides 'num_hidden_layers=4'. Use --training_mode finetune to train a teacher."
            )
        for name in ("card_teacher_id", "card_dataset_id"):
            value = getattr(self, name)
            if value is not None and hub_model_id(value) is None:
                raise ValueError(f"--{name} {value!r} is not a Hub id ('name' or 'org/name'); give the Hub id.")
        if self.student_layers_from and not self.student_teacher_layers:
            raise ValueError("--student_layers_from only applies with --student_teacher_layers.")

    @property
    def has_student(self) -> bool:
        return bool(self.student_model_name_or_path or self.student_teacher_layers or self.student_config_overrides)


def parse_args(dataclass_types: tuple, args: list[str] | None = None, prog: str | None = None) -> tuple:
    """Parse the command line, or a single YAML/JSON file of the same arguments; ``prog`` names the command in
    usage lines (default: the script's name)."""
    parser = HfArgumentParser(dataclass_types, **({"prog": prog} if prog else {}))
    args = sys.argv[1:] if args is None else args
    if len(args) == 1 and args[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(args[0]))
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args)


def parse_overrides(text: str) -> dict:
    """``'num_hidden_layers=4,hidden_size=312'`` or a JSON object -> dict of ints/floats/strings."""
    if text.strip().startswith("{"):
        return json.loads(text)
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Cannot parse override {item!r}; use key=value pairs separated by commas.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def build_student(model_args: ModelArguments, teacher, auto_class, **head_kwargs):
    """The student ``model_args`` asks for, with the task head class ``auto_class`` (``AutoModelFor...``)."""
    if model_args.student_model_name_or_path:
        return auto_class.from_pretrained(model_args.student_model_name_or_path, **head_kwargs)
    if model_args.student_teacher_layers:
        layers = [int(x) for x in model_args.student_teacher_layers.split(",")]
        source = teacher
        if model_args.student_layers_from:
            source = auto_class.from_pretrained(model_args.student_layers_from, **head_kwargs)
        return student_from_teacher_layers(source, layers)
    return student_from_config(teacher, **parse_overrides(model_args.student_config_overrides))


def check_tokenizers(model_args: ModelArguments, tokenizer) -> None:
    """Refuse a student folder whose tokenizer maps ids to other words than the teacher's."""
    if not model_args.student_model_name_or_path:
        return
    try:
        student_tokenizer = AutoTokenizer.from_pretrained(model_args.student_model_name_or_path)
    except (OSError, ValueError):
        return  # student folder without tokenizer files: it reads the teacher's
    try:
        check_same_tokenizer(tokenizer, student_tokenizer)
    except ValueError as err:
        raise ValueError(
            f"{err} With the recipes: --student_teacher_layers or --student_config_overrides build one."
        ) from None


def push_folder_to_hub(training_args) -> None:
    """Upload ``output_dir`` (without checkpoints) to ``hub_model_id``, as ``Trainer.push_to_hub`` names repos.

    A failure raises ``RuntimeError`` saying why, after everything is saved locally; the token never
    appears in the message.
    """
    from huggingface_hub import HfApi

    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    try:
        api = HfApi(token=training_args.hub_token)
        api.create_repo(repo_id, exist_ok=True, private=training_args.hub_private_repo)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=training_args.output_dir,
            ignore_patterns=["checkpoint-*", "runs/*", "training_args.bin"],
            commit_message="Distilled student",
        )
    except Exception as err:  # noqa: BLE001 - any transport or Hub error: keep the local result, say why
        reason = str(err).replace(training_args.hub_token or "\0", "<token>")
        raise RuntimeError(
            f"Pushing to the Hub repo {repo_id} failed: {reason.splitlines()[0] if reason else type(err).__name__}. "
            f"The student, its tokenizer, metrics and model card are saved in {training_args.output_dir}; push them "
            "later with `huggingface-cli upload`."
        ) from None


def train(trainer, training_args) -> dict:
    """``trainer.train()`` (resuming if asked), then save model, metrics and state as ``run_*.py`` do.

    With ``push_to_hub`` the Trainer pushes during training as ``hub_strategy`` says; the final upload is
    :func:`push_folder_to_hub`'s, once the card is written, so the model is saved here without pushing.
    """
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume is None and last_complete_checkpoint(training_args.output_dir) is not None:
        logging.getLogger(__name__).warning(
            "%s already holds checkpoints; training starts from scratch and overwrites them. Pass "
            "--resume_from_checkpoint true to continue from the last complete one.",
            training_args.output_dir,
        )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(_internal_call=True)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    return dict(result.metrics)


@dataclass
class Evaluation:
    """One evaluation at the end of a recipe: metric prefix (``"eval"``, ``"test"``), the dataset (``None``: the
    trainer's ``eval_dataset``), what to do before it (e.g. point ``compute_metrics`` at its references),
    settings to record with its metrics (e.g. the generation length of generated translations), and metrics the
    recipe measures itself, added to the trainer's (``extra()``, e.g. perplexities)."""

    prefix: str
    dataset: object | None = None
    before: Callable[[], None] | None = None
    settings: dict | None = None
    extra: Callable[[], dict] | None = None


def run(
    trainer,
    trainer_kwargs: dict,
    model_args: ModelArguments,
    training_args,
    tokenizer,
    evaluations: list[Evaluation],
    teacher_keys: tuple[str, ...],
    sample: Callable[[], dict | None],
    card: Callable[[dict, dict | None], None],
    teacher_trainer_class=None,
) -> dict:
    """The common end of every recipe's ``main()``: train (resuming if asked), evaluate the student and, in
    distill mode, the teacher on the same data (``teacher_trainer_class``, default :class:`~hf_attn_distill.InOrderTrainer`, built from
    ``trainer_kwargs``), write the figures, then on the main process save the tokenizer, write the card
    (``card(metrics, sample)``, which also prints the one closing summary table) and push if asked. Returns the
    metrics."""
    metrics: dict = {}
    warning = emulated_bf16_warning(training_args, trainer.args.device)
    if warning and not isinstance(trainer, DistillTrainer):  # DistillTrainer gives it when built
        logger.warning(warning)
    if training_args.do_train:
        metrics.update(train(trainer, training_args))
    teacher_trainer = None
    distill = model_args.training_mode == "distill"
    if evaluations and distill and model_args.evaluate_teacher and not is_sharded(trainer):
        teacher_trainer = (teacher_trainer_class or InOrderTrainer)(
            **{**trainer_kwargs, "model": trainer.teacher_model}
        )
    for evaluation in evaluations:
        if evaluation.before is not None:
            evaluation.before()
        metrics.update(
            evaluate(
                trainer,
                teacher_trainer,
                evaluation.prefix,
                teacher_keys,
                evaluation.dataset,
                {**(evaluation.extra() if evaluation.extra is not None else {}), **(evaluation.settings or {})},
            )
        )
    example = sample()
    if training_args.do_train and trainer.is_world_process_zero() and example is not None:
        write_figures(trainer, tokenizer, example, training_args.output_dir)
    finish(trainer, tokenizer, training_args, lambda: card(metrics, example))
    return metrics


def evaluate(
    trainer, teacher_trainer, prefix: str, teacher_keys: tuple[str, ...], dataset=None, settings: dict | None = None
) -> dict:
    """Evaluate the trained model (and, given ``teacher_trainer``, the teacher on the same data: its metrics
    ending in ``teacher_keys`` are added as ``teacher_{prefix}_...``); log and save them with ``settings``."""
    metrics = {**trainer.evaluate(dataset, metric_key_prefix=prefix), **(settings or {})}
    if teacher_trainer is not None:
        teacher_metrics = teacher_trainer.evaluate(dataset, metric_key_prefix=prefix)
        metrics.update({f"teacher_{k}": v for k, v in teacher_metrics.items() if k.endswith(teacher_keys)})
    trainer.log_metrics(prefix, metrics)
    trainer.save_metrics(prefix, metrics)
    return metrics


def describe_data(
    dataset_name: str | None,
    train_file: str | None,
    eval_file: str | None,
    eval_split: str,
    config_name: str | None = None,
    source_id: str | None = None,
) -> dict:
    """What a card says about the data: ``dataset`` (prose), ``dataset_id`` (the Hub id, only for Hub data) and
    ``eval_split`` (what the metrics were measured on), naming local files by their file name only.
    ``source_id`` (``--card_dataset_id``) is the Hub dataset that local files were taken from."""
    if dataset_name and source_id:
        raise ValueError(
            f"--card_dataset_id {source_id} names the source of local data files; with --dataset_name "
            f"{dataset_name} the card names the Hub dataset itself: drop --card_dataset_id."
        )
    if dataset_name:
        name = f"{dataset_name} ({config_name})" if config_name else dataset_name
        return {"dataset": name, "dataset_id": dataset_name, "eval_split": f"{eval_split} split of {name}"}
    train = Path(train_file).name if train_file else None
    evaluated = Path(eval_file).name if eval_file else None
    local = f"local files of {source_id}" if source_id else "local data"
    return {
        "dataset": f"{local} ({train} for training)" if train else local,
        "dataset_id": source_id,
        "eval_split": f"local file {evaluated}" if evaluated else f"{eval_split} data",
    }


def card_settings(model_args: ModelArguments, training_args, extra: dict | None = None) -> dict:
    """The settings table of a model card: how the student was built and trained."""
    keys = ["training_mode", "student_teacher_layers", "student_layers_from", "student_config_overrides"]
    settings = {k: getattr(model_args, k) for k in keys if getattr(model_args, k) is not None}
    if settings.get("student_layers_from"):
        settings["student_layers_from"] = public_model_name(settings["student_layers_from"])
    settings.update({k: v for k, v in (extra or {}).items() if v is not None})
    if model_args.training_mode == "distill":
        settings.update(distillation_settings(training_args))
    else:
        train_keys = ["learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "seed"]
        settings.update({k: getattr(training_args, k) for k in train_keys})
    return settings


def is_sharded(trainer) -> bool:
    """Whether the student or the teacher is sharded across processes (FSDP, DeepSpeed ZeRO-3): their forward
    then needs every process, so the main process cannot run them alone (latency, teacher evaluation)."""
    from hf_attn_distill.training.distributed import teacher_placement

    return bool(getattr(trainer, "is_fsdp_enabled", False)) or teacher_placement(trainer.accelerator) != "replicated"


def write_card(
    trainer,
    model_args: ModelArguments,
    training_args,
    teacher,
    model,
    metrics: dict,
    *,
    dataset: str,
    eval_split: str,
    dataset_id: str | None = None,
    sample: dict | None,
    method: str | None = None,
    extra_settings: dict | None = None,
    citations: tuple[str, ...] = ("hinton2015", "tinybert", "minilm"),
) -> Path:
    """The model card of ``output_dir``: teacher vs student metrics measured in this run (``metrics`` as the
    recipe saved them), CPU latency of one forward pass on ``sample`` (batch 1) for both, objective and settings;
    the same results are printed as a closing summary table.

    In distill mode it goes through ``DistillTrainer.create_model_card``; otherwise the card describes
    fine-tuning without a teacher, with the starting model in the teacher's row."""
    student_metrics, teacher_metrics = card_metrics(metrics)
    fields = {
        "model_name": training_args.hub_model_id or Path(training_args.output_dir).name,
        "teacher": model_args.card_teacher_id or model_args.teacher_model_name_or_path,
        "dataset": dataset,
        "dataset_id": dataset_id,
        "eval_split": eval_split,
        "metrics": student_metrics,
        "teacher_metrics": teacher_metrics,
        "citations": citations,
        "settings": card_settings(model_args, training_args, extra_settings),
    }
    if method:
        fields["method"] = method
    if sample is not None and not is_sharded(trainer):  # a sharded model's forward needs every process
        fields["student_latency_ms"] = measure_forward_latency_ms(model, sample)
        if teacher is not model:
            fields["teacher_latency_ms"] = measure_forward_latency_ms(teacher, sample)
        device, dtype = next(model.parameters()).device, next(teacher.parameters()).dtype
        fields["latency_note"] = (
            f"median of 20 forward passes at batch 1, {sample['input_ids'].shape[-1]} input "
            f"tokens, on {device.type}, teacher in {str(dtype).removeprefix('torch.')}; "
            f"{machine_info()}"
        )
    if model_args.training_mode == "distill":
        info = trainer.create_model_card(**fields)
    else:
        info = CardInfo(
            task=task_of(model),
            distilled=False,
            student_params=count_parameters(model),
            teacher_params=count_parameters(teacher),
            student_layers=describe_layers(model),
            **{"method": "fine-tuning without a teacher", **fields},
        )
        write_model_card(training_args.output_dir, info)
    if model_args.print_summary:
        print(f"\n{summary_table(info)}\n", flush=True)  # noqa: T201 - the recipe's closing summary
    return Path(training_args.output_dir) / "README.md"


def finish(trainer, tokenizer, training_args, write_card) -> None:
    """On the main process: save the tokenizer next to the model, write the card, push if asked."""
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        write_card()
        if training_args.push_to_hub:
            push_folder_to_hub(training_args)


def check_not_empty(datasets_by_split: dict) -> None:
    """Refuse empty splits, naming them."""
    for split, ds in datasets_by_split.items():
        if ds is not None and len(ds) == 0:
            raise ValueError(f"Split '{split}' is empty: point the data arguments at a file with examples.")


def write_figures(trainer, tokenizer, inputs: dict, output_dir: str | Path) -> list[Path]:
    """``loss_curves.png`` and, for each distilled attention site, ``attention_{site}.png`` (teacher vs student
    on the first example of ``inputs``) in ``output_dir``, also logged to TensorBoard when ``report_to`` includes
    it. Skipped with a warning when matplotlib is missing."""
    import logging

    from hf_attn_distill import group_teacher_heads
    from hf_attn_distill.hub.plots import attention_maps, log_figures_to_tensorboard, plot_attention, plot_loss_curves

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logging.getLogger(__name__).warning("matplotlib is not installed: no figures written (pip install matplotlib).")
        return []
    output_dir = Path(output_dir)
    written = []
    if any("loss" in e for e in trainer.state.log_history):
        written.append(plot_loss_curves(trainer.state.log_history, output_dir / "loss_curves.png"))
    source = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    target = (
        tokenizer.convert_ids_to_tokens(inputs["decoder_input_ids"][0]) if "decoder_input_ids" in inputs else source
    )
    device = trainer.args.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    for transfer in getattr(trainer, "transfers", []):
        teacher = attention_maps(trainer.teacher_model, transfer.teacher.modules, inputs)
        student = attention_maps(trainer.model, transfer.student.modules, inputs)
        teacher = [group_teacher_heads(t[None], transfer.student_heads, "probs")[0] for t in teacher]
        queries = source if transfer.site == "encoder" else target
        keys = target if transfer.site == "decoder" else source
        written.append(
            plot_attention(
                teacher,
                student,
                transfer.pairs,
                output_dir / f"attention_{transfer.site}.png",
                queries,
                keys,
                title=f"{transfer.site} attention",
            )
        )
    log_figures_to_tensorboard(trainer, written)
    return written
