"""Quantization pipeline: config validation and bad input rejected before any work (no venv, no vLLM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tokenfleet.cli import main
from tokenfleet.engine.launch import engine_command
from tokenfleet.engine.quantize import checks
from tokenfleet.engine.quantize.config import PipelineConfigError, load_config, parse_config
from tokenfleet.engine.quantize.pipeline import PipelineError, prepare
from tokenfleet.engine.quantize.techniques import TECHNIQUES, lookup
from tokenfleet.models import resolve_model
from tokenfleet.spec import SpecError, parse_service

EXAMPLE = Path(__file__).parent.parent / "examples" / "quantize" / "pipeline.yaml"
# The default model's config (tokenfleet/builtin_model/tiny_code.py FULL): the sizes the CPU kernels see.
TINY_CODE = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
NO_AMX = frozenset({"avx2", "avx512f", "avx512_vnni"})
AMX = NO_AMX | {"amx_tile", "amx_bf16", "amx_int8"}


def errors_of(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(PipelineConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_example_config_is_valid_and_runs_every_cpu_technique() -> None:
    config = load_config(EXAMPLE)
    assert config.model == "builtin://tiny-code"
    assert config.technique_names() == [
        "rtn-w4a16",
        "rtn-w8a8",
        "gptq-w4a16",
        "awq-w4a16",
        "smoothquant-gptq-w8a8",
    ]
    assert config.constraint.max_recovery_loss == 0.05


def test_techniques_by_name_or_method_and_scheme() -> None:
    config = parse_config({"techniques": ["rtn-w8a8", {"method": "gptq", "scheme": "w4a16"}]})
    assert config.techniques == ["rtn-w8a8", "gptq-w4a16"]


def test_empty_technique_list_means_everything_the_device_runs() -> None:
    assert "rtn-fp8" not in parse_config({}).technique_names()
    assert "rtn-fp8" in parse_config({"device": "gpu"}).technique_names()


@pytest.mark.parametrize(
    ("data", "field", "word"),
    [
        ({"techniques": ["gptq-w3a16"]}, "techniques", "unknown technique 'gptq-w3a16'"),
        ({"techniques": [{"method": "gptq", "scheme": "W2A2"}]}, "techniques", "unknown quantization scheme"),
        ({"techniques": [{"method": "hqq", "scheme": "W4A16"}]}, "techniques", "unknown quantization method"),
        ({"techniques": [{"method": "awq", "scheme": "W8A8"}]}, "techniques", "not offered with scheme W8A8"),
        ({"techniques": ["rtn-w8a8", "rtn-w8a8"]}, "techniques", "listed twice"),
        ({"groupSize": 33}, "groupSize", "even"),
        ({"model": "hf://meta-llama/Llama-3.1-8B"}, "model", "no model hub"),
        ({"evaluation": {"seqLen": 512, "maxModelLen": 512}}, "evaluation", "exceeds maxModelLen"),
        ({"calibration": {"samples": 0}}, "calibration.samples", "greater than or equal to 1"),
        ({"constraint": {"maxRecoveryLoss": 2}}, "constraint.maxRecoveryLoss", "less than or equal"),
        ({"techinques": []}, "techinques", "Extra inputs"),
    ],
)
def test_bad_config_names_the_field_and_the_reason(data: dict[str, Any], field: str, word: str) -> None:
    errors = errors_of(data)
    assert any(path == field and word in reason for path, reason in errors), errors


def test_cli_rejects_a_bad_config_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("techniques: [magic-w4a16]\n")
    assert main(["quantize", "-c", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "techniques: unknown technique 'magic-w4a16'" in err
    assert "rtn-w4a16" in err  # the valid names are listed


# --- what the device's kernels can run ----------------------------------------------------------


def test_amx_is_read_from_cpuinfo_flags() -> None:
    cpuinfo = "processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\n"
    assert checks.has_amx(checks.cpu_flags(cpuinfo))
    assert not checks.has_amx(checks.cpu_flags("flags\t: fpu avx2 avx512f\n"))
    assert checks.cpu_flags("no flags line") == frozenset()


def test_default_model_layers_fit_the_cpu_4bit_kernel_with_group_64() -> None:
    shapes = checks.linear_shapes(TINY_CODE)
    # 704 = 22 x 32 (CPUWNA16's multiple) but not a multiple of 128: the auto group size is 64.
    assert all(s.in_features % 32 == 0 and s.out_features % 32 == 0 for s in shapes)
    assert checks.auto_group_size(shapes) == 64
    for name in ("rtn-w4a16", "gptq-w4a16", "awq-w4a16", "rtn-w8a8", "smoothquant-gptq-w8a8"):
        assert checks.technique_problems(lookup(name), "cpu", shapes, group_size=64) == []


def test_w4a16_on_cpu_needs_layer_sizes_that_are_multiples_of_32() -> None:
    odd = {**TINY_CODE, "intermediate_size": 700}
    shapes = checks.linear_shapes(odd)
    problems = checks.technique_problems(lookup("gptq-w4a16"), "cpu", shapes, group_size=-1)
    assert any("mlp.down_proj: input size 700 is not a multiple of 32" in p for p in problems)
    assert any("mlp.gate_proj: output size 700" in p for p in problems)
    # INT8 W8A8 runs on oneDNN whatever the sizes; a GPU has no such limit for W4A16.
    assert checks.technique_problems(lookup("rtn-w8a8"), "cpu", shapes, group_size=-1) == []
    assert checks.technique_problems(lookup("gptq-w4a16"), "gpu", shapes, group_size=-1) == []


def test_group_size_must_divide_every_input() -> None:
    shapes = checks.linear_shapes(TINY_CODE)
    problems = checks.technique_problems(lookup("rtn-w4a16"), "cpu", shapes, group_size=128)
    assert problems == ["mlp.down_proj: input size 704 is not a multiple of group size 128"]
    # W8A16 (GPU) is grouped too; W8A8 is per channel.
    w8a16 = checks.technique_problems(lookup("gptq-w8a16"), "gpu", shapes, group_size=128)
    assert w8a16 == ["mlp.down_proj: input size 704 is not a multiple of group size 128"]
    assert checks.technique_problems(lookup("rtn-w8a8"), "cpu", shapes, group_size=128) == []


def test_fp8_on_cpu_needs_amx_and_w8a16_needs_a_gpu() -> None:
    shapes = checks.linear_shapes(TINY_CODE)
    fp8 = checks.technique_problems(lookup("rtn-fp8"), "cpu", shapes, group_size=64, cpu_flag_set=NO_AMX)
    assert fp8
    assert "AMX" in fp8[0]
    assert checks.technique_problems(lookup("rtn-fp8"), "cpu", shapes, group_size=64, cpu_flag_set=AMX) == []
    w8a16 = checks.technique_problems(lookup("gptq-w8a16"), "cpu", shapes, group_size=64, cpu_flag_set=AMX)
    assert w8a16
    assert "no W8A16 kernel" in w8a16[0]
    assert checks.technique_problems(lookup("gptq-w8a16"), "gpu", shapes, group_size=64) == []


def test_unknown_architecture_is_rejected() -> None:
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        checks.linear_shapes({**TINY_CODE, "architectures": ["GPT2LMHeadModel"]})


def _model_dir(tmp_path: Path, config: dict[str, Any]) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_prepare_rejects_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFLEET_CACHE", str(tmp_path / "cache"))
    model = _model_dir(tmp_path, {**TINY_CODE, "hidden_size": 250, "head_dim": 50})
    out = tmp_path / "out"
    config = parse_config(
        {"model": str(model), "outputDir": str(out), "techniques": ["rtn-w4a16", "rtn-fp8", "rtn-w8a8"]}
    )
    with pytest.raises(PipelineError) as info:
        prepare(config, cpu_flag_set=NO_AMX)
    text = str(info.value)
    assert "rtn-w4a16 on cpu: self_attn.q_proj: input size 250 is not a multiple of 32" in text
    assert "rtn-fp8 on cpu: FP8 on CPU needs AMX" in text
    assert "rtn-w8a8" not in text
    # Nothing was created: no output folder, no virtual environment.
    assert not out.exists()
    assert not (tmp_path / "cache" / "venvs").exists()


def test_prepare_accepts_a_local_qwen_checkpoint(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {**TINY_CODE, "architectures": ["Qwen2ForCausalLM"]})
    prep = prepare(
        parse_config({"model": str(model), "outputDir": str(tmp_path / "out")}), cpu_flag_set=NO_AMX
    )
    assert prep.group_size == 64
    assert [t.name for t in prep.techniques] == list(parse_config({}).technique_names())


def test_prepare_rejects_an_already_quantized_model(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {**TINY_CODE, "quantization_config": {"quant_method": "compressed-tensors"}})
    with pytest.raises(PipelineError, match="already quantized"):
        prepare(parse_config({"model": str(model)}), cpu_flag_set=NO_AMX)


# --- serving by spec ----------------------------------------------------------------------------


def _service(quantization: str) -> Any:
    return parse_service(
        {
            "apiVersion": "tokenfleet.dev/v1alpha1",
            "kind": "LLMService",
            "metadata": {"name": "q"},
            "spec": {"model": {"source": "builtin://tiny-random", "quantization": quantization}},
        }
    )


@pytest.mark.parametrize("value", ["none", *TECHNIQUES, "/models/llama-w4a16", "./ckpt"])
def test_spec_accepts_techniques_and_paths(value: str) -> None:
    assert _service(value).spec.model.quantization == value


@pytest.mark.parametrize(
    ("value", "word"), [("w4a16", "a scheme, not a technique"), ("int3", "unknown technique 'int3'")]
)
def test_spec_rejects_other_values_with_the_field(value: str, word: str) -> None:
    with pytest.raises(SpecError) as info:
        _service(value)
    [(field, reason)] = info.value.errors
    assert field == "spec.model.quantization"
    assert word in reason


def test_resolve_model_serves_the_pipeline_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENFLEET_CACHE", str(tmp_path))
    model = _service("rtn-w8a8").spec.model
    with pytest.raises(FileNotFoundError, match="run `tokenfleet quantize`"):
        resolve_model(model)
    checkpoint = tmp_path / "quantized" / "tiny-random" / "rtn-w8a8"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        resolve_model(model)
    (checkpoint / "config.json").write_text(json.dumps({"quantization_config": {}}))
    assert resolve_model(model) == str(checkpoint)
    assert resolve_model(_service(str(checkpoint)).spec.model) == str(checkpoint)


def test_engine_command_names_the_quantization_method() -> None:
    argv = engine_command(_service("gptq-w4a16").spec, "/ckpt", port=8000).argv
    assert argv[argv.index("--quantization") + 1] == "compressed-tensors"
    assert "--quantization" not in engine_command(_service("none").spec, "/m", port=8000).argv


def test_quant_env_pins_the_cpu_torch_and_is_keyed_by_its_requirements(tmp_path: Path) -> None:
    from tokenfleet.engine.quantize.venv import DEFAULT_REQUIREMENTS, quant_env

    # Unpinned, llm-compressor 0.14's torch<=2.14.0 resolves to a CUDA build with nvidia wheels.
    assert "torch==2.13.0" in DEFAULT_REQUIREMENTS
    a = quant_env(DEFAULT_REQUIREMENTS, root=tmp_path)
    assert a.path == quant_env(list(reversed(DEFAULT_REQUIREMENTS)), root=tmp_path).path
    assert a.path != quant_env([*DEFAULT_REQUIREMENTS, "numpy<3"], root=tmp_path).path
    assert not a.is_ready()


def test_dry_run_shows_the_plan_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TOKENFLEET_CACHE", str(tmp_path / "cache"))
    model = _model_dir(tmp_path, TINY_CODE)
    out = tmp_path / "out"
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"model: {model}\noutputDir: {out}\ntechniques: [rtn-w8a8, gptq-w4a16]\n")
    assert main(["quantize", "-c", str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert [line.split() for line in lines if line] == [
        ["run", "quant-env"],
        ["run", "data"],
        ["run", "quantize:rtn-w8a8"],
        ["run", "quantize:gptq-w4a16"],
        ["run", "eval:baseline"],
        ["run", "eval:rtn-w8a8"],
        ["run", "eval:gptq-w4a16"],
    ]
    assert not out.exists()
    assert not (tmp_path / "cache" / "venvs").exists()


def test_example_service_names_a_technique_the_example_pipeline_makes() -> None:
    from tokenfleet.spec import load_service

    service = load_service(EXAMPLE.parent / "service.yaml")
    assert service.spec.model.quantization in load_config(EXAMPLE).technique_names()
    assert service.spec.model.source == load_config(EXAMPLE).model
