"""Mutation check: remove each protection and watch its test fail (``make mutants``).

Each :class:`Mutant` names a file, a piece of its text (which must occur exactly once), what replaces it
(the protection removed or broken) and the few tests that must then fail. The script copies the working
tree (tracked and untracked, not ignored files) into a temporary directory, runs every selected test there
once unmutated (they must pass: a test that fails anyway proves nothing), then applies one mutant at a time,
runs its tests with ``pytest -x`` and restores the file. A mutant is *caught* when pytest reports failing
tests (exit code 1); a collection error, a timeout or passing tests count as *missed*. Exit status 1 when
any mutant is missed or the baseline fails.

    python tests/mutants.py [--only NAME ...] [--list] [--no-baseline] [--keep]

Tests run with ``PYTHONPATH`` set to the copy (the editable install would import the original tree) and
without bytecode files (a restored file must never run as its mutant's cached bytecode).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DDP_GRADS = "tests/test_distributed.py::test_two_workers_apply_the_gradient_of_one[ddp-1]"
DS_GRADS = "tests/test_distributed.py::test_two_workers_apply_the_gradient_of_one[deepspeed-2]"
MICRO_GRADS = "tests/test_distributed.py::test_micro_batches_accumulate_to_the_global_batch"
SG2_RESUME = "tests/test_distributed.py::test_two_stylegan2_workers_resume_exactly"
HOSTILE = "tests/faults/test_hostile_checkpoints.py"
NONFINITE = "tests/faults/test_nonfinite.py"
TRUNCATED = "tests/faults/test_bad_data.py::test_truncated_tar_names_its_shard_and_the_next_shard_is_read"
BAD_KIND = "tests/faults/test_bad_data.py::test_each_bad_kind_is_skipped_and_reported_with_shard_and_key"
T2T = "tests/test_translation_recipes.py::"
T2R = "tests/test_translation_runs.py::"
STAB = "tests/test_stability.py::"
ANTI = "tests/test_anti_collapse.py::"
SG1 = "tests/test_stylegan_networks.py::"


@dataclass(frozen=True)
class Mutant:
    """One protection removed: ``original`` (exactly once in ``file``) becomes ``mutated``; ``tests`` must fail."""

    name: str
    what: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "ddp-sum-not-mean",
        "DDP sums the workers' gradients (loss × world size) instead of averaging them",
        "orchestrator/dist/ddp.py",
        "self.accelerator.backward(loss / num_micro)",
        "self.accelerator.backward(loss * self.accelerator.num_processes / num_micro)",
        (DDP_GRADS,),
    ),
    Mutant(
        "ddp-micro-division",
        "DDP backward without the division by the number of micro-batches",
        "orchestrator/dist/ddp.py",
        "self.accelerator.backward(loss / num_micro)",
        "self.accelerator.backward(loss)",
        (DDP_GRADS,),
    ),
    Mutant(
        "local-micro-division",
        "single-process backward without the division by the number of micro-batches",
        "orchestrator/dist/local.py",
        "self.precision.scaler.scale(loss / num_micro).backward()",
        "self.precision.scaler.scale(loss).backward()",
        (MICRO_GRADS,),
    ),
    Mutant(
        "ddp-sync-every-micro-batch",
        "DDP synchronises on every micro-batch (sync() ignores `last`)",
        "orchestrator/dist/ddp.py",
        "        if not last:\n",
        "        if False:\n",
        (DDP_GRADS,),
    ),
    Mutant(
        "deepspeed-accumulation-scale",
        "DeepSpeed backward scales the loss by the micro-batch count",
        "orchestrator/dist/deepspeed.py",
        "engine.backward(loss)  #",
        "engine.backward(loss * num_micro)  #",
        (DS_GRADS,),
    ),
    Mutant(
        "checkpoint-checksum",
        "checkpoint files are loaded without comparing their sha256 with COMPLETE.json",
        "orchestrator/checkpoint.py",
        "if not f.exists() or sha256_file(f) != want:",
        "if not f.exists():",
        (f"{HOSTILE}::test_files_changed_after_writing_are_refused_naming_them",),
    ),
    Mutant(
        "complete-json-entries",
        "a COMPLETE.json that does not list state.pt and config.yaml is accepted",
        "orchestrator/checkpoint.py",
        "if not isinstance(sums, dict) or STATE not in sums or CONFIG not in sums:",
        "if not isinstance(sums, dict):",
        (f"{HOSTILE}::test_a_broken_completion_marker_is_refused_naming_it",),
    ),
    Mutant(
        "holdout-train-dedup",
        "images equal to a held-out image stay in the training split",
        "orchestrator/data/write.py",
        "train = [i for i in order[n_hold:] if pixels(i) not in held_hashes]",
        "train = list(order[n_hold:])",
        ("tests/test_data.py::test_duplicates_never_cross_the_split",),
    ),
    Mutant(
        "truncated-tar-check",
        "a shard cut at or inside a member header passes for a complete one",
        "orchestrator/data/shards.py",
        "if url not in reported and not ends_like_a_tar(url):",
        "if False:",
        (f"{TRUNCATED}[mid-header]", f"{TRUNCATED}[at-member-boundary]"),
    ),
    Mutant(
        "rng-restore-on-resume",
        "a resumed worker does not restore its global RNG state (noise, style mixing)",
        "orchestrator/train/run.py",
        '        torch.set_rng_state(mine["torch_rng"])\n',
        "",
        (SG2_RESUME,),
    ),
    Mutant(
        "pl-mean-per-rank",
        "a resumed worker continues from rank 0's path-length mean instead of its own",
        "orchestrator/recipes/noise_to_image.py",
        'mine = ranks[dist.get_rank()] if ranks is not None and len(ranks) == world else state["pl_mean"]',
        'mine = state["pl_mean"]',
        (SG2_RESUME,),
    ),
    Mutant(
        "nan-guard",
        "gradients holding NaN/Inf are applied (the non-finite check always says finite)",
        "orchestrator/dist/strategy.py",
        "return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())",
        "return False",
        (f"{NONFINITE}::test_a_few_bad_steps_are_skipped_and_counted_and_weights_stay_finite",),
    ),
    Mutant(
        "fp32-fallback-autocast",
        "after a rollback with fp32_fallback, autocast stays on",
        "orchestrator/dist/local.py",
        "    def use_fp32(self) -> None:\n        self.fp32 = True",
        "    def use_fp32(self) -> None:\n        self.fp32 = False",
        (f"{NONFINITE}::test_fp32_fallback_runs_the_forward_passes_in_fp32_and_is_remembered",),
    ),
    Mutant(
        "fp32-fallback-blocks",
        "after a rollback with fp32_fallback, StyleGAN2's reduced-precision blocks stay",
        "orchestrator/dist/local.py",
        "            self.unwrap(name).reduced_dtype = None\n",
        "            pass\n",
        (f"{NONFINITE}::test_fp32_fallback_turns_off_stylegan2_reduced_precision_blocks",),
    ),
    Mutant(
        "rollback-lowers-lr",
        "a NaN/Inf rollback keeps the learning rate",
        "orchestrator/faults.py",
        "self.state.lr_scale *= self.cfg.lr_factor",
        "self.state.lr_scale *= 1.0",
        (f"{NONFINITE}::test_k_bad_steps_in_a_row_roll_back_with_a_lower_learning_rate",),
    ),
    Mutant(
        "checkpoint-weights-only",
        "state.pt is unpickled with weights_only=False (pickled code runs)",
        "orchestrator/checkpoint.py",
        "torch.load(path / STATE, map_location=map_location, weights_only=True)",
        "torch.load(path / STATE, map_location=map_location, weights_only=False)",
        (
            f"{HOSTILE}::test_pickled_code_never_runs[load_checkpoint-nested]",
            f"{HOSTILE}::test_pickled_code_never_runs[resume-whole]",
        ),
    ),
    Mutant(
        "label-range",
        "labels outside [0, num_classes) are accepted",
        "orchestrator/data/shards.py",
        "if not 0 <= label < spec.num_classes:",
        "if False:",
        (f"{BAD_KIND}[label10]", f"{BAD_KIND}[labelneg]"),
    ),
    Mutant(
        "bad-fraction-stop",
        "the loader never stops on too many bad samples",
        "orchestrator/data/shards.py",
        "if self.read >= self.min_samples and self.bad > self.max_bad_fraction * self.read:",
        "if False:",
        ("tests/faults/test_bad_data.py::test_training_stops_over_the_bad_fraction_naming_the_worst_shard",),
    ),
    Mutant(
        "stale-stop-file",
        "a STOP file left from an earlier stop is not removed at start",
        "orchestrator/faults.py",
        "self.stop_file.unlink(missing_ok=True)  # a request",
        "pass  # a request",
        ("tests/faults/test_preemption.py::test_a_stale_stop_file_does_not_stop_the_next_start",),
    ),
    Mutant(
        "batch-split-check",
        "a global batch that does not split into workers × micro-batches is accepted",
        "orchestrator/train/preflight.py",
        "if micro < 1 or batch % (world_size * micro):",
        "if micro < 1:",
        ("tests/faults/test_config_rules.py::test_global_batch_must_split_into_workers_and_micro_batches",),
    ),
    Mutant(
        "evaluator-not-niced",
        "the evaluator's threads keep training's CPU priority (eval.nice is ignored)",
        "orchestrator/eval/service.py",
        "os.setpriority(os.PRIO_PROCESS, tid, max(nice, niceness(tid)))",
        "pass",
        ("tests/test_eval_service.py::test_the_evaluation_thread_runs_niced_with_its_own_threads",),
    ),
    Mutant(
        "evaluator-not-sched-idle",
        "the evaluator's threads stay in the normal scheduling class (eval.sched_idle is ignored)",
        "orchestrator/eval/service.py",
        'if idle and hasattr(os, "SCHED_IDLE"):',
        "if False:",
        ("tests/test_eval_service.py::test_the_evaluation_thread_runs_niced_with_its_own_threads",),
    ),
    Mutant(
        "upload-twin-copied",
        "the checkpoint's twin for Ray's background upload is a copy (every byte written again), not hard links",
        "launch/ray_worker.py",
        "shutil.copytree(checkpoint, stage, copy_function=os.link)",
        "shutil.copytree(checkpoint, stage)",
        ("tests/test_ray.py::test_the_upload_twin_shares_the_checkpoints_files_and_outlives_it",),
    ),
    Mutant(
        "ray-worker-keeps-nice-15",
        "the training workers keep the niceness 15 Ray starts them at (ray.worker_nice is ignored)",
        "launch/ray_worker.py",
        "os.setpriority(os.PRIO_PROCESS, tid, nice)",
        "pass",
        ("tests/test_eval_service.py::test_training_workers_take_back_the_priority_ray_lowered",),
    ),
    Mutant(
        "biggan-compile-allowed",
        "BigGAN no longer declares that it does not compile (train.compile: true would crash in D's backward)",
        "architectures/biggan.py",
        'truncation="resample", compiles=False, d_blocks=True)',
        'truncation="resample", compiles=True, d_blocks=True)',
        ("tests/test_compile.py::test_compile_is_refused_for_a_family_that_does_not_compile",),
    ),
    Mutant(
        "compiled-double-backward",
        "with train.compile, R1 and path length run through the compiled graphs (no eager stance)",
        "orchestrator/recipes/recipe.py",
        'return torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext()',
        "return contextlib.nullcontext()",
        ("tests/test_compile.py::test_stylegan2_compiled_with_eager_regularizers_matches_eager",),
    ),
    Mutant(
        "import-unpickler-allows-any-global",
        "ganforge import's network unpickler resolves any global a pickle names (os.system, exec, …)",
        "orchestrator/tools/imports/pickles.py",
        '        hint = ""',
        '        return super().find_class(module, name)\n        hint = ""',
        ("tests/test_import.py::test_code_in_a_pickle_is_refused_and_never_runs",),
    ),
    Mutant(
        "import-leftover-tensors-ignored",
        "an imported file's tensor that has no place in ganforge's network is dropped silently",
        "orchestrator/tools/imports/common.py",
        "            leftover.append(name)\n",
        "            pass\n",
        (
            "tests/test_import.py::test_a_tensor_missing_extra_or_misshaped_is_named[extra]",
            "tests/test_import.py::test_biggan_leftover_tensor_is_named",
        ),
    ),
    Mutant(
        "ada-pad-zeros",
        "ADA's geometric warp pads with zeros instead of reflecting the image (black borders after shifts)",
        "orchestrator/augment/ada.py",
        'images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")',
        "images = F.pad(images, [mx0, mx1, my0, my1])",
        (
            "tests/test_augment.py::test_xint_equals_a_reflect_padded_integer_shift",
            "tests/test_augment.py::test_reflect_padding_is_used_by_continuous_ops_too",
        ),
    ),
    Mutant(
        "ada-p-ignored",
        "ADA's operations fire with probability `strength` whatever the augmentation probability p",
        "orchestrator/augment/ada.py",
        "return strength * self.p",
        "return strength * torch.ones_like(self.p)",
        (
            "tests/test_augment.py::test_p_zero_is_the_identity_for_every_preset",
            "tests/test_augment.py::test_p_is_a_tensor_buffer_and_scales_how_often_ops_fire",
        ),
    ),
    Mutant(
        "augment-skips-fakes",
        "D's fakes reach it un-augmented (only the reals are augmented: D learns to tell them apart by the augmentation)",
        "orchestrator/recipes/noise_to_image.py",
        'fake_logits, fake_classes = scores(ctx.nets["D"], fake.detach(), c_fake, cfg, aug)',
        'fake_logits, fake_classes = scores(ctx.nets["D"], fake.detach(), c_fake, cfg, lambda x: x)',
        ("tests/test_ada.py::test_every_image_d_sees_is_augmented",),
    ),
    Mutant(
        "ada-p-not-restored",
        "a resumed run starts ADA's p again from its initial value (the official code's resume)",
        "orchestrator/augment/control.py",
        '            self.pipe.p.copy_(state["p"])',
        "            pass",
        ("tests/test_ada.py::test_a_run_with_ada_resumes_exactly_p_included",),
    ),
    Mutant(
        "ada-adjust-every-step",
        "ADA's p moves every step instead of every augment.interval steps",
        "orchestrator/augment/control.py",
        "        if step % cfg.interval == 0:  # the official loop's batch_idx % ada_interval",
        "        if True:",
        ("tests/test_ada.py::test_adaptive_p_moves_by_the_official_formula",),
    ),
    Mutant(
        "freeze-d-thawed-by-g-phase",
        "the G phase thaws all of D afterwards, so Freeze-D's blocks train again from the next D step",
        "orchestrator/recipes/recipe.py",
        "        for p in thaw:\n            p.requires_grad_(True)",
        "        for name in phase.frozen:\n            ctx.raw[name].requires_grad_(True)",
        ("tests/test_finetune.py::test_freeze_d_keeps_the_first_blocks_through_d_and_g_phases",),
    ),
    Mutant(
        "mirror-not-flipped",
        "data.mirror repeats each sample without flipping it",
        "orchestrator/data/shards.py",
        "return img.flip(-1), label, None if inp is None else inp.flip(-1)",
        "return img, label, inp",
        ("tests/test_data.py::test_mirror_doubles_the_data_with_flipped_images_and_the_same_labels",),
    ),
    Mutant(
        "wandb-eval-at-its-step",
        "a late evaluation is logged at W&B's own step (step=): W&B drops it, or the rows after it",
        "orchestrator/tracking.py",
        'STEP_KEY: row["step"], "eval/step": row["step"], "eval/kimg": row["kimg"]})',
        '"eval/step": row["step"], "eval/kimg": row["kimg"]}, step=row["step"])',
        ("tests/test_health.py::test_late_evaluations_do_not_push_w_and_b_past_the_training_step",),
    ),
    Mutant(
        "adam-unfused",
        "Adam updates the tensors one by one in a Python loop instead of torch's fused kernel",
        "orchestrator/optim.py",
        "eps=cfg.eps, fused=_fusable(params))",
        "eps=cfg.eps, fused=False)",
        ("tests/test_train.py::test_adam_uses_the_fused_kernel_where_it_runs_and_takes_adams_step",),
    ),
    Mutant(
        "init-from-ignores-mismatch",
        "--init-from loads what fits and silently leaves the rest, as if finetune.init_partial were on",
        "orchestrator/finetune.py",
        "    if problems and not partial:",
        "    if problems and partial is None:",
        ("tests/test_finetune.py::test_init_from_refuses_a_mismatch_naming_the_parameter_and_both_shapes",),
    ),
    Mutant(
        "pix2pix-no-l1-weight",
        "Pix2Pix adds the L1 term without its λ = 100",
        "orchestrator/recipes/pix2pix.py",
        "total = adv + l1_weight * l1",
        "total = adv + l1",
        (T2T + "test_pix2pix_phases_take_the_gradients_of_the_papers_objective",),
    ),
    Mutant(
        "pix2pix-d-not-halved",
        "Pix2Pix's D takes the whole objective instead of half (paper, section 3.2)",
        "orchestrator/recipes/pix2pix.py",
        "total = 0.5 * d_loss(kind, real_logits, fake_logits)",
        "total = d_loss(kind, real_logits, fake_logits)",
        (T2T + "test_pix2pix_phases_take_the_gradients_of_the_papers_objective",),
    ),
    Mutant(
        "cyclegan-identity-unweighted",
        "CycleGAN's identity terms lose their 0.5·λ weight",
        "orchestrator/recipes/cyclegan.py",
        'total = total + lam * opts.identity_weight * stats["loss/identity"]',
        'total = total + stats["loss/identity"]',
        (T2T + "test_cyclegan_phases_take_the_gradients_of_the_papers_objective",),
    ),
    Mutant(
        "cyclegan-pool-never-swaps",
        "The history pool always returns the new fake (D never sees older fakes)",
        "orchestrator/recipes/image_to_image.py",
        "            elif swap[i]:",
        "            elif False:",
        (T2T + "test_the_image_pool_follows_the_authors_rule",),
    ),
    Mutant(
        "srgan-adv-weight-ignored",
        "SRGAN's adversarial term loses its 10⁻³ weight",
        "orchestrator/recipes/srgan.py",
        "total = cont + opts.adv_weight * adv",
        "total = cont + adv",
        (T2T + "test_srgan_phases_take_the_gradients_of_the_perceptual_loss",),
    ),
    Mutant(
        "cyclegan-pool-per-rank",
        "Each worker keeps its own history of fakes (the pool no longer serves the global batch)",
        "orchestrator/recipes/cyclegan.py",
        "        fake_a = pool_a.query(gather_rows(fake_a), rng)[mine]\n        fake_b = pool_b.query(gather_rows(fake_b), rng)[mine]",
        "        fake_a = pool_a.query(fake_a, rng)\n        fake_b = pool_b.query(fake_b, rng)",
        (T2R + "test_two_ddp_workers_reach_the_weights_of_one[cyclegan-ddp]",),
    ),
    Mutant(
        "superres-crop-per-stream",
        "A super-resolution crop is seeded by the sample's place in its worker's stream, not by the sample",
        "orchestrator/data/shards.py",
        "decoded = self._decode(sample, bad, f\"{epoch}-{sample.get('__key__', index)}\")",
        'decoded = self._decode(sample, bad, f"{epoch}-{stream}-{index}")',
        (T2R + "test_two_ddp_workers_reach_the_weights_of_one[srgan-ddp]",),
    ),
    Mutant(
        "wgan-clip-skipped",
        "WGAN weight clipping never runs after the D phases",
        "orchestrator/recipes/recipe.py",
        "        if phase.after is not None:\n            phase.after(ctx)\n",
        "",
        (STAB + "test_clipping_bounds_every_d_weight_after_each_d_step_and_leaves_g_alone",),
    ),
    Mutant(
        "rmsprop-momentum",
        "RMSProp gets momentum, which WGAN's Algorithm 1 avoids",
        "orchestrator/optim.py",
        "eps=cfg.eps, momentum=0.0)",
        "eps=cfg.eps, momentum=0.9)",
        (STAB + "test_rmsprop_has_the_configured_lr_no_momentum_and_no_lazy_correction",),
    ),
    Mutant(
        "label-smoothing-two-sided",
        "label smoothing also smooths the fake term (two-sided)",
        "orchestrator/losses.py",
        "        return real + F.softplus(fake_logits).mean()",
        "        return real + ((1 - smoothing) * F.softplus(fake_logits) + smoothing * F.softplus(-fake_logits)).mean()",
        (STAB + "test_label_smoothing_changes_only_the_real_term",),
    ),
    Mutant(
        "instance-norm-is-batch-norm",
        "model.norm: instance builds BatchNorm (batch-dependent logits)",
        "architectures/dcgan.py",
        "        return [nn.InstanceNorm2d(channels, affine=True)]",
        "        return [nn.BatchNorm2d(channels)]",
        (STAB + "test_a_d_without_batch_norm_scores_each_image_on_its_own",),
    ),
    Mutant(
        "mbdisc-counts-itself",
        "minibatch discrimination keeps the j = i term in its sum",
        "architectures/layers.py",
        "        return close.sum(1) - 1  # Σ_j c_b minus the j = i term, exp(0) = 1",
        "        return close.sum(1)",
        (ANTI + "test_minibatch_discrimination_is_the_papers_sum_over_the_other_samples",),
    ),
    Mutant(
        "unroll-shares-d-buffers",
        "the look-ahead runs on D's own BatchNorm statistics (and changes them)",
        "orchestrator/unroll.py",
        "{n: b.clone() for n, b in D.named_buffers()}",
        "dict(D.named_buffers())",
        (ANTI + "test_lookahead_steps_are_those_of_torchs_optimizer_and_leave_d_alone",),
    ),
    Mutant(
        "unroll-adam-no-bias-correction",
        "the look-ahead's Adam step forgets the bias correction of the first moment",
        "orchestrator/unroll.py",
        'group["lr"] / (1 - b1**t) * m / denom',
        'group["lr"] * m / denom',
        (ANTI + "test_lookahead_steps_are_those_of_torchs_optimizer_and_leave_d_alone",),
    ),
    Mutant(
        "unroll-detached-fakes",
        "the look-ahead steps D on detached fakes: G's gradient misses the dθ_D/dθ_G term",
        "orchestrator/recipes/noise_to_image.py",
        "seen(real[0], cfg, aug), real[1], seen(fake, cfg, aug)",
        "seen(real[0], cfg, aug), real[1], seen(fake.detach(), cfg, aug)",
        (ANTI + "test_unrolled_g_gradient_is_the_derivative_of_the_loss_after_the_look_ahead",),
    ),
    Mutant(
        "pack-interleaved",
        "packing groups images n and n + N/m instead of m consecutive images",
        "orchestrator/losses.py",
        "    return img.reshape(n // m, m * c, h, w)",
        "    return img.reshape(m, n // m, c, h, w).transpose(0, 1).reshape(n // m, m * c, h, w)",
        (ANTI + "test_pack_concatenates_consecutive_images_along_channels",),
    ),
    Mutant(
        "feature-matching-ignores-reals",
        "feature matching compares fakes with fakes (the real batch ignored)",
        "orchestrator/recipes/noise_to_image.py",
        "        _, real_features = D(seen(real[0], cfg, aug), real[1], return_features=True)",
        "        _, real_features = D(seen(fake.detach(), cfg, aug), c, return_features=True)",
        (ANTI + "test_feature_matching_g_phase_applies_the_gradient_of_the_papers_objective",),
    ),
    Mutant(
        "stylegan-style-mod-without-plus-one",
        "StyleGAN's AdaIN scales by y_s instead of the official y_s + 1 (a fresh layer zeroes every map)",
        "architectures/stylegan.py",
        "        return x * (style[:, 0] + 1) + style[:, 1]",
        "        return x * style[:, 0] + style[:, 1]",
        (SG1 + "test_adain_epilogue_matches_a_hand_computation",),
    ),
    Mutant(
        "stylegan-no-instance-norm",
        "StyleGAN's layer epilogue styles the activations without normalising them first (AdaIN without IN)",
        "architectures/stylegan.py",
        "        return self.style(instance_norm(x), w)",
        "        return self.style(x, w)",
        (SG1 + "test_adain_epilogue_matches_a_hand_computation",),
    ),
    Mutant(
        "stylegan-mixing-ignores-the-level",
        "StyleGAN's style mixing draws its crossover among all 2·log2(R) − 2 layers, not the ones in use at the level",
        "architectures/stylegan.py",
        "            cutoff = torch.randint(1, max(in_use, 2), [], device=ws.device)",
        "            cutoff = torch.randint(1, self.num_ws, [], device=ws.device)",
        (SG1 + "test_style_mixing_swaps_the_ws_after_one_crossover_among_the_layers_in_use",),
    ),
    Mutant(
        "stylegan-truncation-every-layer",
        "StyleGAN's truncation ignores the configured cutoff (official 8) and truncates every layer",
        "architectures/stylegan.py",
        "        cutoff = self.default_cutoff if truncation_cutoff is None else truncation_cutoff",
        "        cutoff = truncation_cutoff",
        (SG1 + "test_truncation_psi_one_is_identity_and_zero_gives_w_avg_on_the_cutoff_layers_only",),
    ),
    Mutant(
        "stylegan-d-without-blur",
        "StyleGAN's D_basic loses the [1, 2, 1] blur before its downscaling convs (ProGAN's D)",
        "architectures/stylegan.py",
        "        super().__init__(img_resolution, img_channels, 0, blur_filter=BLUR_FILTER, **kwargs)",
        "        super().__init__(img_resolution, img_channels, 0, **kwargs)",
        (SG1 + "test_discriminator_blurs_before_the_downscaling_conv_and_progans_does_not",),
    ),
    Mutant(
        "ray-preempted-exits-0",
        "the Ray driver exits 0 after a preemption before the end, so a RayJob ends succeeded and is never retried",
        "launch/ray_job.py",
        "    if preempted:\n        return PREEMPTED_EXIT_CODE, (",
        "    if False:\n        return PREEMPTED_EXIT_CODE, (",
        ("tests/test_ray_driver.py::test_exit_status",),
    ),
    Mutant(
        "ray-placement-ignored",
        "the driver never passes ray.placement_strategy to Ray Train (PACK always: both workers on one host; "
        "tests/test_multinode_jobs.py's DDP job test fails too, checked by hand: 3 min)",
        "launch/ray_job.py",
        "placement_strategy=r.placement_strategy,",
        'placement_strategy="PACK",',
        ("tests/test_ray_driver.py::test_the_worker_group_ray_train_gets",),
    ),
    Mutant(
        "elastic-fixed-count",
        "ray.min_workers is ignored: Ray Train gets a fixed worker count, and a lost host stalls the run",
        "launch/ray_job.py",
        "num_workers=(r.min_workers, r.num_workers) if r.elastic else r.num_workers,",
        "num_workers=r.num_workers,",
        ("tests/test_ray_driver.py::test_the_worker_group_ray_train_gets",),
    ),
    Mutant(
        "elastic-batch-checked-at-max-only",
        "an elastic run's global batch is checked at num_workers only: a shrink to a count that cannot split it "
        "fails after the node loss instead of before the start",
        "orchestrator/train/preflight.py",
        "    for n in r.worker_counts:\n",
        "    for n in [r.num_workers]:\n",
        ("tests/test_ray_driver.py::test_an_elastic_run_must_split_its_global_batch_at_every_worker_count",),
    ),
    Mutant(
        "stale-hosts-kept",
        "make_hosts no longer removes what a killed test process left (namespaces, veths, bridge, processes)",
        "tests/hosts.py",
        "    remove_stale()  # a killed",
        "    pass  # a killed",
        ("tests/test_multinode.py::test_what_a_killed_test_process_left_behind_is_removed_by_the_next",),
    ),
]


def copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, as they are now, into ``dest``."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, out.split("\0")):
        src = ROOT / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(root: Path, tests: list[str], timeout: int) -> tuple[int | None, float, str]:
    """``pytest -x`` on ``tests`` in ``root``: exit code (None on timeout), seconds, the end of its output."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return None, time.monotonic() - t0, str(e.stdout or "")[-2000:]
    return p.returncode, time.monotonic() - t0, (p.stdout + p.stderr)[-2000:]


def check(root: Path, mutant: Mutant, timeout: int) -> tuple[str, float, str]:
    """Apply ``mutant`` in ``root``, run its tests, restore the file: ``(caught|missed|timeout|error, s, output)``."""
    path = root / mutant.file
    text = path.read_text()
    if text.count(mutant.original) != 1:
        return "error", 0.0, f"{mutant.file}: the original text occurs {text.count(mutant.original)} times, not once"
    path.write_text(text.replace(mutant.original, mutant.mutated))
    try:
        code, seconds, output = run_tests(root, list(mutant.tests), timeout)
    finally:
        path.write_text(text)
    verdict = {1: "caught", 0: "missed", None: "timeout"}.get(code, "error")
    return verdict, seconds, output


def main(argv: list[str] | None = None) -> int:
    """Run the mutants (all, or ``--only`` some) and print caught/missed for each."""
    p = argparse.ArgumentParser(
        prog="python tests/mutants.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per pytest run (default 600)")
    a = p.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = sorted(set(a.only or []) - set(known))
    if unknown:
        p.error(f"unknown mutant(s) {unknown}; known: {', '.join(known)}")
    mutants = [known[n] for n in a.only] if a.only else MUTANTS
    if a.list:
        for m in mutants:
            print(f"{m.name}: {m.what}\n    {m.file}\n    " + "\n    ".join(m.tests))
        return 0

    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="ganforge-mutants-"))
    try:
        copy_tree(root)
        print(f"copy of {ROOT} in {root}", flush=True)
        if not a.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
            code, seconds, output = run_tests(root, tests, a.timeout * 2)
            print(f"baseline: {len(tests)} test selection(s), unmutated: exit {code} in {seconds:.0f} s", flush=True)
            if code != 0:
                print(output)
                print("the unmutated tests must pass first; nothing was mutated")
                return 1
        results = []
        for m in mutants:
            verdict, seconds, output = check(root, m, a.timeout)
            results.append((m, verdict, seconds))
            print(f"{verdict:8} {m.name:30} {seconds:6.0f} s  {m.what}", flush=True)
            if verdict != "caught":
                print("    " + output.replace("\n", "\n    "))
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    caught = sum(v == "caught" for _, v, _ in results)
    print(f"{caught}/{len(results)} mutants caught in {time.monotonic() - start:.0f} s")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
