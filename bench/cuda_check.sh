#!/usr/bin/env bash
# Checks the CUDA path against the CPU, in one run:
#
#   1. `potchain eval` on the devnet and testnet genesis models, on CUDA
#      (torch-f64 on cuBLAS) and on the CPU backends (cpu-fused, torch-f64,
#      torch-int64 on the devnet): every run of one batch must print the same
#      `loss_total` and `per_token_sha256`;
#   2. evaluation times on CUDA and on the CPU, cold (the CLI's first call) and
#      warm (the same evaluator again, in one process);
#   3. the miner on CUDA: it trains, the proof is computed on CUDA, and a fresh
#      CPU node validates the block (both loss claims equal to its own);
#   4. the evaluator, miner and determinism tests (pytest);
#   5. `potchain localnet --device cuda` and bench/useful_work.py --device cuda.
#
#   bash bench/cuda_check.sh
#
# Prints PASS, FAIL or SKIP per step and a summary; exit code 1 if any step
# failed. The log goes to $OUT/log when OUT is set, else to /tmp/cuda_check.log.
# Settings (environment): PYTHON (default python3, or .venv/bin/python if
# present); CHECK_DEVICE (default cuda; `cpu` runs the accelerator legs on
# the CPU, to try the script on a machine without a GPU); CHECK_GENESES
# (default "devnet testnet"); CHECK_TESTS (default 1; 0 skips pytest);
# CHECK_WHEELS (default build/cuda_wheels: wheels installed into a temporary
# directory first if cryptography, PyNaCl or plyvel is missing, for a
# machine without network access).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then LOG=$OUT/log; else LOG=/tmp/cuda_check.log; fi
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${CHECK_DEVICE:-cuda}
GENESES=${CHECK_GENESES:-devnet testnet}
WHEELS=${CHECK_WHEELS:-build/cuda_wheels}
WORK=$(mktemp -d /tmp/cuda_check.XXXXXX)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
SUMMARY=()
FAILED=0

say() { echo "== $*"; }
record() {  # record STATUS NAME DETAIL
    SUMMARY+=("$1  $2${3:+  ($3)}")
    echo "== $1: $2${3:+  ($3)}"
    [ "$1" = FAIL ] && FAILED=1
    return 0
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

say "cuda_check started $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
if git rev-parse --git-dir >/dev/null 2>&1; then
    say "git: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench/cuda_check.sh' || echo ' (modified)')"
fi

# --- 0. environment -----------------------------------------------------------
if ! "$PYTHON" -c 'import cryptography, nacl, plyvel' 2>/dev/null; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        say "installing $(ls "$WHEELS" | tr '\n' ' ')into $WORK/site"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$WHEELS"/*.whl || { record FAIL "install wheels"; exit 1; }
        export PYTHONPATH=$PYTHONPATH:$WORK/site
    fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cpus: $(nproc)"
"$PYTHON" - <<'EOF' || { record FAIL environment "the project does not import"; exit 1; }
import platform, numpy, numba, torch
import node  # noqa: F401  (the whole CLI imports)
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"numpy {numpy.__version__}, numba {numba.__version__}, torch threads {torch.get_num_threads()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda device: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs")
else:
    print("cuda device: none")
EOF
HAVE_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "$DEVICE" = cuda ] && [ "$HAVE_CUDA" != 1 ]; then
    say "no CUDA device: the CUDA legs are skipped (CHECK_DEVICE=cpu runs them on the CPU)"
fi
accel_ok() { [ "$DEVICE" != cuda ] || [ "$HAVE_CUDA" = 1 ]; }

# --- 1. canonical evaluation: the same bits on CUDA and on the CPU -------------
EVALS=$WORK/evals.jsonl
run_eval() {  # run_eval GENESIS SPLIT SEED DEVICE BACKEND TIMEOUT
    local started line rc
    started=$(now)
    line=$(timeout "$6" "$PYTHON" -c 'import sys, node; sys.exit(node.main())' eval \
        --genesis "genesis/$1.json" --split "$2" --seed "$3" --device "$4" --backend "$5" 2>"$WORK/eval.err")
    rc=$?
    if [ $rc -ne 0 ]; then
        record FAIL "eval $1 $2 seed $3 $4 $5" "exit $rc: $(tail -n 3 "$WORK/eval.err" | tr '\n' ' ')"
        return
    fi
    echo "$line" | "$PYTHON" -c '
import json, sys
r = json.loads(sys.stdin.read()); r["genesis"] = sys.argv[1]; r["wall"] = float(sys.argv[2])
print(json.dumps(r))' "$1" "$(elapsed "$started")" | tee -a "$EVALS"
}

for genesis in $GENESES; do
    if [ "$genesis" = devnet ]; then
        batches="validation:7 validation:11 test:7"; limit=120
    else
        batches="validation:7 validation:11"; limit=300
    fi
    for batch in $batches; do
        split=${batch%%:*}; seed=${batch##*:}
        say "eval $genesis $split seed $seed"
        if accel_ok; then run_eval "$genesis" "$split" "$seed" "$DEVICE" torch-f64 "$limit"; fi
        run_eval "$genesis" "$split" "$seed" cpu cpu-fused "$limit"
        if [ "$genesis" = devnet ]; then
            run_eval "$genesis" "$split" "$seed" cpu torch-f64 "$limit"
            run_eval "$genesis" "$split" "$seed" cpu torch-int64 "$limit"
        elif [ "$seed" = 7 ]; then
            run_eval "$genesis" "$split" "$seed" cpu torch-f64 "$limit"
        fi
    done
done
if [ -s "$EVALS" ]; then
    "$PYTHON" - "$EVALS" "$DEVICE" >"$WORK/eval_summary" <<'EOF'
import json, sys
from collections import defaultdict
groups = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    groups[(r["genesis"], r["split"], r["seed"])].append(r)
for (genesis, split, seed), runs in groups.items():
    bits = {(r["loss_total"], r["per_token_sha256"]) for r in runs}
    where = ", ".join(f"{r['device']}/{r['backend']} {r['seconds']}s (wall {r['wall']}s)" for r in runs)
    devices = {r["device"] for r in runs}
    status = "FAIL" if len(bits) > 1 else ("PASS" if len(runs) > 1 else "SKIP")
    loss, sha = sorted(bits)[0]
    detail = f"loss_total {loss}, per_token_sha256 {sha}" if len(bits) == 1 else \
        "DIFFERENT BITS: " + "; ".join(f"{r['device']}/{r['backend']} {r['loss_total']} {r['per_token_sha256']}" for r in runs)
    print(f"{status}\teval bit-identical {genesis} {split} seed {seed} on {'+'.join(sorted(devices))} ({len(runs)} runs)"
          f"\t{detail}; {where}")
EOF
    while IFS=$'\t' read -r status name detail; do record "$status" "$name" "$detail"; done <"$WORK/eval_summary"
fi

# --- 2. evaluation times, cold and warm -----------------------------------------
for genesis in $GENESES; do
    say "evaluation times: $genesis"
    started=$(now)
    if timeout 300 "$PYTHON" - "$genesis" "$DEVICE" "$(accel_ok && echo 1 || echo 0)" <<'EOF'; then
import json, statistics, sys, time
import torch
from genesis import chunk_directory, load_genesis
from node import tune_memory_allocator
from pathlib import Path
from training.data import load_split, sample_batch, seed_from_int
from training.evaluate import CanonicalEvaluator, make_backend

tune_memory_allocator()
name, device, accel = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
path = Path("genesis") / f"{name}.json"
genesis = load_genesis(path)
text = load_split(genesis.dataset, chunk_directory(path, genesis), "validation")
batch = sample_batch(text, seed_from_int(7), genesis.evaluation.validation_sequences, genesis.model.context)
weights, tables = genesis.initial_weights(), genesis.tables()
legs = ([(device, "torch-f64", 5)] if accel else []) + [("cpu", "cpu-fused", 1 if name == "testnet" else 5)]
results = set()
for dev, backend, warm in legs:
    evaluator = CanonicalEvaluator(weights, tables, make_backend(backend, dev))
    times = []
    for _ in range(1 + warm):
        started = time.perf_counter()
        result = evaluator.per_token_losses(*batch)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        results.add((result.loss_total, result.per_token_sha256))
    print(json.dumps({"genesis": name, "device": dev, "backend": backend, "tokens": result.tokens,
                      "threads": torch.get_num_threads(), "cold_seconds": round(times[0], 4),
                      "warm_seconds_median": round(statistics.median(times[1:]), 4), "warm_runs": warm,
                      "loss_total": result.loss_total, "per_token_sha256": result.per_token_sha256}))
sys.exit(0 if len(results) == 1 else 1)
EOF
        record PASS "evaluation times $genesis (repeats bit-identical)" "$(elapsed "$started") s"
    else
        record FAIL "evaluation times $genesis" "exit $? after $(elapsed "$started") s"
    fi
done

# --- 3. the miner on the accelerator, its block validated by a CPU node ----------
for genesis in $GENESES; do
    say "mine on $DEVICE, validate on the CPU: $genesis"
    if ! accel_ok; then record SKIP "mine on cuda, validate on cpu: $genesis" "no CUDA device"; continue; fi
    started=$(now)
    if timeout 300 "$PYTHON" - "$genesis" "$DEVICE" <<'EOF'; then
import json, sys, time
from pathlib import Path
import torch
from chain.blocks import TrainingBody
from chain.crypto import devnet_key
from consensus.proposals import propose_best_training_block
from consensus.rules import (Chain, InvalidBlock, apply_training_block, compute_assigned_slice,
                             compute_training_seed, compute_validation_seed, genesis_block, genesis_state)
from genesis import chunk_directory, load_genesis
from node import tune_memory_allocator
from training.data import load_split
from training.miner import Miner, TrainingConfig

tune_memory_allocator()
torch.manual_seed(0)
name, device = sys.argv[1], sys.argv[2]
path = Path("genesis") / f"{name}.json"
genesis = load_genesis(path)
directory = chunk_directory(path, genesis)
validation, test, train = (load_split(genesis.dataset, directory, s) for s in ("validation", "test", "train"))
state = genesis_state(genesis)
parent = genesis_block(genesis, state)
producer = Chain(genesis, validation, test, backend="torch-f64", device=device)
weights = producer.weights(state)
key = devnet_key("miner-0")
slice_id = compute_assigned_slice(parent.header, key.public_key, genesis.partition.slices)
seed = compute_training_seed(parent.hash, key.public_key)
config = TrainingConfig(device=device)
started = time.perf_counter()
miner = Miner(weights, producer.layout, train, config)
work = miner.work(weights, slice_id, seed)
if device == "cuda":
    torch.cuda.synchronize()
trained = time.perf_counter() - started
started = time.perf_counter()
block = propose_best_training_block(producer, parent, state, key, work.values, genesis.timestamp + 10, work.steps)
proved = time.perf_counter() - started
assert isinstance(block.body, TrainingBody)
verifier = Chain(genesis, validation, test)  # a fresh CPU node, default backend
started = time.perf_counter()
vseed = compute_validation_seed(parent.hash)
before = verifier.loss(state, "validation", vseed)
after = verifier.loss(state.with_slice(block.body.slice_id, block.body.weights), "validation", vseed)
try:
    apply_training_block(state, parent, block, verifier)
    verdict = "valid"
except InvalidBlock as error:
    verdict = f"invalid: {error}"
verified = time.perf_counter() - started
agree = (block.body.loss_before, block.body.loss_after) == (before, after)
print(json.dumps({"genesis": name, "miner_device": device, "verifier": verifier.backend, "slice": slice_id,
                  "steps": work.steps, "train_seconds": round(trained, 3), "proof_seconds": round(proved, 3),
                  "cpu_verify_seconds": round(verified, 3), "claimed": [block.body.loss_before, block.body.loss_after],
                  "cpu_computed": [before, after], "gain": block.body.loss_before - block.body.loss_after,
                  "claims_equal_cpu": agree, "cpu_node_verdict": verdict}))
sys.exit(0 if agree and verdict == "valid" else 1)
EOF
        record PASS "mine on $DEVICE, block valid on a CPU node: $genesis" "$(elapsed "$started") s"
    else
        record FAIL "mine on $DEVICE, block valid on a CPU node: $genesis" "exit $? after $(elapsed "$started") s"
    fi
done

# --- 4. tests (before the longer node runs) ------------------------------------
if [ "${CHECK_TESTS:-1}" = 1 ]; then
    say "pytest tests/test_evaluate.py tests/test_miner.py tests/test_determinism.py"
    started=$(now)
    timeout 240 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --durations=5 \
        tests/test_evaluate.py tests/test_miner.py tests/test_determinism.py
    rc=$?
    if [ $rc -eq 0 ]; then record PASS "pytest (evaluate, miner, determinism)" "$(elapsed "$started") s"
    else record FAIL "pytest (evaluate, miner, determinism)" "exit $rc after $(elapsed "$started") s"; fi
fi

# --- 5. the node and the benchmark with the miner on the accelerator (devnet) ---
if accel_ok && [[ " $GENESES " = *" devnet "* ]]; then
    say "localnet --device $DEVICE --finalize 2 (devnet)"
    started=$(now)
    rm -rf "$WORK/localnet"
    if timeout 150 "$PYTHON" -c 'import sys, node; sys.exit(node.main())' localnet --genesis genesis/devnet.json \
        --datadir "$WORK/localnet" --finalize 2 --device "$DEVICE"; then
        record PASS "localnet --device $DEVICE --finalize 2" "$(elapsed "$started") s"
    else
        record FAIL "localnet --device $DEVICE --finalize 2" "exit $? after $(elapsed "$started") s"
    fi
    say "bench/useful_work.py --device $DEVICE --repeats 2 (devnet)"
    started=$(now)
    if timeout 150 "$PYTHON" bench/useful_work.py --device "$DEVICE" --repeats 2; then
        record PASS "bench/useful_work.py --device $DEVICE" "$(elapsed "$started") s"
    else
        record FAIL "bench/useful_work.py --device $DEVICE" "exit $? after $(elapsed "$started") s"
    fi
fi

echo
say "summary"
for line in "${SUMMARY[@]}"; do echo "$line"; done
[ -s "$EVALS" ] && [ -n "${OUT:-}" ] && cp "$EVALS" "$OUT/evals.jsonl"
rm -rf "$WORK"
exit $FAILED
