"""Integration: the real SmolLM2-135M (9 query / 3 KV heads, head_dim 64) and real data from ../shared/data."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import C4_SHARD

from gqa_prune import importance
from gqa_prune.arch import geometry_of
from gqa_prune.checkpoint import save_pruned
from gqa_prune.data import calibration_blocks, read_documents, wikitext2_test_text
from gqa_prune.perplexity import perplexity
from gqa_prune.planning import PlanSettings, build_plan
from gqa_prune.sources import load_model, load_tokenizer
from gqa_prune.surgery import apply_plan, apply_plan_as_mask

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model = load_model(smollm2_dir, device="cpu")
    tokenizer = load_tokenizer(smollm2_dir)
    blocks = calibration_blocks(tokenizer, read_documents(str(C4_SHARD)), 8, 128, seed=0)
    scores = importance.score(model, blocks, "taylor", batch_size=4)
    return model, tokenizer, scores


def test_staged_model_is_the_expected_smollm2(smollm2_dir, smollm2):
    model, _, _ = smollm2
    geometry = geometry_of(model)
    assert (geometry.num_layers, geometry.heads_per_group, geometry.head_dim) == (30, 3, 64)
    assert set(geometry.kv_groups) == {3} and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert sorted(path.suffix for path in smollm2_dir.iterdir() if path.suffix in (".bin", ".pt", ".pkl")) == []
    assert "4-bit" in json.loads((smollm2_dir / "gqa_prune.json").read_text())["note"]


def test_prune_20_percent_taylor_inverse(tmp_path, smollm2, data_dir):
    model, tokenizer, scores = smollm2
    plan = build_plan(
        scores, PlanSettings(attn_ratio=0.2, mlp_ratio=0.2), params_before=sum(p.numel() for p in model.parameters())
    )
    summary = plan.param_summary()
    assert summary["achieved_attn_ratio"] == pytest.approx(0.2)  # 18 of 90 KV groups
    assert summary["achieved_mlp_ratio"] == pytest.approx(0.2, abs=0.01)  # whole multiples of 128 channels
    assert all(len(layer.kept_kv_groups) >= 1 for layer in plan.layers) and not plan.is_uniform

    inputs = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    reference = apply_plan_as_mask(copy.deepcopy(model), plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    with torch.no_grad():
        expected = pruned(inputs).logits
        assert (expected - reference(inputs).logits).abs().max().item() <= 1e-4

    tokens = tokenizer(wikitext2_test_text(data_dir), return_tensors="pt").input_ids[0]
    dense_ppl = perplexity(model, tokens, 256, "wikitext", max_tokens=2048)
    pruned_ppl = perplexity(pruned, tokens, 256, "wikitext", max_tokens=2048)
    assert 10 < dense_ppl.perplexity < 60 < pruned_ppl.perplexity < 2000  # damaged, not destroyed

    save_pruned(pruned, tokenizer, plan, tmp_path / "pruned", source="embedded:smollm2-135m")
    reloaded = load_model(tmp_path / "pruned", device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, expected)
    generated = reloaded.generate(inputs, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, inputs.shape[1] + 6)

    code = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "pruned")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            print(model(torch.tensor({inputs.tolist()})).logits[0, -1].argmax().item())
    """)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=3600,  # a guard against a hang, generous so that a busy machine never trips it
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == expected[0, -1].argmax().item()


def test_offline_tasks_score_smollm2_above_chance(smollm2, data_dir):
    """ARC-Easy and PIQA on 100 items, HellaSwag (four long endings per item, the costly task) on 40: each more
    than two standard errors above chance.

    WinoGrande is not asserted: SmolLM2-135M scores at chance on it (0.504 +- 0.014 on all 1,267 items of the
    offline copy, as published for this size), so "above chance" would only test noise.
    """
    from gqa_prune.evaluation import CHANCE, run_lm_eval, summarize

    model, tokenizer, _ = smollm2
    tasks = {"arc_easy": 100, "hellaswag": 40, "piqa": 100}
    summary = summarize(run_lm_eval(model, tokenizer, tasks, data_dir, batch_size=8, max_length=2048), data_dir)
    for task, entry in summary.items():
        assert entry["items"] == tasks[task]
        assert entry["acc_norm"] - 2 * entry["acc_norm_stderr"] > CHANCE[task], (task, entry)


def shortgpt_layers(model, blocks: torch.Tensor, count: int) -> list[int]:
    """ShortGPT written out independently: the ``count`` layers whose output is most like their input
    (mean over tokens of 1 - cos(h_l, h_l+1); hidden states from output_hidden_states, except the last
    layer's output, which hidden_states gives after the final norm and a hook reads before it)."""
    layers = model.config.num_hidden_layers
    influence = torch.zeros(layers, dtype=torch.float64)
    last = []
    handle = model.model.layers[-1].register_forward_hook(lambda m, args, output: last.append(output))
    with torch.no_grad():
        for batch in blocks.split(4):
            states = list(model(input_ids=batch, output_hidden_states=True).hidden_states)
            states[layers] = last.pop()
            for layer in range(layers):
                before, after = states[layer].double(), states[layer + 1].double()
                influence[layer] += (1 - torch.nn.functional.cosine_similarity(before, after, dim=-1)).sum()
    handle.remove()
    return sorted(influence.argsort()[:count].tolist())


def test_depth_mode_is_shortgpt_and_reloads_with_the_stock_class(tmp_path, smollm2, data_dir):
    from transformers import LlamaForCausalLM

    model, tokenizer, _ = smollm2
    blocks = calibration_blocks(tokenizer, read_documents(str(C4_SHARD)), 8, 128, seed=0)
    scores = importance.score(model, blocks, "magnitude", curves=False)
    plan = build_plan(scores, PlanSettings(ratio=0.2, mode="depth"))
    removed = [layer.layer for layer in plan.layers if layer.removes_layer]
    assert len(removed) == 6 and plan.is_uniform
    reference = shortgpt_layers(model, blocks, 6)
    assert removed == reference

    pruned = apply_plan(copy.deepcopy(model), plan)
    save_pruned(pruned, tokenizer, plan, tmp_path / "depth", source="embedded:smollm2-135m")
    assert json.loads((tmp_path / "depth" / "config.json").read_text())["model_type"] == "llama"
    stock = LlamaForCausalLM.from_pretrained(tmp_path / "depth").eval()
    assert type(stock) is LlamaForCausalLM and sum(p.numel() for p in stock.parameters()) == plan.params_after

    dropped = copy.deepcopy(model)  # ShortGPT's own surgery: delete the layers from the list
    kept_layers = [layer for i, layer in enumerate(dropped.model.layers) if i not in reference]
    dropped.model.layers = torch.nn.ModuleList(kept_layers)
    for index, layer in enumerate(dropped.model.layers):
        layer.self_attn.layer_idx = index
    dropped.config.num_hidden_layers = len(dropped.model.layers)
    tokens = tokenizer(wikitext2_test_text(data_dir), return_tensors="pt").input_ids[0]
    ours = perplexity(stock, tokens, 512, "wikitext", max_tokens=4096).perplexity
    theirs = perplexity(dropped, tokens, 512, "wikitext", max_tokens=4096).perplexity
    assert ours == pytest.approx(theirs, rel=1e-4)
