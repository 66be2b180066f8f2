"""Device and dtype choice per part, int8 language-model weights, and meta-device loading of sharded checkpoints."""

import logging
from pathlib import Path

import pytest
import torch
from support import make_image
from torch import nn

from benchmarks.random_checkpoint import is_complete, part_counts, write_random_checkpoint
from nextchat import devices, load_model, save_pretrained
from nextchat.devices import cpu_flags, cpu_has_bf16, plan_precision, resolve_device, resolve_dtype, slow_device_warning
from nextchat.pipeline import NextChatPipeline
from nextchat.quantization import INT8_KERNEL_MAX_ROWS, Int8Linear, QuantizationError, estimate_memory


CPU = torch.device("cpu")
SEVEN_B_LLM = 6_738_415_616


def test_auto_on_a_cpu_never_gives_a_7b_sized_llm_float32() -> None:
    without = plan_precision("auto", CPU, SEVEN_B_LLM, bf16_hardware=False)
    assert without.llm == torch.bfloat16
    assert (without.vision, without.heads, without.sam) == (torch.float32,) * 3
    with_bf16 = plan_precision("auto", CPU, SEVEN_B_LLM, bf16_hardware=True)
    assert {with_bf16.llm, with_bf16.vision, with_bf16.heads, with_bf16.sam} == {torch.bfloat16}
    small = plan_precision("auto", CPU, 20_000_000, bf16_hardware=False)
    assert {small.llm, small.vision, small.heads, small.sam} == {torch.float32}
    explicit = plan_precision("float32", CPU, SEVEN_B_LLM, bf16_hardware=False)
    assert explicit.llm == torch.float32  # asked for by name: honoured


def test_loading_a_7b_sized_llm_on_a_cpu_warns(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nextchat.loading"):
        load_model(tiny_checkpoint, device="cpu")
    assert not caplog.records  # a small model on a CPU is fine
    monkeypatch.setattr(devices, "LARGE_LLM_PARAMETERS", 1000)  # the tiny LLM counts as large
    with caplog.at_level(logging.WARNING, logger="nextchat.loading"):
        load_model(tiny_checkpoint, device="cpu")
    (record,) = caplog.records
    assert "on the CPU" in record.getMessage() and "CUDA GPU or Apple silicon" in record.getMessage()
    assert slow_device_warning(torch.device("cuda"), SEVEN_B_LLM) is None
    assert slow_device_warning(CPU, SEVEN_B_LLM) is not None


def test_bf16_hardware_is_read_from_cpuinfo_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_has_bf16(cpu_flags(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not cpu_has_bf16(cpu_flags(cpuinfo))
    assert not cpu_has_bf16(cpu_flags(tmp_path / "missing"))  # no /proc (macOS): no claim of bf16 hardware


def test_auto_device_picks_mps_after_cuda_and_mps_runs_float16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
    mps = plan_precision("auto", torch.device("mps"), SEVEN_B_LLM)
    assert {mps.llm, mps.vision, mps.heads, mps.sam} == {torch.float16}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == CPU


def test_nf4_on_a_cpu_is_refused_in_one_sentence(tiny_checkpoint: Path) -> None:
    with pytest.raises(QuantizationError) as error:
        load_model(tiny_checkpoint, device="cpu", quantize="nf4")
    message = str(error.value)
    assert "nf4 needs a CUDA GPU" in message
    assert "\n" not in message and message.count(". ") == 0
    with pytest.raises(QuantizationError, match="use none, int8 or nf4"):
        load_model(tiny_checkpoint, device="cpu", quantize="int4")


@pytest.mark.parametrize("rows", [1, INT8_KERNEL_MAX_ROWS + 5])
def test_int8_linear_matches_the_float_layer_within_rounding(rows: int) -> None:
    """Both paths: torch's int8 kernel (decode rows) and the widened weight (prompt rows)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator) * 0.02
    x = torch.randn(rows, 64, generator=generator)
    layer = Int8Linear.from_weight(weight, torch.float32)
    assert layer.qweight.dtype == torch.int8
    expected = x @ weight.T
    error = (layer(x) - expected).norm() / expected.norm()
    assert error < 0.01


def test_int8_load_quantizes_only_the_llm_layer_linears(tiny_checkpoint: Path) -> None:
    model, _, report = load_model(tiny_checkpoint, device="cpu", dtype="float32", quantize="int8")
    assert report.ok
    layers = model.config.text["num_hidden_layers"]
    int8 = [name for name, module in model.named_modules() if isinstance(module, Int8Linear)]
    assert len(int8) == 7 * layers
    assert all(name.startswith("model.layers.") for name in int8)
    assert type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, Int8Linear) for m in (*model.model.mm_projector.modules(), *model.sam.modules()))

    float_model, _, _ = load_model(tiny_checkpoint, device="cpu", dtype="float32")
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        quantized = model.lm_head(model.model(input_ids=ids).last_hidden_state)
        reference = float_model.lm_head(float_model.model(input_ids=ids).last_hidden_state)
    assert (quantized - reference).norm() / reference.norm() < 0.05
    pipeline = NextChatPipeline(model, NextChatPipeline.from_pretrained(tiny_checkpoint, device="cpu").tokenizer)
    image = make_image(64, 48)
    (mask,) = pipeline.segment(image, [pipeline.locate(image, "the red thing")])
    assert mask.mask.shape == (48, 64)


def test_meta_build_recomputes_the_buffers_no_checkpoint_holds(tiny_parts, tmp_path: Path) -> None:
    """Rotary inv_freq, CLIP's position ids and friends come out exactly as a normal build makes them (and SAM's
    Gaussian PE matrix, a persistent buffer, comes from the checkpoint)."""
    original, tokenizer = tiny_parts
    save_pretrained(original, tokenizer, tmp_path)
    loaded, _, _ = load_model(tmp_path, device="cpu", dtype="float32")
    expected = dict(original.named_buffers())
    buffers = dict(loaded.named_buffers())
    assert buffers.keys() == expected.keys()
    for name, value in buffers.items():
        assert value.device.type == "cpu", name
        assert torch.equal(value, expected[name]), name
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert loaded.sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32


def test_a_random_sharded_checkpoint_loads_strictly_in_16_bit(tiny_parts, tmp_path: Path) -> None:
    model, tokenizer = tiny_parts
    counts = write_random_checkpoint(model.config, tokenizer, tmp_path, shards=3)
    assert is_complete(tmp_path, model.config.name)
    assert len(list(tmp_path.glob("pytorch_model-0000?-of-00003.bin"))) == 3
    assert sum(counts.values()) == sum(v.numel() for v in model.state_dict().values())
    loaded, _, report = load_model(tmp_path, device="cpu", dtype="bfloat16")
    assert report.ok and report.missing == [] and report.unexpected == []
    assert loaded.dtype == torch.bfloat16
    assert part_counts({k: v.shape for k, v in loaded.state_dict().items()}) == counts


def test_int8_memory_is_about_half_of_16_bit_for_the_llm(tiny_parts) -> None:
    model, _ = tiny_parts
    none, int8 = estimate_memory(model, "none"), estimate_memory(model, "int8")
    assert int8.quantized_parameters > 0 and none.quantized_parameters == 0
    assert int8.llm_bytes == none.llm_bytes - int8.quantized_parameters
    assert int8.rest_parameters == none.rest_parameters
