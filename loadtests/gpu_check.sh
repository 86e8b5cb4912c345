#!/usr/bin/env bash
# GPU check of the transformers engine: its unit tests with the model on CUDA, plus one timing.
# Usage on a CUDA machine (python3 with torch + transformers): bash loadtests/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
PROTEGE_TEST_DEVICE=cuda HF_HUB_OFFLINE=1 python3 -m pytest -q -p no:cacheprovider \
  tests/unit/test_engine_transformers.py tests/unit/test_engine_fake.py tests/unit/test_stop_matcher.py
