"""What ``--precision`` of embed, eval and predict computes with (no JAX import: the CLI reads it).

fp32 runs matmuls and convolutions in full float32 on every backend. JAX's default on GPUs is TF32
and on TPUs one bf16 pass (10 and 7 mantissa bits against float32's 23). For scale: a whole bf16
lite0 (activations too, more than a bf16 pass in the matmuls alone) moved BreastMNIST's 224 px
embeddings by 13% of each image's largest value (median; cosine similarity 0.97 at worst) on a
CPU, as bf16 moves timm's (11-12%). TF32's 3 more bits round 8x finer (not measured: no GPU was
lent; ``scripts/gpu_check.sh`` measures it). tf32 is the faster TensorFloat-32 (three bf16 passes
on TPUs; plain float32 on CPUs), bf16 a bf16 model on float32 weights, as ``fit --precision bf16``
trains.
"""

MATMUL_PRECISION = {"fp32": "highest", "tf32": "tensorfloat32", "bf16": "default"}
PRECISIONS = tuple(MATMUL_PRECISION)
