"""Names users choose among, importable without torch (the CLI builds its parser from them in milliseconds).

Each list here is the set of keys of a registry elsewhere (criteria, plan modes, dtypes...); a test holds
the two equal, so a registry and its command-line choices cannot drift apart.
"""

from __future__ import annotations

UNIT_CRITERIA = ("taylor", "fisher", "obs", "magnitude", "activation", "random")
DEFAULT_UNIT_CRITERION = "taylor"  # `importance` on a dense model with no --criterion
# criteria.experts.EXPERT_CRITERIA; the last two need `importance --criterion taylor|fisher` (gradients)
EXPERT_CRITERIA = ("reap", "frequency", "gate", "ean", "random", "taylor", "fisher")
EXPERT_GRADIENT_CRITERIA = ("taylor", "fisher")  # unit criteria that also score experts (with a backward)
# expert_plan: one count per MoE layer (stock config); counts per layer priced by measured loss curves; or ranked
# by the criterion's value across layers
EXPERT_ALLOCATIONS = ("uniform", "per-layer", "ranked")
# REAP, arXiv 2510.13999: the strongest in its paper (bench/experts.py: docs/benchmarks/experts.md)
DEFAULT_EXPERT_CRITERION = "reap"
LAYER_CRITERIA = ("block_influence", "activation", "removal")
MODES = ("width", "depth", "hybrid", "learned")  # learned: keep exactly the units of learned (l0) masks
UNIT_KINDS = ("layer", "attn_sublayer", "mlp_sublayer", "gqa_group", "mlp_channel")  # units.KINDS
# The default plan mode: hybrid gave the lowest WikiText-2 perplexity at every ratio measured on SmolLM2
# (docs/benchmarks/modes.md; bench/modes.py and bench/quality.py).
DEFAULT_MODE = "hybrid"
STRATEGIES = ("inverse", "proportional", "uniform")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
RECONSTRUCTION_TARGETS = ("own", "dense")
# obs: reconstruction re-chooses which units of each layer go (the plan's counts stay); plan: the plan's units
RECONSTRUCTION_SELECTIONS = ("obs", "plan")
# GGUF types `export-gguf --type` writes: floats by the gguf package, the rest by llama.cpp's quantizer
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
