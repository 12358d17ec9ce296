"""The CPU convolution fast paths compute XLA's convolution and its gradients."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vision_ft.models.layers import conv2d


def _reference(conv, x):
    kh, kw = conv.kernel_size
    sh, sw = (conv.strides, conv.strides) if isinstance(conv.strides, int) else conv.strides
    pads = conv._explicit_padding(x.shape[1], x.shape[2], kh, kw, sh, sw)
    y = jax.lax.conv_general_dilated(
        x, conv.kernel[...], (sh, sw), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=conv.feature_group_count,
    )  # fmt: skip
    return y + conv.bias[...] if conv.bias is not None else y


@pytest.mark.parametrize(
    "in_chs, out_chs, kernel, stride, groups, padding, side",
    [
        (8, 16, 3, 1, 1, "torch", 12),  # patch matmul backward
        (8, 16, 3, 2, 1, "SAME", 11),
        (3, 8, 4, 4, 1, "torch", 16),  # ConvNeXt-style stem
        (8, 16, 5, 2, 1, "torch", 13),
        (16, 8, 1, 1, 1, "torch", 9),  # 1x1 as a dot
        (16, 8, 1, 2, 1, "SAME", 9),
        (8, 8, 3, 1, 8, "torch", 10),  # depthwise
        (8, 8, 3, 2, 8, "SAME", 10),  # depthwise, strided, TF padding (extra bottom/right)
        (6, 6, 5, 2, 6, "SAME", 11),
        (6, 6, 5, 1, 6, "torch", 7),
        (4, 4, 3, 2, 4, "torch", 9),
        (8, 16, 3, 1, 1, "torch", 2),  # output smaller than the kernel
    ],
)  # fmt: skip
def test_fast_paths_match_xla_forward_and_backward(in_chs, out_chs, kernel, stride, groups, padding, side):
    conv = conv2d(in_chs, out_chs, kernel, stride=stride, groups=groups, padding=padding, bias=True,
                  rngs=nnx.Rngs(0))  # fmt: skip
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, side, side, in_chs)), jnp.float32)
    np.testing.assert_allclose(conv(x), _reference(conv, x), rtol=1e-5, atol=1e-5)
    target = jnp.asarray(np.random.default_rng(1).standard_normal(conv(x).shape), jnp.float32)

    graphdef, state = nnx.split(conv)

    def loss(state, x, reference: bool):
        module = nnx.merge(graphdef, state)
        y = _reference(module, x) if reference else module(x)
        return jnp.sum((y - target) ** 2)

    ours = jax.grad(loss, argnums=(0, 1))(state, x, False)
    theirs = jax.grad(loss, argnums=(0, 1))(state, x, True)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_batch_norm_running_statistics_follow_pytorch():
    import torch

    from vision_ft.models.layers import batch_norm

    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.standard_normal((4, 5, 6, 8))).astype(np.float32)  # NHWC, n = 4*5*6 per channel
    ref = torch.nn.BatchNorm2d(8).train()
    ours = batch_norm(8, rngs=nnx.Rngs(0))
    with torch.no_grad():
        ref.running_mean.copy_(torch.linspace(-1, 1, 8))
        ref.running_var.copy_(torch.linspace(0.5, 2, 8))
    ours.mean[...] = jnp.linspace(-1, 1, 8)
    ours.var[...] = jnp.linspace(0.5, 2, 8)
    for step in range(2):
        batch = x + step
        want = ref(torch.from_numpy(batch).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
        got = np.asarray(ours(jnp.asarray(batch), use_running_average=False))
        np.testing.assert_allclose(got, want, atol=2e-5)
        np.testing.assert_allclose(np.asarray(ours.mean[...]), ref.running_mean.numpy(), rtol=1e-6, atol=1e-6)
        # unbiased: n / (n - 1) = 120 / 119 times the batch variance, as PyTorch keeps it
        np.testing.assert_allclose(np.asarray(ours.var[...]), ref.running_var.numpy(), rtol=1e-6)
    ours.frozen_stats = True
    frozen = np.asarray(ours.var[...])
    ours(jnp.asarray(x), use_running_average=False)
    np.testing.assert_array_equal(np.asarray(ours.var[...]), frozen)


def test_training_batch_norm_matches_flax_values_and_gradients():
    from vision_ft.models.layers import batch_norm

    rng = np.random.default_rng(0)
    x = jnp.asarray(3 + 2 * rng.standard_normal((4, 5, 6, 8)), jnp.float32)
    target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ours = batch_norm(8, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0))
    for m in (ours, ref):
        m.scale[...] = jnp.linspace(0.5, 2, 8)
        m.bias[...] = jnp.linspace(-1, 1, 8)

    def loss(module, x):
        return jnp.sum(module(x, use_running_average=False) * target)

    forward = [m(x, use_running_average=False) for m in (ours, ref)]
    np.testing.assert_allclose(*forward, atol=1e-6)
    (d_ours, dx_ours), (d_ref, dx_ref) = (nnx.grad(loss, argnums=(0, 1))(m, x) for m in (ours, ref))
    np.testing.assert_allclose(dx_ours, dx_ref, atol=1e-5)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(d_ours[name][...], d_ref[name][...], rtol=1e-5, atol=1e-5)


def test_training_batch_norm_traces_activations_of_more_than_2_31_values_per_channel():
    """The backward pass's count entered the program as a Python int: past int32 (a batch of 32 at
    10000 px), tracing the train step failed with an OverflowError before any memory check."""
    from vision_ft.models.fused_norm import batch_norm_train

    def loss(x, scale, bias):
        return jnp.sum(batch_norm_train(x, scale, bias, 1e-5)[0])

    x = jax.ShapeDtypeStruct((32, 10000, 10000, 1), jnp.float32)  # traced only: nothing is allocated
    channel = jax.ShapeDtypeStruct((1,), jnp.float32)
    grads = jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), x, channel, channel)
    assert [g.shape for g in grads] == [x.shape, (1,), (1,)]


def test_batch_statistics_leave_out_the_examples_weighted_zero():
    """A blank standing in for an unreadable image (weight 0) changes neither the outputs, the
    running statistics nor the gradients of the others: the same as BatchNorm over the rest alone.
    A batch of blanks only leaves the running statistics as they were, and its values finite."""
    from vision_ft.models.layers import batch_norm, batch_statistics_over

    rng = np.random.default_rng(0)
    x = np.asarray(3 + 2 * rng.standard_normal((4, 5, 6, 8)), np.float32)
    x[2] = 0.0  # the blank
    keep = np.array([0, 1, 3])
    weights = jnp.asarray([1.0, 1.0, 0.0, 1.0])
    target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def fresh():
        module = batch_norm(8, rngs=nnx.Rngs(0))
        module.scale[...] = jnp.linspace(0.5, 2, 8)
        module.bias[...] = jnp.linspace(-1, 1, 8)
        return module

    def masked_loss(module, x):
        with batch_statistics_over(weights):
            y = module(x, use_running_average=False)
        return jnp.sum(y * target * weights[:, None, None, None])  # the loss ignores the blank too

    def subset_loss(module, x):
        return jnp.sum(module(x, use_running_average=False) * target[keep])

    masked, subset = fresh(), fresh()
    (d_masked, dx_masked), (d_subset, dx_subset) = (
        nnx.grad(loss, argnums=(0, 1))(m, jnp.asarray(v))
        for loss, m, v in ((masked_loss, masked, x), (subset_loss, subset, x[keep]))
    )
    np.testing.assert_allclose(np.asarray(dx_masked)[keep], dx_subset, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(dx_masked)[2], 0.0)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(d_masked[name][...], d_subset[name][...], rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):  # each stepped once, the variance unbiased over the 3 x 30 values
        np.testing.assert_allclose(getattr(masked, name)[...], getattr(subset, name)[...], rtol=1e-6)
    with batch_statistics_over(weights):
        y = fresh()(jnp.asarray(x), use_running_average=False)
    np.testing.assert_allclose(np.asarray(y)[keep], fresh()(jnp.asarray(x[keep]), use_running_average=False),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    blanks_only = fresh()

    def stacked_loss(module, x):  # 20 layers: scaling by rsqrt(eps) in each overflowed to NaN
        with batch_statistics_over(jnp.zeros(4)):
            for _ in range(20):
                x = module(x, use_running_average=False)
        return jnp.sum(x * target * 0.0), x

    (_, y), (grads, dx) = nnx.value_and_grad(stacked_loss, argnums=(0, 1), has_aux=True)(
        blanks_only, jnp.asarray(x)
    )
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(dx)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(np.asarray(blanks_only.mean[...]), np.zeros(8))
    np.testing.assert_array_equal(np.asarray(blanks_only.var[...]), np.ones(8))

    # one usable image at 1 x 1: one value per channel, variance 0; the blanks, normalised by it,
    # had grown by rsqrt(eps) a layer into inf, and inf x 0 made every statistic NaN
    one_usable = fresh()
    pixels = jnp.asarray(x[:, :1, :1])

    def one_usable_loss(module, x):
        with batch_statistics_over(jnp.asarray([1.0, 0.0, 0.0, 0.0])):
            for _ in range(20):
                x = module(x, use_running_average=False)
        return jnp.sum(x[0] * target[0, :1, :1]), x

    (_, y), (grads, dx) = nnx.value_and_grad(one_usable_loss, argnums=(0, 1), has_aux=True)(
        one_usable, pixels
    )
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(dx)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(np.asarray(y)[1:], 0.0)  # a blank's output is 0
    np.testing.assert_array_equal(np.asarray(one_usable.var[...]), np.ones(8))  # as PyTorch, no n=1 update


@pytest.mark.parametrize("chunk", [4, 2, 1])
def test_self_attention_matches_einsum_reference_and_its_gradient(chunk):
    """Whole batch, and attended a few images at a time (what a single CPU device does at
    inference; the gradient is always the whole batch's)."""
    from vision_ft.models.attention import self_attention

    b, n, heads, d = 4, 7, 3, 4
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.standard_normal((b, n, 3 * heads * d)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((b, n, heads * d)), jnp.float32)

    def reference(qkv):
        q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, heads, d), 2, 0)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q * d**-0.5, k), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, heads * d)

    attend = jax.jit(lambda x: self_attention(x, heads, d**-0.5, chunk))
    np.testing.assert_allclose(attend(qkv), reference(qkv), atol=1e-6)
    ours = jax.jit(jax.grad(lambda x: jnp.sum(attend(x) * target)))(qkv)
    theirs = jax.grad(lambda x: jnp.sum(reference(x) * target))(qkv)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_attention_chunks_only_on_one_cpu_device():
    from vision_ft.models.attention import images_per_chunk, self_attention

    assert jax.device_count() == 8  # conftest's simulated devices: a batch sharded over them
    assert images_per_chunk(64) == 64
    one_device = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = "from vision_ft.models.attention import images_per_chunk as c; print(c(64), c(63))"
    out = subprocess.run([sys.executable, "-c", code], env={**one_device, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.split() == ["2", "1"]
    with pytest.raises(ValueError, match="multiple of the attention chunk 2"):
        self_attention(jnp.zeros((3, 5, 18)), 2, 1.0, 2)


def test_attention_chunks_at_inference_and_trains_on_the_whole_batch():
    """Training's forward and backward attend the whole batch (faster on the Intel VM, alike on the
    AMD one); only the undifferentiated forward goes chunk by chunk."""
    from vision_ft.models.attention import self_attention

    qkv = jnp.ones((4, 5, 18))

    def loops(fn) -> int:
        return str(jax.make_jaxpr(fn)(qkv)).count("scan[")

    assert loops(lambda x: self_attention(x, 2, 1.0, 2)) == 1
    assert loops(jax.grad(lambda x: jnp.sum(self_attention(x, 2, 1.0, 2)))) == 0
    assert loops(lambda x: jax.vjp(lambda y: self_attention(y, 2, 1.0, 2), x)[0]) == 0


def test_next_key_draws_what_flax_streams_call_draws():
    from vision_ft.models.layers import next_key

    ours, flax_own = nnx.Rngs(dropout=3).dropout.fork(), nnx.Rngs(dropout=3).dropout.fork()
    for _ in range(3):
        np.testing.assert_array_equal(jax.random.key_data(next_key(ours)), jax.random.key_data(flax_own()))
    assert int(ours.count[...]) == int(flax_own.count[...]) == 3

    @jax.jit
    def draws(key_data, count):  # under jit, as in the train step: the counter is a tracer
        stream = nnx.Rngs(dropout=0).dropout
        stream.key.set_value(jax.random.wrap_key_data(key_data))
        stream.count.set_value(count)
        return jax.random.key_data(next_key(stream)), stream.count[...]

    data, count = draws(jax.random.key_data(flax_own.key[...]), flax_own.count[...])
    np.testing.assert_array_equal(data, jax.random.key_data(flax_own()))
    assert int(count) == 4


def test_training_layers_trace_without_asking_tracers_for_their_sharding(monkeypatch):
    """Each such question costs a walk over the whole jaxpr traced so far (jax builds the error
    message that answers it): quadratic in the model's size. BatchNorm's running statistics and
    DropPath's key counter are stored without one."""
    from jax._src.interpreters import partial_eval

    from vision_ft.models.layers import DropPath, batch_norm

    walks = []
    original = partial_eval.DynamicJaxprTracer._origin_msg
    monkeypatch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg",
                        lambda self: walks.append(1) or original(self))  # fmt: skip
    rngs = nnx.Rngs(0)
    norm, drop = batch_norm(4, rngs=rngs), DropPath(0.5, rngs=rngs)
    graph, state = nnx.split((norm, drop))

    @jax.jit
    def step(state, x):
        norm, drop = nnx.merge(graph, state)
        y = drop(norm(x, use_running_average=False), train=True)
        return y, nnx.state((norm, drop))

    _, new_state = step(state, jnp.ones((2, 3, 3, 4)))
    assert walks == []
    nnx.update((norm, drop), new_state)
    assert int(drop.rngs.count[...]) == 1 and not np.allclose(norm.var[...], 1.0)


def test_bf16_depthwise_sums_its_taps_in_float32_as_xla_does():
    """The taps were summed in bfloat16, one rounding per tap: a 7x7 kernel's output erred 4.6x as
    much as XLA's own bf16 convolution, which accumulates in float32."""
    from vision_ft.models.cpu_conv import depthwise_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 28, 28, 32)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((7, 7, 1, 32)) / 7, jnp.float32)
    pads = ((3, 3), (3, 3))

    def xla(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=32
        )

    exact = xla(x, kernel)
    half = (x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    ours = depthwise_conv(*half, (1, 1), pads)
    assert ours.dtype == jnp.bfloat16
    ours_error = float(jnp.abs(ours.astype(jnp.float32) - exact).max())
    xla_error = float(jnp.abs(xla(*half).astype(jnp.float32) - exact).max())
    assert ours_error <= 1.5 * xla_error, (ours_error, xla_error)


def test_bf16_depthwise_kernel_gradient_accumulates_in_float32_as_xla_does():
    """The kernel gradient summed each output row's products in bfloat16: on a 56x56 map it erred
    about 4x as much as XLA's own bf16 convolution gradient."""
    from vision_ft.models.cpu_conv import depthwise_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 56, 56, 32)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 32)) * 0.1, jnp.float32)
    grad = jnp.asarray(rng.standard_normal((8, 56, 56, 32)), jnp.float32)
    pads = ((1, 1), (1, 1))

    def xla(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=32
        )

    def kernel_grad(conv, x, kernel, grad):
        return jax.vjp(conv, x, kernel)[1](grad)[1]

    exact = kernel_grad(xla, x, kernel, grad)
    half = [a.astype(jnp.bfloat16) for a in (x, kernel, grad)]
    ours = jax.jit(lambda *a: kernel_grad(lambda x, k: depthwise_conv(x, k, (1, 1), pads), *a))(*half)
    assert ours.dtype == jnp.bfloat16
    ours_error = float(jnp.abs(ours.astype(jnp.float32) - exact).max())
    xla_error = float(
        jnp.abs(jax.jit(lambda *a: kernel_grad(xla, *a))(*half).astype(jnp.float32) - exact).max()
    )
    assert ours_error <= 1.5 * xla_error, (ours_error, xla_error)
