"""Names users choose among, importable without torch (the CLI builds its parser from them in milliseconds).

Each list here is the set of keys of a registry elsewhere (criteria, plan modes, dtypes...); a test holds
the two equal, so a registry and its command-line choices cannot drift apart.
"""

from __future__ import annotations

UNIT_CRITERIA = ("taylor", "fisher", "obs", "magnitude", "activation", "random")
LAYER_CRITERIA = ("block_influence", "activation", "removal")
MODES = ("width", "depth", "hybrid")
STRATEGIES = ("inverse", "proportional", "uniform")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
RECONSTRUCTION_TARGETS = ("own", "dense")
