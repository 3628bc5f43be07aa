"""python -m seqfast.info — what this seqfast build contains."""
import os

import torch

import seqfast
from seqfast import _extension


def _ops_with_kernel(key):
    """The seqfast operators with a kernel registered for dispatch key `key` (read from the dispatcher)."""
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("seqfast::"))
    return ops, [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(n, key)]


def main():
    cuda = _extension.cuda_kernels_compiled()
    print(f"seqfast {seqfast.__version__} ({seqfast.__file__})")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
          f"oneDNN: {torch.backends.mkldnn.is_available()}; threads: {torch.get_num_threads()})")
    print("fused kernels (recurrent layers LSTM/GRU/RNN and their cells, padded and PackedSequence;")
    print("               attention: dot, scaled_dot, general, concat, location):")
    ops, cpu = _ops_with_kernel("CPU")
    _, autocast = _ops_with_kernel("AutocastCPU")
    print(f"  CPU : {len(cpu)}/{len(ops)} ops; recurrent layers float32, float64, bfloat16; "
          "attention float32, float64, bfloat16, float16")
    print(f"        autocast policy kernels (AutocastCPU): {len(autocast)} ops; bf16 instructions "
          f"reported by torch: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    if cuda:
        _, on_cuda = _ops_with_kernel("CUDA")
        persistent = os.environ.get("SEQFAST_PERSISTENT_RNN", "0") == "1"
        print(f"  CUDA: {len(on_cuda)}/{len(ops)} ops; float32, float64, float16, bfloat16 — compile-checked, "
              f"not yet run on a GPU; devices visible: {torch.cuda.device_count()}")
        print(f"        persistent small-batch forward: {'on' if persistent else 'off'} "
              "(opt-in: SEQFAST_PERSISTENT_RNN=1)")
    else:
        print("  CUDA: not compiled in this build")
    print("float16 recurrent layers on the CPU, and devices without a seqfast kernel, run torch's own "
          "implementation")


if __name__ == "__main__":
    main()
