#!/usr/bin/env bash
# The GPU checks of the gradient monitor in one run (under 10 minutes on one H100/H200), for a
# session with a GPU: the GPU tests (no host-device sync inside a step, float64 reductions exact
# on CUDA, GPU values equal the CPU's) and the GPU benchmarks, printing every figure. Each part
# has its own time limit, so one that hangs does not eat the others' time; the exit status is
# the tests'. Record the printed figures in docs/benchmarks.md with the device and commit.
#
#   bash scripts/gpu_check.sh            # from the repository root, the project's python first on PATH
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, '|', torch.cuda.get_device_name(0), round(torch.cuda.get_device_properties(0).total_memory / 2**30), 'GiB')"
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader 2>/dev/null

echo "== GPU tests (limit 240 s)"
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_monitor_gpu.py tests/test_reliability.py
tests=$?

echo "== monitor on/off, ResNet-50 224 px batch 128 bf16 channels_last (limit 150 s)"
timeout 150 "$PY" scripts/bench_monitor.py --device cuda --model resnet50 --batch-size 128 --precision bf16-mixed \
    --channels-last --steps 20 --warmup 5 --repeats 2 --log-every-n-steps 50 --no-write

echo "== monitor on/off, CIFAR ResNet-56 batch 128 bf16 channels_last (limit 90 s)"
timeout 90 "$PY" scripts/bench_monitor.py --device cuda --model cifar_resnet56 --batch-size 128 --precision bf16-mixed \
    --channels-last --steps 30 --warmup 5 --repeats 2 --log-every-n-steps 50 --no-write

echo "== one CIFAR ResNet-56 epoch and ResNet-50 end to end vs notebook and model-only (limit 150 s)"
timeout 150 "$PY" scripts/benchmark.py --workloads cifar-resnet56-epoch resnet50-224px-tiny-imagenet --device cuda \
    --repeats 1 --no-write

echo "== op counts and host time on the meta device (no GPU needed; limit 60 s)"
timeout 60 "$PY" scripts/count_monitor_ops.py --model resnet50 --device meta --channels-last
timeout 60 "$PY" scripts/bench_monitor_meta.py --steps 3 --repeats 2
echo "== done; GPU tests exit status $tests"
exit $tests
