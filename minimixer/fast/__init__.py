"""The fast path: the same Mixer as model.py, reorganized for speed. tests/test_fast.py
proves that it computes what the clear path computes.

`mm.predict` and the trainer run this package. Read model.py and layers.py to learn the math;
read this to see where the time goes on a CPU, and why (docs/speed-notes.md has the numbers).

- Matmuls are almost all the FLOPs, and NumPy's BLAS runs them as fast as PyTorch's. A naive
  NumPy Mixer still runs at half timm's speed, because its elementwise work (GELU, LayerNorm,
  bias and residual adds) is single-threaded and streams hidden activations of tens of MB
  through memory about twenty times.
- So the batch is split into one share per core, each with single-threaded BLAS (rows.py): the
  GEMMs keep their speed and all the elementwise work runs in parallel (NumPy ufuncs release
  the GIL). With fewer images than cores, BLAS's own threads split each matmul instead, and the
  elementwise work stays in the calling thread.
- Elementwise work runs in place, in chunks of about L2 size (kernels.py); with the `fast` extra
  (Numba), GELU, LayerNorm, the residual adds and AdamW run as fused one-loop kernels
  (kernels_numba.py, adamw.py). Without Numba, the NumPy kernels run.
- No float32 GELU output is a denormal (see erf.TAIL_EXP_FLOOR): on x86 each denormal operand
  costs the next matmul a microcode assist.
- Token mixing is a left multiplication, W1 @ y per image, so nothing is transposed.
- Inference runs the channel MLP over a thousand or so tokens at a time, so its (·, DC) hidden
  stays in L3 and the peak memory stays small; training keeps only what backward needs (mixer.py).

On CuPy arrays the same functions run with cupy's ops, and GELU is one fused kernel (cuda.py).

    rows.py     row chunks and batch shares over the threads, per-thread scratch
    kernels.py  the elementwise kernels (Numba, NumPy or CuPy, chosen by the array)
    cuda.py     the fused CUDA kernels' sources
    mixer.py    predict, forward, backward
    adamw.py    AdamW with a fused update
"""
from ..runtime.threads import num_threads
from .adamw import AdamW
from .cuda import CUPY_KERNELS, CUPY_PREAMBLE
from .kernels import (add_bias_residual_, bias_gelu_, bias_gelu_grad_, layernorm_, layernorm_backward_add_,
                      load_kernels, multiply_and_sum_, numba_kernels)
from .mixer import backward, forward, predict
from .rows import run_shares, split_batch

__all__ = ["AdamW", "CUPY_KERNELS", "CUPY_PREAMBLE", "add_bias_residual_", "backward", "bias_gelu_",
           "bias_gelu_grad_", "forward", "layernorm_", "layernorm_backward_add_", "load_kernels",
           "multiply_and_sum_", "num_threads", "numba_kernels", "predict", "run_shares", "split_batch"]
