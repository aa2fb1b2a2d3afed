"""Peer baseline: SliceGPT (microsoft/TransformerCompression), run from its own checkout and environment.

SliceGPT rotates the residual stream by PCA of the calibration activations and deletes the least significant
directions: every projection keeps ``d'`` of its ``d`` residual-side rows or columns, and each layer gains two
``d' x d'`` shortcut matrices that carry the rotation along the residual connection. ``dimension_for`` picks
``d'`` so that the attention+MLP projections plus those shortcuts hold the share of the dense model's
attention+MLP parameters that every other row keeps (the ratio means the same thing in each row).

Set up once, outside this repository (SliceGPT pins transformers 4.41, which transformers 5 code cannot share a
process with)::

    git clone https://github.com/microsoft/TransformerCompression /work/peers/TransformerCompression
    python3 -m venv /work/peers/slicegpt-venv
    /work/peers/slicegpt-venv/bin/pip install torch==2.13.0 transformers==4.41.0 datasets==2.18.0 accelerate \\
        ml-collections "numpy<2" tqdm safetensors sentencepiece

The rotation alone is checked by ``python bench/slicegpt_peer.py CHECKOUT PYTHON`` (nothing sliced: the dense
perplexity again). Then ``python bench/quality.py --slicegpt /work/peers/TransformerCompression --slicegpt-python
/work/peers/slicegpt-venv/bin/python``. ``bench/slicegpt_runner.py`` runs inside that environment and says
what had to be adapted for SmolLM2 (the adapter picked by name, the config's RoPE key, untied embeddings).
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

RUNNER = Path(__file__).with_name("slicegpt_runner.py")


def dimension_for(config, ratio: float) -> int:
    """The residual width ``d'`` at which q/k/v/o + gate/up/down (scaled by ``d'/d``) plus the two ``d' x d'``
    shortcuts of every layer hold ``1 - ratio`` of the dense model's attention+MLP projection parameters."""
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    per_layer = d * head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    per_layer += 3 * d * config.intermediate_size
    dense = layers * per_layer
    linear, quadratic = dense / d, 2 * layers  # params(d') = linear * d' + quadratic * d'^2
    target = (1 - ratio) * dense
    return int((-linear + math.sqrt(linear**2 + 4 * quadratic * target)) / (2 * quadratic))


def checkout_commit(checkout: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def slicegpt(
    python: Path, checkout: Path, model_dir: Path, calib: torch.Tensor, wikitext: torch.Tensor, dims: list[int],
    window: int, max_tokens: int,
) -> list[dict]:  # fmt: skip
    """Slice ``model_dir`` to each of ``dims`` with SliceGPT in its own environment; its figures per dimension."""
    with tempfile.TemporaryDirectory() as scratch:
        inputs, out = Path(scratch) / "inputs.safetensors", Path(scratch) / "out.json"
        save_file({"calib": calib.contiguous(), "wikitext": wikitext.contiguous()}, str(inputs))
        subprocess.run(
            [str(python), str(RUNNER), "--checkout", str(checkout), "--model", str(model_dir), "--inputs", str(inputs),
             "--dims", ",".join(map(str, dims)), "--window", str(window), "--max-tokens", str(max_tokens),
             "--out", str(out)],
            check=True,
        )  # fmt: skip
        return json.loads(out.read_text())


def describe_settings(checkout: Path) -> str:
    return (
        f"SliceGPT {checkout_commit(checkout)} (microsoft/TransformerCompression), PCA orientation, constant "
        "slicing, float32 CPU, transformers 4.41, embeddings untied"
    )


def main() -> None:
    """Check that SliceGPT's rotation alone is lossless here: slice nothing (``d' = d``) and compare perplexity
    with the dense model's in the same environment (first 4,096 WikiText-2 tokens; 2 x 512 C4 blocks for PCA)."""
    import argparse

    from common import MODEL_DIR, load_bench

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("python", type=Path)
    args = parser.parse_args()
    bench = load_bench(n_blocks=2, block_len=512)
    dim = bench.model.config.hidden_size
    (result,) = slicegpt(args.python, args.checkout, MODEL_DIR, bench.blocks, bench.wikitext, [dim], 2048, 4096)
    print(f"{describe_settings(args.checkout)}: nothing sliced {result['perplexity']:.2f} PPL, dense "
          f"{result['dense_perplexity']:.2f} (first 4,096 WikiText-2 tokens)")  # fmt: skip


if __name__ == "__main__":
    main()
