"""python -m seqfast.info — what this seqfast build contains."""
import torch

import seqfast
from seqfast import _extension


def main():
    cuda = _extension.cuda_kernels_compiled()
    print(f"seqfast {seqfast.__version__} ({seqfast.__file__})")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
          f"oneDNN: {torch.backends.mkldnn.is_available()}; threads: {torch.get_num_threads()})")
    print("fused kernels:")
    print("  CPU : LSTM, GRU, RNN (tanh/relu) layers and cells, padded and PackedSequence; "
          "float32, float64")
    print(f"  CUDA: {'LSTM, GRU, RNN layers and cells; float32, float64, float16, bfloat16 (compile-checked, not yet run on a GPU)' if cuda else 'not compiled in this build'}"
          + (f"; devices visible: {torch.cuda.device_count()}" if cuda else ""))
    print("float16/bfloat16 on the CPU, and devices without a seqfast kernel, run torch's own "
          "implementation")


if __name__ == "__main__":
    main()
