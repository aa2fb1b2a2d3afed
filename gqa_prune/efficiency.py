"""Efficiency figures of a loaded model on the run's device: size, KV cache, memory, latency, throughput.

On CPU, latency is measured at batch 1 with a dynamic KV cache: prefill = one forward over the prompt;
decode = greedy steps of one token each, reusing the cache; each repeated after warm-up runs, median kept.
On CUDA, eager decode at batch 1 is bound by kernel launches, not by the weights pruning removes, so decode
runs through transformers' compiled static-cache generation (CUDA graphs) at batch 1 and 16, and each figure
stands beside its memory-bound ideal: the bytes a decode step must read (weights and KV cache) over the
device's measured copy bandwidth.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .arch import adapter_for, geometry_of
from .moe import attention_shape, moe_family_for


@dataclass(frozen=True)
class LatencySettings:
    prompt_tokens: int = 256
    decode_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    batch_sizes: tuple[int, ...] = (1, 16)  # CUDA: compiled static-cache decode at each of these


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Logical parameter counts, the same for a float and a quantized copy of a model.

    Decoder projections count in x out (+ bias) whatever their storage (a packed GPTQ layer keeps its
    weights in buffers); every other parameter counts once (tied embeddings once). Non-embedding excludes
    the input embedding and an untied output head.
    """
    if moe_family_for(model.config) is None:  # removed sublayers have no projections
        adapter = adapter_for(model.config)
        projections = {
            id(projection): projection
            for layer in adapter.decoder_layers(model)
            for _, projection in adapter.projections(layer)
        }
    else:  # fused experts are parameters; GPTQ-packed layers (experts de-fused by GPTQModel) keep them in buffers
        projections = {id(module): module for module in model.modules() if hasattr(module, "qweight")}
    total = 0
    for projection in projections.values():
        bias = getattr(projection, "bias", None)
        total += projection.in_features * projection.out_features + (bias.numel() if bias is not None else 0)
    for name, parameter in model.named_parameters():
        if id(model.get_submodule(name.rpartition(".")[0])) not in projections:
            total += parameter.numel()
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    head = 0 if output is None or output.weight.data_ptr() == embedding.data_ptr() else output.weight.numel()
    return {"parameters": int(total), "non_embedding_parameters": int(total - embedding.numel() - head)}


def kv_cache_bytes_per_token(model: nn.Module) -> int:
    """Bytes the KV cache grows by per token: every layer with attention stores a key and a value per KV head
    (a mixture of experts' state-space layers keep a fixed-size state instead)."""
    element = torch.empty((), dtype=compute_dtype(model)).element_size()
    family = moe_family_for(model.config)
    if family is not None:  # read from the attention alone: a quantized MoE's experts are no longer fused
        shape = attention_shape(family.decoder_layers(model))
        return int(sum(2 * groups * shape.get("head_dim", 0) * element for groups in shape["kv_groups"]))
    geometry = geometry_of(model)
    return int(sum(2 * groups * geometry.head_dim * element for groups in geometry.kv_groups))


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations (and the KV cache) take: that of the input embedding."""
    return model.get_input_embeddings().weight.dtype


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency(model: nn.Module, settings: LatencySettings) -> dict[str, float]:
    """Median prefill time (ms) and decode throughput (tokens/s) at batch 1."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(settings.seed)
    prompt = torch.randint(0, vocab, (1, settings.prompt_tokens), generator=generator).to(device)
    prefill_seconds, decode_rates = [], []
    for run in range(settings.warmup + settings.repeats):
        _synchronize(device)
        start = time.perf_counter()
        output = model(input_ids=prompt, use_cache=True)
        _synchronize(device)
        prefill = time.perf_counter() - start
        cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(settings.decode_tokens):
            output = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        _synchronize(device)
        decode = time.perf_counter() - start
        if run >= settings.warmup:
            prefill_seconds.append(prefill)
            decode_rates.append(settings.decode_tokens / decode)
    return {
        "prefill_ms": 1000 * statistics.median(prefill_seconds),
        "decode_tokens_per_s": statistics.median(decode_rates),
    }


def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 5) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (a read and a write per byte copied), best of repeats."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best


def decode_bytes_per_step(model: nn.Module, batch: int, context: int) -> int:
    """Bytes one decode step reads at least: every weight once (an embedding row per sequence, not the table,
    unless the head shares it) and the KV cache of every sequence."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    weights = 0
    for parameter in model.parameters():
        if parameter is embedding and not tied:
            weights += batch * embedding.shape[1] * embedding.element_size()
        else:
            weights += parameter.numel() * parameter.element_size()
    return weights + batch * context * kv_cache_bytes_per_token(model)


@torch.no_grad()
def compiled_decode(model: nn.Module, settings: LatencySettings) -> dict[str, float]:
    """CUDA: decode tokens/s at each batch size through compiled static-cache generation, with its ideal."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    bandwidth = copy_bandwidth(device)
    figures: dict[str, float] = {"copy_bandwidth_gb_s": bandwidth / 1e9}
    generator = torch.Generator().manual_seed(settings.seed)
    for batch in settings.batch_sizes:
        prompt = torch.randint(0, vocab, (batch, settings.prompt_tokens), generator=generator).to(device)

        def generate(new_tokens: int) -> float:
            _synchronize(device)
            start = time.perf_counter()
            model.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                cache_implementation="static", pad_token_id=0,
            )  # fmt: skip
            _synchronize(device)
            return time.perf_counter() - start

        for _ in range(max(settings.warmup, 2)):  # compile and capture the graphs for this shape
            generate(settings.decode_tokens)
        one = statistics.median(generate(1) for _ in range(settings.repeats))
        full = statistics.median(generate(settings.decode_tokens) for _ in range(settings.repeats))
        rate = batch * (settings.decode_tokens - 1) / max(full - one, 1e-9)
        context = settings.prompt_tokens + settings.decode_tokens // 2
        ideal = batch * bandwidth / decode_bytes_per_step(model, batch, context)
        figures[f"decode_tokens_per_s_b{batch}"] = rate
        figures[f"decode_ideal_tokens_per_s_b{batch}"] = ideal
        figures[f"decode_fraction_of_ideal_b{batch}"] = rate / ideal
    return figures


def measure(model: nn.Module, settings: LatencySettings, rss_before_load_mb: float) -> dict:
    """Every efficiency figure for a model already loaded on its device."""
    device = next(model.parameters()).device
    figures = {
        **parameter_counts(model),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
        "compute_dtype": str(compute_dtype(model)).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
        **latency(model, settings),
        "latency_settings": asdict(settings),
    }
    if device.type == "cuda":
        figures.update(compiled_decode(model, settings))
        figures["device_name"] = torch.cuda.get_device_name(device)
    if device.type == "cuda":
        figures["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        figures["peak_memory_kind"] = "cuda max_memory_allocated (load + latency runs)"
    else:
        figures["peak_memory_mb"] = peak_rss_mb() - rss_before_load_mb
        figures["peak_memory_kind"] = "peak RSS growth of the process (load + latency runs)"
    return figures
