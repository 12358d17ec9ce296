"""What ``--precision`` of embed, eval and predict computes with (no JAX import: the CLI reads it).

fp32 runs matmuls and convolutions in full float32 on every backend. JAX's default on GPUs is TF32
and on TPUs one bf16 pass (10 and 7 mantissa bits), which moves outputs away from timm's by the
order of 1e-3 (an estimate from those bits: no GPU was lent to measure it). tf32 is the faster
TensorFloat-32 (three bf16 passes on TPUs; plain float32 on CPUs), bf16 a bf16 model on float32
weights, as ``fit --precision bf16`` trains.
"""

MATMUL_PRECISION = {"fp32": "highest", "tf32": "tensorfloat32", "bf16": "default"}
PRECISIONS = tuple(MATMUL_PRECISION)
