"""Model cards for distilled students: Hub metadata (``ModelCardData`` with a ``model-index``) rendered through the
Jinja template shipped in ``hf_attn_distill/templates/``.

A card never holds a local path: models given as local folders are named by their folder name only, and only
a Hub id becomes ``base_model``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from hf_attn_distill.terms.registry import CARD_GROUPS, term_specs

__all__ = [
    "CARD_METRICS",
    "CITATIONS",
    "DEFAULT_TEMPLATE",
    "TASKS",
    "CardInfo",
    "build_model_card",
    "card_metrics",
    "count_parameters",
    "describe_layers",
    "distillation_method",
    "distillation_settings",
    "hub_model_id",
    "public_model_name",
    "summary_table",
    "task_of",
    "trainer_card_info",
    "write_model_card",
    "write_trainer_card",
]

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "distilled_student_card.md"

#: Hub task id -> (task name shown in the model-index, Auto class that loads the student, usage snippet).
TASKS = {
    "text-classification": (
        "Text Classification",
        "AutoModelForSequenceClassification",
        (
            'classifier = pipeline("text-classification", model="{model}")\n'
            'print(classifier("a gripping, beautifully shot film"))'
        ),
    ),
    "question-answering": (
        "Question Answering",
        "AutoModelForQuestionAnswering",
        (
            'qa = pipeline("question-answering", model="{model}")\n'
            'print(qa(question="Who wrote it?", context="The book was written by Ann Lee in 1990."))'
        ),
    ),
    "feature-extraction": (
        "Feature Extraction",
        "AutoModel",
        (
            'extractor = pipeline("feature-extraction", model="{model}")\n'
            'features = extractor("a gripping, beautifully shot film")  # [1, tokens, hidden]\n'
            "# a general-purpose student: fine-tune it, e.g. with the classification recipe"
        ),
    ),
    "text-generation": (
        "Text Generation",
        "AutoModelForCausalLM",
        (
            'generator = pipeline("text-generation", model="{model}")\n'
            'print(generator("The quick brown fox", max_new_tokens=20)[0]["generated_text"])'
        ),
    ),
    "translation": (
        "Translation",
        "AutoModelForSeq2SeqLM",
        (
            'tokenizer = AutoTokenizer.from_pretrained("{model}")\n'
            'model = AutoModelForSeq2SeqLM.from_pretrained("{model}")\n'
            'batch = tokenizer(["ein Hund läuft durch den Schnee ."], return_tensors="pt")\n'
            "print(tokenizer.batch_decode(model.generate(**batch, max_length=64), skip_special_tokens=True))"
        ),
    ),
}

CITATIONS = {
    "hinton2015": "@article{hinton2015distilling,\n  title={Distilling the Knowledge in a Neural Network},\n"
    "  author={Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},\n  journal={arXiv:1503.02531},\n"
    "  year={2015}\n}",
    "tinybert": "@inproceedings{jiao2020tinybert,\n  title={TinyBERT: Distilling BERT for Natural Language Understanding},\n"
    "  author={Jiao, Xiaoqi and Yin, Yichun and Shang, Lifeng and Jiang, Xin and Chen, Xiao and Li, Linlin "
    "and Wang, Fang and Liu, Qun},\n  booktitle={Findings of EMNLP},\n  year={2020}\n}",
    "minilm": "@inproceedings{wang2020minilm,\n  title={MiniLM: Deep Self-Attention Distillation for Task-Agnostic "
    "Compression of Pre-Trained Transformers},\n  author={Wang, Wenhui and Wei, Furu and Dong, Li and Bao, "
    "Hangbo and Yang, Nan and Zhou, Ming},\n  booktitle={NeurIPS},\n  year={2020}\n}",
    "minilmv2": "@inproceedings{wang2021minilmv2,\n  title={MiniLMv2: Multi-Head Self-Attention Relation "
    "Distillation for Compressing Pretrained Transformers},\n  author={Wang, Wenhui and Bao, Hangbo and Huang, "
    "Shaohan and Dong, Li and Wei, Furu},\n  booktitle={Findings of ACL},\n  year={2021}\n}",
    "kim2016": "@inproceedings{kim2016sequence,\n  title={Sequence-Level Knowledge Distillation},\n"
    "  author={Kim, Yoon and Rush, Alexander M.},\n  booktitle={EMNLP},\n  year={2016}\n}",
}

#: Metrics a card reports (``evaluate`` names), in this order.
CARD_METRICS = ("accuracy", "exact_match", "f1", "bleu", "chrf", "perplexity")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of the model as exported (shared tensors counted once; the training-only hidden-state
    projection left out; DeepSpeed ZeRO-3 partitioned parameters counted at full size)."""
    from hf_attn_distill.terms.hidden import PROJECTION_NAME

    unique = {id(p): p for name, p in model.named_parameters() if not name.startswith(PROJECTION_NAME)}
    return sum(getattr(p, "ds_numel", p.numel()) for p in unique.values())


def hub_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it is a Hub model id (not an existing local path), else ``None``."""
    if not name_or_path or Path(name_or_path).exists() or Path(name_or_path).is_absolute():
        return None
    return name_or_path if _HUB_ID.match(name_or_path) and ".." not in name_or_path else None


def public_model_name(name_or_path: str) -> str:
    """What a published card may say about a model: its Hub id, or only the folder name of a local path."""
    return hub_model_id(name_or_path) or Path(str(name_or_path).rstrip("/")).name


@dataclass
class CardInfo:
    """What a distilled student's card says. Metric names are the bare ``evaluate`` names (``accuracy``, ``f1``,
    ``exact_match``, ``bleu``, ``chrf``); ``teacher_metrics`` are the teacher's on the same split in the same run."""

    model_name: str
    task: str
    teacher: str
    dataset: str
    eval_split: str
    method: str
    student_params: int
    teacher_params: int | None
    student_layers: str
    metrics: dict[str, float] = field(default_factory=dict)
    teacher_metrics: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    student_latency_ms: float | None = None
    teacher_latency_ms: float | None = None
    latency_note: str = ""
    dataset_id: str | None = None
    """The Hub id of the training data, when it came from the Hub: only then does the card's ``datasets:``
    metadata name it (a local folder's name is not a Hub id)."""
    distilled: bool = True
    license: str | None = None
    repo_id: str | None = None
    language: list[str] | None = None
    citations: tuple[str, ...] = ("hinton2015", "tinybert", "minilm")

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Unknown card task {self.task!r}; choose from {list(TASKS)}.")
        unknown = set(self.citations) - set(CITATIONS)
        if unknown:
            raise ValueError(f"Unknown citations {sorted(unknown)}; choose from {list(CITATIONS)}.")


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.1f}M"
    return str(value)


def _teacher_row_name(info: CardInfo) -> str:
    """``teacher `name` `` (or ``starting point `name` ``), without repeating a name that is the role itself."""
    role, name = ("teacher" if info.distilled else "starting point"), public_model_name(info.teacher)
    return role if name.lower() == role else f"{role} `{name}`"


def _result_rows(info: CardInfo) -> tuple[list[str], list[dict]]:
    """Metric names, and the teacher (or starting point) and student rows of the results table."""
    names = list(dict.fromkeys([*info.metrics, *info.teacher_metrics]))
    rows = [
        {
            "model": _teacher_row_name(info),
            "params": _fmt(info.teacher_params),
            "values": [_fmt(info.teacher_metrics.get(n, "-")) for n in names],
            "latency": "-" if info.teacher_latency_ms is None else f"{info.teacher_latency_ms:.2f} ms",
        },
        {
            "model": "this student" if info.distilled else "this model",
            "params": _fmt(info.student_params),
            "values": [_fmt(info.metrics.get(n, "-")) for n in names],
            "latency": "-" if info.student_latency_ms is None else f"{info.student_latency_ms:.2f} ms",
        },
    ]
    return names, rows


def summary_table(info: CardInfo) -> str:
    """The card's results as a plain-text table, for the end of a recipe's log."""
    names, rows = _result_rows(info)
    header = ["model", "parameters", *names, "latency (batch 1)"]
    body = [[r["model"].replace("`", ""), r["params"], *r["values"], r["latency"]] for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def build_model_card(info: CardInfo, template: str | Path | None = None) -> ModelCard:
    """The card of ``info``: Hub YAML metadata (license, tags, ``base_model`` when the teacher is a Hub id,
    ``model-index`` with every metric) and the body rendered from the Jinja ``template``."""
    path = Path(template) if template is not None else DEFAULT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(
            f"Model card template {path} not found. The default ships inside the package "
            "(hf_attn_distill/templates/); reinstall the package, or pass template= a file of your own."
        )
    task_name, auto_class, usage = TASKS[info.task]
    eval_results = [
        EvalResult(
            task_type=info.task,
            task_name=task_name,
            dataset_type=info.dataset_id or info.dataset,
            dataset_name=info.dataset,
            dataset_split=info.eval_split,
            metric_type=name,
            metric_name=name,
            metric_value=round(float(v), 4),
        )
        for name, v in info.metrics.items()
    ]
    data = ModelCardData(
        language=info.language,
        license=info.license,
        library_name="transformers",
        pipeline_tag=info.task,
        tags=["hf_attn_distill", "knowledge-distillation", "attention-transfer", info.task],
        base_model=hub_model_id(info.teacher),
        datasets=[info.dataset_id] if info.dataset_id else None,
        metrics=list(info.metrics) or None,
        model_name=info.model_name,
        eval_results=eval_results or None,
    )
    names, rows = _result_rows(info)
    speedup = (
        info.teacher_latency_ms / info.student_latency_ms
        if info.teacher_latency_ms and info.student_latency_ms
        else None
    )
    return ModelCard.from_template(
        data,
        template_path=str(path),
        info=info,
        task_name=task_name,
        auto_class=auto_class,
        usage=usage.format(model=info.repo_id or info.model_name),
        metric_names=names,
        rows=rows,
        teacher_name=public_model_name(info.teacher),
        compression=info.teacher_params / max(info.student_params, 1) if info.teacher_params else None,
        speedup=speedup,
        settings=[(k, _fmt(v)) for k, v in info.settings.items()],
        citations=[CITATIONS[c] for c in info.citations],
    )


def write_model_card(output_dir: str | Path, info: CardInfo, template: str | Path | None = None) -> Path:
    """Render the card of ``info`` and save it as ``README.md`` in ``output_dir``; return its path."""
    path = Path(output_dir) / "README.md"
    build_model_card(info, template).save(path)
    return path


def card_metrics(metrics: dict, prefix: str | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """``(student, teacher)`` card metrics from a metrics dict such as ``trainer.evaluate`` returns: keys
    ``{prefix}_{name}`` and ``teacher_{prefix}_{name}`` for ``name`` in :data:`CARD_METRICS`. Without ``prefix``,
    ``test`` is used when present, else ``eval``."""
    if prefix is None:
        prefix = "test" if any(f"test_{n}" in metrics for n in CARD_METRICS) else "eval"
    student = {n: float(metrics[f"{prefix}_{n}"]) for n in CARD_METRICS if f"{prefix}_{n}" in metrics}
    teacher = {n: float(metrics[f"teacher_{prefix}_{n}"]) for n in CARD_METRICS if f"teacher_{prefix}_{n}" in metrics}
    return student, teacher


def task_of(model: nn.Module) -> str:
    """The card task of a model, from its class (``...ForSequenceClassification`` -> ``text-classification``)."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    if name.endswith("ForQuestionAnswering"):
        return "question-answering"
    if getattr(model.config, "is_encoder_decoder", False):
        return "translation"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if getattr(model, "base_model", None) is model:  # no task head: a general-purpose (task-agnostic) student
        return "feature-extraction"
    raise ValueError(f"No model card task for {name}; pass task= one of {list(TASKS)}.")


def describe_layers(model: nn.Module) -> str:
    """``"3-layer"`` or, for an encoder-decoder, ``"3+3-layer"``: the depth of each self-attention site (a layer
    shared across depth, as in ALBERT, counts once per depth)."""
    from hf_attn_distill.attention.sites import find_attention_sites

    sites = find_attention_sites(model)
    return "+".join(str(len(layers)) for site, layers in sites.items() if site != "cross") + "-layer"


def distillation_method(args, sequence_kd: bool = False) -> str:
    """One phrase naming the objective a :class:`~hf_attn_distill.DistillConfig` sets up: each registered term
    that is on, by its card phrase (:mod:`~hf_attn_distill.terms.registry`), terms of one group in one phrase."""
    parts = ["sequence-level KD"] if sequence_kd else []
    if getattr(args, "lmbda", 0) > 0:
        parts.append(f"on-policy distillation (lmbda={args.lmbda})")
    groups: dict[str, list[str]] = {}
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    for spec in term_specs():
        if not spec.card or not spec.is_on(args):
            continue
        if spec.card_group is None:
            parts.append(spec.card.format(**fields))
            continue
        if spec.card_group not in groups:  # the group's phrase stands where its first member is
            groups[spec.card_group] = []
            parts.append(spec.card_group)
        groups[spec.card_group].append(spec.card)
    phrases = [
        CARD_GROUPS[part].format(**fields, members=", ".join(groups[part])) if part in groups else part
        for part in parts
    ]
    return " + ".join(phrases) or "hard labels only"


#: Card settings of the training budget, after the terms' own.
BUDGET_SETTINGS = (
    "schedules",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
)


def distillation_settings(args) -> dict:
    """The settings table of a card: the temperature, each registered term's weight and settings where the term
    says they are shown (:meth:`~hf_attn_distill.terms.registry.TermSpec.is_shown`), then the training budget."""
    keys = ["temperature"]
    for spec in term_specs():
        if spec.is_shown(args):
            keys += [k for k in (spec.weight_field, *spec.settings) if k not in keys]
    keys += BUDGET_SETTINGS
    settings = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    if settings.get("max_steps", -1) > 0:
        settings.pop("num_train_epochs", None)
    return {k: (str(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in settings.items() if v is not None}


def trainer_card_info(trainer, **fields) -> CardInfo:
    """What a :class:`~hf_attn_distill.DistillTrainer`'s card says: the student, teacher and objective it holds,
    the last evaluation's metrics, and ``fields`` overriding any :class:`CardInfo` field."""
    student = trainer.accelerator.unwrap_model(trainer.model)
    evals = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
    metrics, _ = card_metrics(evals[-1] if evals else {}, "eval")
    teacher = trainer.teacher_model
    if teacher is None:  # its outputs came from a cache: named and counted as the cache records it
        from hf_attn_distill.training.teacher_cache import complete_cache_meta

        recorded = complete_cache_meta(trainer.args.teacher_logits_cache) or {}
        teacher_name, teacher_params = recorded.get("teacher") or "cached teacher", recorded.get("teacher_params")
    else:
        teacher_name = getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__
        teacher_params = count_parameters(teacher)
    args = trainer.args
    defaults = {
        "model_name": args.hub_model_id or Path(args.output_dir).name,
        "task": task_of(student),
        "repo_id": getattr(trainer, "hub_model_id", None) or args.hub_model_id,
        "teacher": teacher_name,
        "dataset": "custom",
        "eval_split": "evaluation set",
        "method": distillation_method(args),
        "student_params": count_parameters(student),
        "teacher_params": teacher_params,
        "student_layers": describe_layers(student),
        "metrics": metrics,
        "settings": distillation_settings(args),
    }
    info = CardInfo(**{**defaults, **fields})
    if getattr(trainer, "vocab_rows_note", None):  # a padded vocabulary: which rows logit KD compared
        info.settings = {**info.settings, "logit_kd_vocab_rows": trainer.vocab_rows_note}
    return info


def write_trainer_card(trainer, given: dict, card_fields: dict, generic_card) -> CardInfo | None:
    """The card of a :class:`~hf_attn_distill.DistillTrainer` (:func:`trainer_card_info`) written to its
    ``output_dir``; ``given`` holds ``Trainer.create_model_card``'s arguments (``language``, ``license``,
    ``model_name``, ``finetuned_from``, ``tasks``, ``dataset_tags``, ``dataset``), ``card_fields`` any
    :class:`CardInfo` field. For a task this card does not describe, ``generic_card()`` (transformers' card) is
    called instead and ``None`` returned."""

    def first(value):
        return value[0] if isinstance(value, list) else value

    language = given.get("language")
    fields = {
        "language": [language] if isinstance(language, str) else language,
        "license": given.get("license"),
        "model_name": given.get("model_name"),
        "teacher": given.get("finetuned_from"),
        "task": first(given.get("tasks")),
        "dataset": first(given.get("dataset")) or first(given.get("dataset_tags")),
        "dataset_id": first(given.get("dataset_tags")),  # Hub dataset tags, as transformers' card reads them
    }
    try:
        info = trainer_card_info(trainer, **{k: v for k, v in fields.items() if v}, **card_fields)
    except ValueError as err:
        logging.getLogger(__name__).warning("Writing transformers' generic model card: %s", err)
        generic_card()
        return None
    write_model_card(trainer.args.output_dir, info)
    return info


class ModelCardMixin:
    """``Trainer.create_model_card`` of :class:`~hf_attn_distill.DistillTrainer`: the distillation card."""

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
        **card_fields,
    ) -> CardInfo | None:
        """Write the distillation card (:func:`~hf_attn_distill.hub.model_card.write_trainer_card`) as ``README.md`` in
        ``output_dir``. Takes ``Trainer.create_model_card``'s arguments, so ``push_to_hub`` writes it too;
        ``card_fields`` set :class:`~hf_attn_distill.hub.model_card.CardInfo` fields. Returns what the card says
        (``None`` off the main process, or where transformers' generic card was written instead)."""
        if not self.is_world_process_zero():
            return None
        given = dict(
            language=language,
            license=license,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
        )

        def generic_card():  # a task our card does not describe
            super(ModelCardMixin, self).create_model_card(
                language, license, tags, model_name, finetuned_from, tasks, dataset_tags, dataset, dataset_args
            )

        return write_trainer_card(self, given, card_fields, generic_card)
