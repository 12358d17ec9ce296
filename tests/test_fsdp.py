"""FSDP: ``--mesh data=N,fsdp=M`` shards parameters and optimizer state over the fsdp axis, trains
to the same numbers as data parallelism, needs less memory per device, and its checkpoints restore
onto other meshes."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import vision_ft
from tests.train_fixtures import tiny_config
from vision_ft.data.pipeline import train_batches
from vision_ft.train.config import load_config
from vision_ft.train.loop import FitRun
from vision_ft.train.rules import build_plan
from vision_ft.train.sharding import MeshError, make_mesh, parse_mesh, tensor_spec
from vision_ft.train.step import Trainer


def test_mesh_devices_are_grouped_by_process():
    """Each process feeds (and gathers eval fields from) a contiguous block of every batch: the mesh
    followed jax.devices()'s id order, which need not group a process's devices (TPU slices number
    chips by position). Devices of one process keep their given order."""
    from types import SimpleNamespace

    from vision_ft.train.sharding import in_process_order

    devices = [SimpleNamespace(id=i, process_index=p) for i, p in enumerate([0, 1, 0, 1, 2, 2])]
    assert [(d.process_index, d.id) for d in in_process_order(devices)] == [
        (0, 0), (0, 2), (1, 1), (1, 3), (2, 4), (2, 5)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, (8, 1)),
        ("data=2,fsdp=4", (2, 4)),
        ("fsdp=4", (2, 4)),
        ("fsdp=8", (1, 8)),
        ("data=8", (8, 1)),
        ("data=-1, fsdp=2", (4, 2)),
        ("data=4,fsdp=-1", (4, 2)),
        ("fsdp=-1", (1, 8)),  # both refused with "give the size of data or fsdp"
        ("data=-1", (8, 1)),
    ],
)
def test_parse_mesh(text, expected):
    assert parse_mesh(text, 8) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data=3", "do not divide"),
        ("data=2,fsdp=2", "is 4 devices"),
        ("model=2", "expected data=N,fsdp=M"),
        ("data=2,data=4", "twice"),
        ("fsdp=0", "positive"),
        ("data=-1,fsdp=-1", "give the size"),
    ],
)
def test_bad_mesh_names_the_problem(text, message):
    with pytest.raises(MeshError, match=message):
        parse_mesh(text, 8)


def test_tensor_spec_shards_the_largest_divisible_dimension():
    assert tensor_spec((3, 3, 64, 256), 4) == P(None, None, None, "fsdp")
    assert tensor_spec((1000, 384), 4) == P("fsdp", None)
    assert tensor_spec((1001, 384), 4) == P(None, "fsdp")  # 1001 is not divisible
    assert tensor_spec((256,), 4) == P()  # below min_size: replicated
    assert tensor_spec((999, 999), 4) == P()  # nothing divisible
    assert tensor_spec((1000, 384), 1) == P()


def _batches(n=3, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.random((size, 32, 32, 1), np.float32), rng.integers(0, 2, size).astype(np.int32),
         np.ones(size, np.float32))
        for _ in range(n)
    ]  # fmt: skip


def _trainer(mesh_text, tx=None, min_size=256):
    model = vision_ft.create_model("resnet18", num_classes=2, in_chans=1)
    plan = build_plan(model)
    tx = tx or optax.adamw(1e-3)
    mesh = make_mesh(mesh_text)
    return Trainer(model, plan, tx, mesh, class_weights=np.ones(2), fsdp_min_size=min_size), model


def test_fsdp_steps_match_data_parallel_and_shard_the_state():
    results = {}
    for mesh in ("data=8", "data=2,fsdp=4"):
        # SGD keeps updates proportional to gradients (Adam would magnify reduction-order noise)
        trainer, model = _trainer(mesh, optax.sgd(0.05, momentum=0.9))
        losses = [float(trainer.train_step(*b, s)["loss"]) for s, b in enumerate(_batches())]
        trainer.write_back(model)
        params = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        results[mesh] = losses, params, trainer
    (dp_losses, dp_params, _), (fs_losses, fs_params, fsdp) = results.values()
    np.testing.assert_allclose(fs_losses, dp_losses, rtol=1e-4)
    for path in dp_params:
        np.testing.assert_allclose(fs_params[path], dp_params[path], rtol=1e-4, atol=1e-6, err_msg=str(path))

    conv = fsdp.trainable["layer4"][0]["conv2"]["kernel"]
    assert conv.shape == (3, 3, 512, 512) and conv.sharding.spec == P(None, None, None, "fsdp")
    assert {s.data.shape for s in conv.addressable_shards} == {(3, 3, 512, 128)}
    # the momentum follows its parameters' layout
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(fsdp.opt_state) if leaf.ndim == 4}
    assert P(None, None, None, "fsdp") in specs
    sharded = sum(leaf.size for leaf in jax.tree.leaves(fsdp.trainable) if leaf.sharding.spec != P())
    total = sum(leaf.size for leaf in jax.tree.leaves(fsdp.trainable))
    assert sharded / total > 0.99


def test_fsdp_needs_less_memory_per_device():
    dp, _ = _trainer("data=8")
    fsdp, _ = _trainer("fsdp=8")
    shape = (16, 32, 32, 1)
    dp_bytes, fsdp_bytes = dp.step_memory(shape)["arguments"], fsdp.step_memory(shape)["arguments"]
    state = sum(x.nbytes for x in jax.tree.leaves((dp.trainable, dp.opt_state)))
    # data parallel: every device holds the whole state; fsdp=8: about an eighth of it
    assert dp_bytes > state
    assert fsdp_bytes < dp_bytes - 0.8 * state


def test_fsdp_run_matches_data_parallel_and_resumes_on_another_mesh(tmp_path):
    dp = FitRun(tiny_config(tmp_path, output=str(tmp_path / "dp")), progress=False).run()
    cfg = tiny_config(tmp_path, output=str(tmp_path / "fsdp"), mesh="data=2,fsdp=4", fsdp_min_size=256)
    fsdp = FitRun(cfg, progress=False).run()
    for key in ("loss", "accuracy", "auc"):
        assert fsdp["test"][key] == pytest.approx(dp["test"][key], rel=1e-4, abs=1e-5), key
    # the sharded checkpoint, restored onto 2 devices without fsdp
    resumed = load_config(None, {**cfg.to_dict(), "resume": True, "mesh": None})
    two = FitRun(resumed, devices=jax.devices()[:2], progress=False).run()
    for key in ("loss", "accuracy", "auc"):
        assert two["test"][key] == pytest.approx(fsdp["test"][key], rel=1e-4, abs=1e-5), key


def test_train_batches_fill_a_two_axis_mesh(tmp_path):
    run = FitRun(tiny_config(tmp_path, mesh="fsdp=4"), progress=False)
    batch = next(
        train_batches(run.data.splits["train"], run.train_geometry, batch_size=16, seed=0, start_step=0,
                      total_steps=1)
    )  # fmt: skip
    trainer = run._trainer(run.phases[0])
    images = jax.make_array_from_process_local_data(trainer.batch_sharding, batch["image"])
    # every device its own two examples, data-major as the batch is laid out
    starts = sorted(s.index[0].start for s in images.addressable_shards)
    assert starts == list(range(0, 16, 2))
    np.testing.assert_array_equal(np.asarray(images), batch["image"])


def test_an_abstract_model_measures_like_a_real_one():
    real, _ = _trainer("data=2,fsdp=4")
    abstract_model = nnx.eval_shape(lambda: vision_ft.create_model("resnet18", num_classes=2, in_chans=1))
    abstract = Trainer(
        abstract_model, build_plan(abstract_model), optax.adamw(1e-3), make_mesh("data=2,fsdp=4"),
        class_weights=np.ones(2), fsdp_min_size=256,
    )  # fmt: skip
    assert abstract.abstract and not real.abstract
    assert abstract.step_memory((16, 32, 32, 1)) == real.step_memory((16, 32, 32, 1))


def test_checkpoints_may_live_elsewhere_and_urls_pass_through(tmp_path):
    from vision_ft.train.checkpoint import checkpoint_location
    from vision_ft.train.run_dir import load_run_model

    assert str(checkpoint_location("gs://bucket/runs/a") / "latest") == "gs://bucket/runs/a/latest"
    assert str(checkpoint_location(tmp_path / "x")) == str(tmp_path / "x")
    store = tmp_path / "store" / "ckpt"
    cfg = tiny_config(tmp_path, epochs=1, checkpoint_dir=str(store), mesh="fsdp=8", fsdp_min_size=256)
    first = FitRun(cfg, progress=False).run()
    assert (store / "latest").is_dir() and not (tmp_path / "run" / "checkpoints").exists()
    model = load_run_model(tmp_path / "run")  # found through the run's config
    assert model.pretrained_cfg.num_classes == 2
    resumed = FitRun(load_config(None, {**cfg.to_dict(), "resume": True}), progress=False).run()
    assert resumed["test"]["auc"] == pytest.approx(first["test"]["auc"], abs=1e-6)
