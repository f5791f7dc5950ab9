#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command (about 5-10 minutes on one H100-class GPU):
#   1. the Triton tests compiled, not interpreted: the grouped GEMM, the dispatch kernels and the
#      chapter-11 checks (tests/conftest.py sets TRITON_INTERPRET only when no GPU is present);
#   2. benchmarks/dispatch_kernels.py: the permute / combine kernels' GB/s against a device copy;
#   3. benchmarks/layer.py --device cuda: MoELayer forward + backward with the torch, triton and
#      triton_gemm backends, beside HF's Mixtral block and the dense FFN.
# Everything goes into one markdown report (default gpu_report.md), each step under its own
# time limit; a failing step is recorded and the next one still runs.
#
#   tools/gpu_check.sh [REPORT.md]        PYTHON=.venv/bin/python tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
REPORT=${1:-gpu_report.md}
unset TRITON_INTERPRET

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "tools/gpu_check.sh needs a CUDA GPU, and torch sees none: nothing to check." >&2
    exit 1
fi

status=0
step() {  # step TITLE SECONDS COMMAND...: run one step, its output as a code block in the report
    local title=$1 seconds=$2
    shift 2
    echo "== $title" >&2
    { echo; echo "## $title"; echo; echo '```'; } >>"$REPORT"
    timeout "$seconds" "$@" >>"$REPORT" 2>&1
    local rc=$?
    echo '```' >>"$REPORT"
    if [ "$rc" -ne 0 ]; then
        echo "**exit status $rc$([ "$rc" -eq 124 ] && echo ': timed out after '"$seconds"' s')**" >>"$REPORT"
        status=1
    fi
}

{
    echo "# minimoe GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo "- $("$PYTHON" -c 'import torch, triton; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")')"
} >"$REPORT"

step "Compiled Triton tests" 240 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_grouped_gemm.py tests/test_kernels.py tests/test_checks_ch11.py
step "benchmarks/dispatch_kernels.py" 120 "$PYTHON" benchmarks/dispatch_kernels.py
step "benchmarks/layer.py --device cuda" 180 "$PYTHON" benchmarks/layer.py --device cuda --config mixtral-like \
    --config fine-grained

echo "wrote $REPORT" >&2
exit $status
