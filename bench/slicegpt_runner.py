"""Runs SliceGPT from its own checkout, inside its own virtual environment (transformers 4.41 as it pins).

Not run directly: ``bench/slicegpt_peer.py`` calls it with that environment's Python, so that nothing of
SliceGPT (microsoft/TransformerCompression) is copied into this repository or imported beside transformers 5.
Reads ``--inputs`` (safetensors: ``calib`` [blocks, 2048] token ids, ``wikitext`` 1-D token ids), slices the
model folder to every embedding dimension in ``--dims`` with SliceGPT's own API (``layernorm_fusion``,
``rotate.rotate_and_slice``, ``ConstSlicingScheduler``; PCA orientation; float32 on the CPU) and writes, per
dimension, WikiText-2 perplexity (gqa-prune's windows: non-overlapping, each scored alone) and parameter counts
as JSON to ``--out``.

Adaptations, each needed to run it at all on SmolLM2-135M:
* the adapter is picked by name: ``meta-llama/Meta-Llama-3-8B`` (a Llama with GQA, as SmolLM2 is), weights
  and config from the local folder;
* the folder's config is written by transformers 5 (``rope_parameters``): a copy with ``rope_theta`` as
  transformers 4.41 reads it is used; the model is loaded with ``ModelAdapter.from_model`` (what
  ``hf_utils.get_model_and_tokenizer`` calls) without the tokenizer, whose transformers-5 file the old
  ``tokenizers`` cannot read and which the token ids given here make unnecessary;
* SmolLM2 ties its input and output embeddings; SliceGPT rotates them with different matrices (the first
  and the last layer's), so ``lm_head`` is untied (a copy) before fusion: the sliced model has two embedding
  matrices of ``vocab x d'``, which its parameter count shows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def staged_copy(model_dir: Path, into: Path) -> Path:
    """The model's weights with a config transformers 4.41 reads (rope_theta instead of rope_parameters)."""
    for source in model_dir.glob("*.safetensors*"):
        (into / source.name).symlink_to(source.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    (into / "config.json").write_text(json.dumps(config, indent=1))
    return into


def perplexity(model: torch.nn.Module, token_ids: torch.Tensor, window: int, max_tokens: int) -> float:
    """exp(mean NLL) over non-overlapping windows, each scored alone (as ``gqa_prune.perplexity``)."""
    usable = min(int(token_ids.numel()), max_tokens) // window * window
    total, scored = 0.0, 0
    with torch.no_grad():
        for ids in token_ids[:usable].view(-1, window):
            logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
            total += torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
            scored += window - 1
    return math.exp(total / scored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, required=True, help="microsoft/TransformerCompression checkout")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--dims", required=True, help="embedding dimensions to slice to, comma-separated")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration blocks per PCA batch")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout / "src"))
    from slicegpt import layernorm_fusion, rotate
    from slicegpt.config import config
    from slicegpt.model_adapter import ModelAdapter
    from slicegpt.slicing_scheduler import ConstSlicingScheduler

    config.device, config.dtype = torch.device("cpu"), torch.float32
    torch.manual_seed(0)
    tensors = load_file(str(args.inputs))
    calib, wikitext = tensors["calib"], tensors["wikitext"]
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in calib.split(args.batch_size)]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = staged_copy(args.model, Path(scratch))

        def load():
            adapter = ModelAdapter.from_model(
                "meta-llama/Meta-Llama-3-8B", model_path=str(folder), model_type="pretrained", dtype=torch.float32,
                local_files_only=True,
            )  # fmt: skip
            adapter.model.eval()
            adapter.use_cache = False
            return adapter, adapter.model

        # the dense model as this environment loads it: its perplexity must be the dense row's
        dense = perplexity(load()[1], wikitext, args.window, args.max_tokens)
        print(json.dumps({"dense_perplexity": dense}), flush=True)
        for dim in (int(d) for d in args.dims.split(",")):
            start = time.perf_counter()
            adapter, model = load()
            if model.lm_head.weight is model.model.embed_tokens.weight:  # untie: see the module docstring
                model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
                model.config.tie_word_embeddings = False
            layernorm_fusion.replace_layers(adapter)
            layernorm_fusion.fuse_modules(adapter)
            rotate.rotate_and_slice(adapter, batches, ConstSlicingScheduler(dim), final_orientation="pca")
            seconds = time.perf_counter() - start
            named = dict(model.named_parameters())
            embeddings = named["model.embed_tokens.weight"].numel() + named["lm_head.weight"].numel()
            results.append({
                "dim": dim,
                "dense_perplexity": dense,
                "perplexity": perplexity(model, wikitext, args.window, args.max_tokens),
                "parameters": sum(p.numel() for p in named.values()),
                "embedding_parameters": embeddings,
                "shortcut_parameters": sum(p.numel() for n, p in named.items() if "shortcut_Q" in n),
                "seconds": seconds,
            })  # fmt: skip
            print(json.dumps(results[-1]), flush=True)
            del adapter, model
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
