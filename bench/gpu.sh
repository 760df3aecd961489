#!/usr/bin/env bash
# The project's one GPU script: the CUDA tests and the GPU rows of the benchmarks, in one go.
#
# Run it on a machine with one CUDA device. A GPU machine with CUDA torch but no package
# registry gets the pure-Python dependencies the tests import as wheels in .whl/ (git-ignored),
# downloaded beforehand where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection SQLAlchemy pyzmq typing-extensions
# (the versions of the project's own environment). Figures go to bench/RESULTS.md by hand,
# with the device and date.
#
#   bash bench/gpu.sh [OUT_DIR]        (default bench/out)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/out}}
mkdir -p "$out"

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tpm-faas-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/tpm-faas-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's parser rejects 9.0a

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-device.txt"
python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' \
  | tee -a "$out/gpu-device.txt"

status=0
# The gpu-marked tests: only the modules that hold some, without the integration conftest
# (which starts an embedded site this script does not need); warnings reported, not errors
# (the GPU machine has other library versions).
mapfile -t files < <(grep -rl "mark.gpu" tests --include='test_*.py')
python3 -m pytest -q -m gpu --noconftest -p no:cacheprovider -W default "${files[@]}" 2>&1 \
  | tee "$out/gpu-tests.log" || status=1
python3 bench/decode.py --gpu-only --out "$out/decode-gpu.json" 2>&1 | tee "$out/decode-gpu.log" \
  || status=1
# The mixture-of-experts row (a random 5.8B Qwen3-MoE, 64 experts of which 8 per token, bf16):
# decode at batch 1 and 16 against the roofline of the experts each step reads (meant to
# take under a minute).
python3 bench/decode.py --moe-gpu --out "$out/decode-moe-gpu.json" 2>&1 \
  | tee "$out/decode-moe-gpu.log" || status=1
python3 bench/interventions.py --gpu-only --out "$out/interventions-gpu.json" 2>&1 \
  | tee "$out/interventions-gpu.log" || status=1
exit $status
