"""``fit``: fine-tune a model on a dataset with checkpoints, evaluation and exact resume."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vision_ft import __version__
from vision_ft.data.errors import BadImageError
from vision_ft.data.pipeline import (
    may_be_unusable,
    prefetch_to_device,
    train_batches,
)
from vision_ft.data.sources import recorded_data
from vision_ft.data.splitting import write_split_file
from vision_ft.output_dirs import remove_empty
from vision_ft.progress import ProgressBar
from vision_ft.train import report
from vision_ft.train.checkpoint import (
    CheckpointMismatchError,
    RunCheckpoints,
    abstract_like,
)
from vision_ft.train.config import ConfigError, FitConfig
from vision_ft.train.distributed import is_primary, merged_from_all_processes, stop_together
from vision_ft.train.evaluation import (
    improves_selection,
    predict_split,
    public_metrics,
    selection_score,
    split_metrics,
    test_reports,
    worst_selection_score,
)
from vision_ft.train.memory import StepMemoryError, check_step_fits
from vision_ft.train.metrics import selection_mode
from vision_ft.train.output_dir import (
    OutputDir,
    claim_output_dir,
    labels_digest,
    new_run_id,
    write_checkpoint_owner,
)
from vision_ft.train.phases import Phase, phase_optimizer, update_windows
from vision_ft.train.preemption import (
    Interrupted,
    Preempted,
    PreemptionWatch,
    clear_marker,
    mark_preempted,
)
from vision_ft.train.resume_notes import read_resume_notes, write_resume_notes
from vision_ft.train.rules import build_plan
from vision_ft.train.run_dir import (
    RUN_PREFIX,
    RunDirError,
)
from vision_ft.train.setup import set_up_run
from vision_ft.train.sharding import MeshError, make_mesh
from vision_ft.train.step import Augment, Trainer, freeze_batchnorm, to_global

log = logging.getLogger("vision_ft.fit")


class FitRun:
    """One fine-tuning run: data, model, phases, checkpoints and reporting."""

    def __init__(self, cfg: FitConfig, *, devices=None, progress: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.progress = progress
        try:
            self.mesh = make_mesh(cfg.mesh, devices)
        except MeshError as e:
            raise ConfigError(str(e)) from None
        n_dev = self.mesh.devices.size
        if cfg.batch_size % n_dev or cfg.eval_batch_size % n_dev:
            raise ConfigError(f"batch_size and eval_batch_size must be multiples of the {n_dev} devices")
        claimed = claim_output_dir(cfg)
        self._lock = claimed.lock
        try:
            self._prepare(claimed)
        except BaseException:
            self.release_output()
            raise

    def _prepare(self, claimed: OutputDir) -> None:
        """The claimed run's set-up, on every process, and its first files."""
        self.checkpoint_dir, self.saved_by_release = claimed.checkpoint_dir, claimed.saved_by_release
        # which run the checkpoints belong to: a resume keeps the run's (runs from before have none)
        # (claimed.cfg: the rerun of a preempted run resumes it)
        self.run_id = (claimed.saved or {}).get("run_id") if claimed.cfg.resume else new_run_id()
        set_up, error = None, None
        try:
            set_up = set_up_run(claimed.cfg, claimed.saved, self.checkpoint_dir, self.out)
        except Exception as e:  # re-raised below, on this process and the others
            error = e
        try:
            # a check that fails on one host alone (its data, its run directory, its weights file)
            # stops every process: the others would wait for it in their first collective
            stop_together(error, "set-up")
        except Exception:
            remove_empty(claimed.made)  # a refused command leaves no new, empty folder behind
            raise
        # as attributes of the run: the loop's and a notebook's view of it
        vars(self).update({field.name: getattr(set_up, field.name) for field in dataclasses.fields(set_up)})
        cfg = self.cfg
        if is_primary() and not cfg.resume:
            # first of a new run's files, which marks the directory as a run's (a compile that fails
            # leaves one the corrected command may reuse); run() writes it again
            self._write_run_config()
        if self.data.index is not None and is_primary() and not cfg.resume:
            # last, once every check has passed: a refused command leaves the directory as it was; a
            # resume keeps the run's file (checked above), which other processes may be reading
            partial = self.out / "splits.csv.tmp"
            write_split_file(partial, self.data.index.splits, None, class_names=self.data.class_names)
            partial.replace(self.out / "splits.csv")
        self.checkpoints = RunCheckpoints(self.checkpoint_dir, best_mode=selection_mode(cfg.select_metric))
        if is_primary() and not cfg.resume:
            write_checkpoint_owner(self.checkpoint_dir, self.run_id, self.out)

    def _write_run_config(self) -> None:
        cfg = self.cfg
        report.write_json(
            self.out / "config.json",
            {
                **cfg.to_dict(),
                # eval and predict read it from wherever they start
                "data": recorded_data(cfg.data),
                "num_classes": self.num_classes,
                "class_names": list(self.data.class_names),
                "split_sizes": {name: len(split) for name, split in self.data.splits.items()},
                "labels_digest": labels_digest(self.data),  # a resume on other data is refused
                # what the losses in metrics.jsonl and final.json weigh classes by; eval reads it
                "loss_class_weights": [float(w) for w in self.class_weights],
                "multi_label": self.multi_label,
                "in_chans": self.channels,
                "pretrained_cfg": dataclasses.asdict(self.model.pretrained_cfg),
                # how validation and test resized: eval, predict and embed do the same
                "eval_crop_mode": self.eval_geometry.eval_crop_mode,
                # so that a run directory says which release's semantics wrote it
                "vision_ft_version": __version__,
                **({"run_id": self.run_id} if self.run_id else {}),
            },
        )

    # -- phases ---------------------------------------------------------------------------------
    def _trainer(self, phase: Phase) -> Trainer:
        """The phase's trainer for the run's model, its eval steps compiling in the background."""
        trainer, plan = self._build_trainer(phase, self.model)
        trainable = sum(s.trainable for s in plan.values())
        log.info(
            "phase %s: %d/%d parameter tensors trainable, lr %.2e", phase.name, trainable, len(plan), phase.lr
        )
        cfg = self.cfg
        size = self.eval_geometry.img_size
        eval_images = jax.ShapeDtypeStruct((cfg.eval_batch_size, size, size, self.channels), jnp.float32)
        self._check_memory(trainer, compile=False)  # before XLA spends minutes on a hopeless size
        trainer.compile_in_background(eval_images)
        return trainer

    def _build_trainer(self, phase: Phase, model: nnx.Module) -> tuple[Trainer, dict]:
        cfg = self.cfg
        plan = build_plan(model, freeze=phase.freeze, lr_rules=cfg.lr_rules, layer_decay=phase.layer_decay)
        freeze_batchnorm(model, plan, enabled=not cfg.train_bn)
        tx, learning_rate = phase_optimizer(cfg, phase, plan, self.steps_per_epoch)
        trainer = Trainer(
            model,
            plan,
            tx,
            self.mesh,
            class_weights=self.class_weights,
            label_smoothing=cfg.label_smoothing,
            ema_decay=cfg.ema_decay,
            ema_warmup=cfg.ema_warmup,
            ema_first_step=phase.first_step,
            windows=update_windows(cfg, self.steps_per_epoch),
            tta_flip=cfg.tta_flip,
            tta_shift=cfg.tta_shift,
            multi_label=self.multi_label,
            fsdp_min_size=cfg.fsdp_min_size,
            mask_batch_statistics=may_be_unusable(self.data.splits["train"]),
            augment=Augment(
                hflip=self.augment_settings["hflip"],
                vflip=self.augment_settings["vflip"],
                rot90=self.augment_settings["rot90"],
                translate=self.augment_settings["translate"],
                color_jitter=self.augment_settings["color_jitter"],
                mixup=cfg.mixup,
                cutmix=cfg.cutmix,
            ),
            seed=cfg.seed,
            learning_rate=learning_rate,
        )
        return trainer, plan

    def _check_steps_fit(self, trainer: Trainer, phase: Phase) -> None:
        """Compile ``trainer``'s step and check its memory, then that of every later phase (a
        ``fine_tune`` recipe's unfrozen one needs the most) on an abstract copy of the model: a
        phase that cannot fit is refused at the start, not after the epochs before it."""
        self._check_memory(trainer, compile=True, phase=phase)
        later = [p for p in self.phases if p.first_step > phase.first_step]
        if later:
            abstract = nnx.eval_shape(lambda: self.model)
            for p in later:
                self._check_memory(self._build_trainer(p, abstract)[0], compile=True, phase=p)

    def _check_memory(self, trainer: Trainer, *, compile: bool, phase: Phase | None = None) -> None:
        """Refuse a train step that cannot fit in a device's memory before any batch is loaded: by the
        input batch alone, or by XLA's analysis of the step, compiled now for the batches it will get
        (the first step finds it in jit's cache)."""
        geometry, batch = self.train_geometry, self.cfg.batch_size
        images = (batch, geometry.img_size, geometry.img_size, geometry.channels or 1)
        error = None
        try:
            if compile:
                labels = self.data.splits["train"].labels.shape[1:]
                needed = trainer.step_memory(images, labels)["peak_estimate"]
                named = phase is not None and len(self.phases) > 1
                what = f"phase {phase.name}'s train step" if named else "the train step"
            else:  # float32, spread over every device at best
                needed, what = math.prod(images) * 4 // trainer.num_devices, "its input batch alone"
            check_step_fits(
                needed, trainer.mesh.local_devices[0], batch_size=batch, img_size=geometry.img_size, what=what
            )
        except StepMemoryError as e:
            error = e
        stop_together(error, "train step's memory check")

    def _phase_at(self, step: int) -> Phase:
        return next(p for p in self.phases if p.first_step <= step < p.last_step)

    # -- checkpoint state -------------------------------------------------------------------------
    def _weights(self, trainer: Trainer, step: int, *, evaluated: bool = True) -> dict:
        """What the best checkpoint keeps: the evaluated weights (the EMA, where enabled), enough to
        evaluate or embed."""
        trainer.write_back(self.model, evaluated=evaluated)
        weights = jax.tree.map(
            lambda x: x,  # new containers: the model gets the trained weights back below
            {"params": nnx.state(self.model, nnx.Param), "stats": nnx.state(self.model, nnx.BatchStat)},
        )
        trainer.write_back(self.model)
        return {**weights, "step": np.asarray(step, np.int32)}

    def _state(self, trainer: Trainer, step: int, best_score: float) -> dict:
        """What the latest checkpoint keeps: everything ``--resume`` needs to continue exactly."""
        state = {
            **self._weights(trainer, step, evaluated=False),
            "opt_state": trainer.opt_state,
            "best_score": np.asarray(best_score, np.float32),
        }
        if trainer.ema is not None:
            state["ema"] = trainer.ema
        return state

    # -- evaluation -----------------------------------------------------------------------------
    def predict_split(
        self, trainer: Trainer, split: str, *, shifted: bool = True
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        cfg = self.cfg
        return predict_split(
            trainer, self.data.splits[split], self.eval_geometry, self.bad_examples,
            batch_size=cfg.eval_batch_size, threads=cfg.loader_threads, workers=cfg.workers, shifted=shifted,
        )  # fmt: skip

    def evaluate(self, trainer: Trainer, split: str, *, shifted: bool = True) -> dict:
        labels, logits, _ = self.predict_split(trainer, split, shifted=shifted)
        return self._metrics(labels, logits)

    def _metrics(self, labels: np.ndarray, logits: np.ndarray) -> dict:
        return split_metrics(labels, logits, self.class_weights, multi_label=self.multi_label)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train, evaluate and report; the lock on ``--output`` is let go however it ends."""
        try:
            return self._run()
        finally:
            self.release_output()

    def _run(self) -> dict:
        cfg = self.cfg
        started = time.time()
        primary = is_primary()
        step, best_score, phase = 0, worst_selection_score(cfg.select_metric), self.phases[0]
        if cfg.resume:
            step, best_score, phase, trainer = self._resume()
        else:
            trainer = self._trainer(phase)
        self._check_steps_fit(trainer, phase)  # after a resume's restore and checks: it compiles
        # only once every check has passed is the run's directory changed: a refused resume leaves its
        # metrics log (which a resume cuts back to the checkpoint), TensorBoard events and config. The
        # claim read a resumed log already, so a damaged one was refused before the compile
        metrics_log, error = None, None
        try:  # each host reads the log in its own --output: one that is damaged stops all
            metrics_log = report.MetricsLog(self.out, resume_step=step if cfg.resume else None, write=primary)
        except RunDirError as e:
            error = e
        stop_together(error, "metrics log")
        if primary:
            self._write_run_config()
        has_val = "val" in self.data.splits
        train_split = self.data.splits["train"]
        epoch_losses: list = []
        if cfg.resume:
            epoch_losses = self._resumed_notes(step)
        progress = ProgressBar(
            "fit", self.total_steps, enabled=self.progress and is_primary(),
            images_per_unit=cfg.batch_size, fields=("loss",),
        )  # fmt: skip
        watch, batches = PreemptionWatch(), None
        try:
            progress.start_at(step)
            batches = train_batches(
                train_split, self.train_geometry, batch_size=cfg.batch_size, seed=cfg.seed, start_step=step,
                total_steps=self.total_steps, process_index=jax.process_index(),
                process_count=jax.process_count(), threads=cfg.loader_threads, workers=cfg.workers,
            )  # fmt: skip
            batches = prefetch_to_device(batches, trainer.batch_sharding)
            while step < self.total_steps:
                current = self._phase_at(step)
                if current is not phase:
                    trainer.write_back(self.model)
                    phase, trainer = current, self._trainer(current)
                on_device, batch = next(batches)
                failure = None
                if batch["bad"].any():
                    try:
                        self.bad_examples.note(train_split, batch, self.train_geometry)
                    except BadImageError as e:
                        if jax.process_count() == 1:
                            raise
                        failure = e  # raised below by every process together
                out = trainer.train_step(*on_device, step)
                epoch_losses.append(out["loss"])
                step += 1
                if progress.enabled and step % 10 == 0:  # reading the loss waits for the step
                    progress.update(step, loss=f"{float(out['loss']):.4f}")
                else:
                    progress.update(step)
                end_of_epoch = step % self.steps_per_epoch == 0
                if end_of_epoch:
                    epoch = step // self.steps_per_epoch
                    metrics_log.log(
                        "train", epoch, step, {"loss": float(np.mean(jax.device_get(epoch_losses)))}
                    )
                    epoch_losses = []
                    if has_val:
                        val = self.evaluate(trainer, "val", shifted=cfg.val_tta_shift)
                        metrics_log.log("val", epoch, step, val)
                        score = selection_score(val, cfg.select_metric)
                        progress.note(f"epoch {epoch}: val {cfg.select_metric} {val[cfg.select_metric]:.4f}")
                        if improves_selection(score, best_score, cfg.select_metric):
                            best_score = score
                            self.checkpoints.save_best(step, self._weights(trainer, step), score)
                stop_requested, failed = watch.requested(failed=failure is not None)
                if failed:
                    raise failure or BadImageError(
                        "a training image read by another process",
                        "unusable (on_bad_image: fail); its log names it",
                    )
                preempted = step < self.total_steps and stop_requested
                if preempted or end_of_epoch or (cfg.save_every_steps and step % cfg.save_every_steps == 0):
                    # the notes first: a process that dies between the two leaves notes a step ahead
                    # of the latest checkpoint, harmless (the last few steps' are kept), not a
                    # checkpoint a resume would find without the epoch's losses
                    bad = merged_from_all_processes(self.bad_examples.reasons)  # every process, together
                    if primary:
                        write_resume_notes(self.out, step, jax.device_get(epoch_losses), bad)
                    self.checkpoints.save_latest(step, self._state(trainer, step, best_score))
                if preempted:
                    progress.close()
                    metrics_log.close()
                    self.checkpoints.close()
                    if watch.interrupted:  # the user's choice: the same command does not resume it,
                        clear_marker(self.out)  # even where this run was itself a preempted one's rerun
                        raise Interrupted(step, self.out)
                    mark_preempted(self.out, step)
                    raise Preempted(step, self.out)
            # until the reports are written, rerunning the command finishes the run: a SIGTERM in
            # the last step or while finishing (it completes if the grace period allows), a kill or
            # a failure here leave the marker, and the resume from the final checkpoint only finishes
            mark_preempted(self.out, step)
            progress.close()
            final = self._finish(trainer, metrics_log, started)
        finally:
            watch.close()  # also when preempted or failing: SIGTERM ends a script or notebook again
            if batches is not None:  # its worker processes stop, and free the batches they hold
                batches.close()
        clear_marker(self.out)
        metrics_log.close()
        self.checkpoints.close()
        return final

    def release_output(self) -> None:
        """Let another fit write ``--output``: at the end of ``run``, or of a refused set-up."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _resumed_notes(self, step: int) -> list:
        """The losses of the steps the resumed epoch had run (its train record averages them all),
        and the unusable images met before the resume (final.json reports them)."""
        notes = read_resume_notes(self.out, step)
        self.bad_examples.reasons.update(notes.bad_examples)
        if notes.epoch_losses is not None:
            return notes.epoch_losses
        if step % self.steps_per_epoch and is_primary():  # hosts with their own --output hold none
            log.warning(
                "--resume: %s records no train losses for step %d; epoch %d's train loss averages the "
                "steps after the resume only", self.out, step, step // self.steps_per_epoch + 1,
            )  # fmt: skip
        return []

    def _resume(self) -> tuple[int, float, Phase, Trainer]:
        """The step, best score, phase and trainer of the latest checkpoint: the trainer of the phase
        that saved it, with the restored weights loaded into its compiled steps."""
        latest = self.checkpoints.latest_step()
        if latest is None:
            logged = report.MetricsLog.read(self.out / "metrics.jsonl")
            # past its first epoch, or finished (a one-epoch run's test record): it saved, somewhere
            # else, and its best checkpoint is not to be discarded
            if any(r["step"] > self.steps_per_epoch or r["split"] == "test" for r in logged):
                raise RunDirError(f"--resume: no checkpoint in {self.checkpoint_dir}")
            # stopped between its first epoch's end and its first checkpoint (out of memory in the
            # first validation, killed): nothing to resume, and nothing to lose by starting again
            log.warning("--resume: %s holds no checkpoint yet; the run starts again", self.checkpoint_dir)
            self.checkpoints.discard_best()
            phase = self.phases[0]
            return 0, worst_selection_score(self.cfg.select_metric), phase, self._trainer(phase)
        # a checkpoint saved at the end of a phase's last step holds that phase's optimizer state and
        # EMA; the loop then switches to the next phase as an uninterrupted run does
        phase = self._phase_at(max(latest - 1, 0))
        trainer = self._trainer(phase)
        try:
            _, restored = self.checkpoints.restore_latest(abstract_like(self._state(trainer, 0, 0.0)))
        except CheckpointMismatchError as e:
            saved_by = self.saved_by_release
            if saved_by is None or saved_by == __version__:
                raise
            raise CheckpointMismatchError(
                f"{e}; the run was saved by vision-ft {saved_by} and this is {__version__}: resume it "
                f"with {saved_by}, or fine-tune anew from its weights (--pretrained {RUN_PREFIX}{self.out})"
            ) from None
        self._check_accumulation_window(restored, phase)
        nnx.update(self.model, restored["params"], restored["stats"])
        trainer.load_weights(self.model)
        trainer.opt_state = to_global(restored["opt_state"], trainer.shardings["opt_state"])
        if trainer.ema is not None:
            trainer.ema = to_global(
                restored["ema"], (trainer.shardings["trainable"], trainer.shardings["stats"])
            )
        log.info("resumed from step %d", int(restored["step"]))
        return int(restored["step"]), float(restored["best_score"]), phase, trainer

    def _check_accumulation_window(self, restored: dict, phase: Phase) -> None:
        """Raise ``CheckpointMismatchError`` where the checkpoint's gradient accumulation is not
        where this release's windows put it: checkpoints saved before windows restarted every
        epoch carry a window across epochs, which the host's learning rate and EMA would not follow."""
        opt_state = restored["opt_state"]
        if self.cfg.accumulate_steps == 1 or not hasattr(opt_state, "mini_step"):
            return
        step = int(restored["step"])
        windows = update_windows(self.cfg, self.steps_per_epoch)
        within = (step - phase.first_step) % self.steps_per_epoch
        # after r steps of the phase: r's place in its window, and the updates completed
        expected = (within % self.cfg.accumulate_steps, windows.update_index(step - phase.first_step))
        found = (int(np.asarray(opt_state.mini_step)), int(np.asarray(opt_state.gradient_step)))
        if found != expected:
            raise CheckpointMismatchError(
                f"--resume: the checkpoint at step {step} in {self.checkpoint_dir} accumulates gradients "
                f"across epochs (window step {found[0]}, update {found[1]}; this release restarts windows "
                f"every epoch: {expected[0]}, {expected[1]}); fine-tune anew from its weights "
                f"(--pretrained {RUN_PREFIX}{self.out})"
            )

    def _finish(self, trainer: Trainer, metrics_log: report.MetricsLog, started: float) -> dict:
        """Evaluate the best checkpoint (by validation metric) on the test split and write reports
        (from process 0; every process evaluates, since evaluation is a collective)."""
        primary = is_primary()
        # each process noted the unusable training files of its own slices of the batches; merged
        # first, before process 0 alone writes reports (one failing there must not strand the rest)
        self.bad_examples.reasons = merged_from_all_processes(self.bad_examples.reasons)
        best_step = self.checkpoints.best_step()
        if best_step is not None:
            _, restored = self.checkpoints.restore_best(abstract_like(self._weights(trainer, 0)))
            nnx.update(self.model, restored["params"], restored["stats"])
            trainer.load_weights(self.model)
        best_val = next(
            (r for r in metrics_log.records if r["split"] == "val" and r["step"] == best_step), None
        )
        final: dict = {"best_val": public_metrics(best_val) if best_val else None}
        if "test" in self.data.splits:
            labels, logits, ids = self.predict_split(trainer, "test")
            test = self._metrics(labels, logits)
            final["test"] = public_metrics(test)
            epoch = best_val["epoch"] if best_val else self.cfg.epochs
            metrics_log.log("test", epoch, best_step or self.total_steps, test)
            if primary:
                final["test_clinical"] = test_reports(
                    labels,
                    logits,
                    ids,
                    test,
                    list(self.data.class_names),
                    self.out,
                    multi_label=self.multi_label,
                )
        if primary:
            report.plot_learning_curves(metrics_log.records, self.out / "learning_curves.png")
        final["best_step"] = best_step
        bad = self.bad_examples.reasons
        final["bad_examples"] = {"count": len(bad), "examples": dict(bad)}
        final["wall_seconds"] = round(time.time() - started, 1)
        if primary:
            report.write_json(self.out / "final.json", final)
        return final
