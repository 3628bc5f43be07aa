"""seqfast.nn.Attention vs the padded reference and SDPA: the CLI of seqfast/attention_benchmark.py.

    python benchmarks/bench_attention.py [--quick] [--scores dot,concat] [--no-memory] [--bf16] [--out PATH]
"""
import os
import sys

# The repo root goes last, so an installed seqfast wins and an in-place build is still found.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from seqfast import attention_benchmark  # noqa: E402

if __name__ == "__main__":
    attention_benchmark.main()
