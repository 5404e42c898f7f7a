import pytest
from transformers import HfArgumentParser

from hf_attn_distill import DistillConfig, parse_layer_map, resolve_layer_map


def test_uniform_is_tinybert_mapping():
    assert resolve_layer_map("uniform", 4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert resolve_layer_map("uniform", 3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert resolve_layer_map("uniform", 6, 6) == [(i, i) for i in range(6)]
    # non-divisible: rounded, and the last student layer still meets the last teacher layer
    assert resolve_layer_map("uniform", 4, 6)[-1] == (3, 5)


def test_last_and_explicit():
    assert resolve_layer_map("last", 3, 12) == [(2, 11)]
    assert resolve_layer_map("0:1, 2:5", 3, 6) == [(0, 1), (2, 5)]
    assert resolve_layer_map("[[0, 0], [1, 4]]", 2, 6) == [(0, 0), (1, 4)]
    assert resolve_layer_map([(0, 3)], 2, 6) == [(0, 3)]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("0:6", "out of range"),
        ("3:1", "out of range"),
        ("-1:2", "out of range"),
        ("0:1,0:2", "twice"),
        ("0-1", "Cannot parse"),
        ([(0, 1, 2)], "pair"),
        ([], "empty"),
    ],
)
def test_bad_layer_maps(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_layer_map(spec, 3, 6)


def test_uniform_student_deeper_than_teacher():
    with pytest.raises(ValueError, match="explicit pairs"):
        resolve_layer_map("uniform", 8, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0), "temperature"),
        (dict(alpha_kd=-1), "alpha_kd"),
        (dict(alpha_ce=0, alpha_kd=0, attention_weight=0), "nothing to train"),
        (dict(attention_loss="cosine"), "attention_loss"),
        (dict(attention_loss="mse"), "mse_scores"),
        (dict(teacher_model_init_kwargs="{not json"), "JSON"),
        (dict(head_grouping="max"), "head_grouping"),
        (dict(teacher_dtype="int8"), "teacher_dtype"),
        (dict(layer_map="0:1,0:2"), "twice"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_config_from_command_line(tmp_path):
    (args,) = HfArgumentParser(DistillConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--temperature",
            "4",
            "--attention_loss",
            "mse_scores",
            "--layer_map",
            "0:1,1:3",
            "--report_to",
            "none",
            "--teacher_model_init_kwargs",
            '{"dtype": "float32"}',
            "--eval_with_teacher",
            "false",
        ]
    )
    assert args.temperature == 4.0 and args.attention_loss == "mse_scores"
    assert args.layer_map == [[0, 1], [1, 3]]
    assert args.teacher_model_init_kwargs == {"dtype": "float32"} and args.eval_with_teacher is False
    assert "layer_map" in args.to_json_string()


def test_parse_layer_map_names():
    assert parse_layer_map("uniform") == "uniform"
    assert parse_layer_map(" last ") == "last"
