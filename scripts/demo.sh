#!/usr/bin/env bash
# Main job on the embedded default: stage SmolLM2-135M, calibrate on C4, score (taylor, plus magnitude and
# random baselines), plan 20 % of attention+MLP parameters (inverse strategy), prune, and print WikiText-2
# perplexity before and after. Everything is offline; data comes from ../shared/data (override DATA_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-../shared/data}
MODEL=smollm2-135m
RATIO=${RATIO:-0.20}
PPL_WINDOW=${PPL_WINDOW:-2048}
PPL_MAX_TOKENS=${PPL_MAX_TOKENS:-32768}
RESOURCES=resources/models/$MODEL
RESULTS=results/$MODEL
CALIB=$RESULTS/calib/c4-n32-l256-s0.safetensors

[ -f "$RESOURCES/config.json" ] || gqa-prune stage --source "embedded:$MODEL" --out "$RESOURCES"
[ -f "$CALIB" ] || gqa-prune calib --model "$RESOURCES" --source "$DATA_DIR/c4/sample_c4-rp1.jsonl" \
    --n-samples 32 --seq-len 256 --seed 0 --out "$CALIB"

ppl() {  # ppl MODEL_DIR OUT_JSON
    [ -f "$2" ] || gqa-prune ppl --model "$1" --data-dir "$DATA_DIR" --window "$PPL_WINDOW" \
        --max-tokens "$PPL_MAX_TOKENS" --device cpu --out "$2" >/dev/null
}
ppl "$RESOURCES" "$RESULTS/eval/dense-ppl.json"

for criterion in taylor magnitude random; do
    variant=$criterion-inverse-r$RATIO
    [ -d "$RESULTS/importance/c4-$criterion" ] || gqa-prune importance --model "$RESOURCES" --calib "$CALIB" \
        --criterion "$criterion" --device cpu --out "$RESULTS/importance/c4-$criterion"
    gqa-prune plan --importance "$RESULTS/importance/c4-$criterion" --ratio "$RATIO" --strategy inverse \
        --out "$RESULTS/plans/$variant.json" --plot "$RESULTS/plans/$variant.png" >/dev/null
    [ -d "$RESULTS/pruned/$variant" ] || gqa-prune prune --model "$RESOURCES" --plan "$RESULTS/plans/$variant.json" \
        --out "$RESULTS/pruned/$variant" >/dev/null
    ppl "$RESULTS/pruned/$variant" "$RESULTS/eval/$variant-ppl.json"
done

python - "$RESULTS" <<'PY'
import json, sys
from pathlib import Path
results = Path(sys.argv[1])
dense = json.loads((results / "eval/dense-ppl.json").read_text())
print(f"\nWikiText-2 test perplexity, {dense['windows']} windows x {dense['window']} tokens "
      f"({dense['tokens_scored']:,} tokens scored; {dense['text']})")
print(f"{'variant':<28}{'params':>14}{'PPL':>10}")
print(f"{'dense':<28}{json.loads((Path('resources/models/smollm2-135m') / 'gqa_prune.json').read_text())['parameters']:>14,}{dense['perplexity']:>10.2f}")
for record in sorted(results.glob("eval/*-inverse-*-ppl.json")):
    variant = record.name[: -len("-ppl.json")]
    plan = json.loads((results / "plans" / f"{variant}.json").read_text())["summary"]
    print(f"{variant:<28}{plan['params_after']:>14,}{json.loads(record.read_text())['perplexity']:>10.2f}")
print(f"\nresults in {results}/")
PY
