#!/usr/bin/env bash
# Peak memory (RSS) of `dapt prepare` on three inputs of 32 MiB of text: one plain-text
# document, JSONL records, and two .txt.gz files (98 KB on disk). docs/benchmarks.md
# ("Corpus preparation memory") has the numbers and what they mean.
#
#   DAPT=target/debug/dapt scripts/prepare-memory.sh [SCRATCH_DIR]
set -euo pipefail
DAPT=$(realpath "${DAPT:-target/debug/dapt}")
W=${1:-$(mktemp -d)}
mkdir -p "$W/src"
cd "$W"
# A small tokenizer first (trained on a tiny corpus), then given to each measured run, so that
# no run trains one.
printf 'vacuum index heap page tuple lock btree query planner checkpoint\n' > src/seed.txt
cat > job.yaml <<YAML
job: memory
corpus:
  output: out
  vocab_size: 300
  sources:
    - name: dom
      role: domain
      paths: [src]
      weight: 1
YAML
"$DAPT" prepare job.yaml --quiet >/dev/null
cp out/tokenizer.json tok.json
sed -i 's/^  vocab_size: 300/  tokenizer: tok.json/' job.yaml
measure() {
  rm -rf out
  /usr/bin/time -f "   peak RSS %M KB, %e s" "$DAPT" prepare job.yaml --quiet 2>&1 | grep -E 'peak|error'
}
rm -f src/*
python3 -c 'line=b"vacuum index heap page tuple lock\n"; open("src/one.txt","wb").write(line*((32<<20)//len(line)))'
echo "one .txt document, $(stat -c%s src/one.txt) bytes"; measure
rm -f src/*
python3 -c '
import json, random
random.seed(3); w="vacuum index heap page tuple lock btree query planner checkpoint".split()
with open("src/one.jsonl", "w") as f:
    n = 0
    while n < (32 << 20):
        s = json.dumps({"text": " ".join(random.choice(w) for _ in range(300)) + " %d" % n}) + "\n"
        f.write(s); n += len(s)'
echo "JSONL, $(stat -c%s src/one.jsonl) bytes"; measure
rm -f src/*
python3 -c '
import gzip
line = b"vacuum index heap page tuple lock\n"; body = line * ((16 << 20) // len(line))
for k in range(2): open(f"src/f{k}.txt.gz", "wb").write(gzip.compress(body[:-(k+1)] + b"%d\n" % k, 9))'
echo "two .txt.gz of 16 MiB of text, $(du -cb src/*.gz | tail -1 | cut -f1) bytes on disk"; measure
