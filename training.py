"""
SODA's training step (§3.2, §3.4), train.py's and bench.py's alike: the learning rate at a step,
AdamW's parameter groups, a step's batch and its two views, the micro-steps' denoising loss and
backward, gradient clipping, AdamW and the EMA. `run` is train.py's Run (bench.py builds one for
its synthetic images): the config's keys as attributes, and the model, optimizer and data setup made.
"""
import contextlib
import math

import torch

import data
import diffsiam
import diffusion as D
import multiview


def param_groups(raw, enc_lr_mult, weight_decay):
    """AdamW's groups: the encoder at lr * enc_lr_mult (§3.4); no weight decay on gains and biases."""
    enc = {id(p) for p in raw.encoder.parameters()}
    return [{"params": [p for p in raw.parameters()
                        if p.requires_grad and (id(p) in enc) == in_enc and (p.dim() > 1) == decay],
             "lr_mult": enc_lr_mult if in_enc else 1.0, "weight_decay": weight_decay if decay else 0.0}
            for in_enc in (True, False) for decay in (True, False)]


def ema_pairs(ema, raw):
    """What the EMA follows, as train_step reads it: (EMA parameters, the trained parameters they
    follow (not a frozen denoiser's), [(EMA buffer, buffer)] for z_bn's running statistics, copied)."""
    trained = [(e, r) for e, r in zip(ema.parameters(), raw.parameters()) if r.requires_grad]
    buffers = [(e, r) for (n, e), r in zip(ema.named_buffers(), raw.buffers()) if n.startswith("z_bn.")]
    return [e for e, _ in trained], [r for _, r in trained], buffers


def lr_at(run, it):
    """Linear warm-up over warmup_iters, then cosine decay to min_lr_ratio * lr at max_iters."""
    if it < run.warmup_iters:
        return run.lr * (it + 1) / run.warmup_iters
    if not run.decay_lr:
        return run.lr
    frac = (it - run.warmup_iters) / max(1, run.max_iters - run.warmup_iters)
    return run.lr * (run.min_lr_ratio + (1 - run.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def get_batch(run, it, rows):
    """Step it's images (and labels, and their indices in memory), the global batch's `rows`: a
    function of (seed, it) alone, so a resume replays the same batches on any number of processes."""
    epoch, i = divmod(it, run.steps_per_epoch)
    if run.in_memory:
        if epoch not in run.order_cache:
            run.order_cache.clear()
            run.order_cache[epoch] = data.epoch_order(run.n_train, run.global_batch, run.seed, epoch).to(run.dev)
        idx = run.order_cache[epoch][i][rows]
        return run.x_train[idx], run.y_train[idx], idx, None
    try:  # the micro-steps' rows in order (StepBatches); whole images: aspect; the unreadable files' messages
        xb, yb, *aspect, bad = next(run.loader_iter)
    except data.DataError as e:
        raise data.from_worker(e) from None
    data.warn_unreadable(bad, run.bad_files, "the next readable image of the split is trained on in its place")
    aspect = aspect[0].to(run.dev, torch.float32, non_blocking=True) if aspect else None
    return xb.to(run.dev, non_blocking=True), yb.to(run.dev, non_blocking=True), None, aspect


def views_of(run, xb, idx, rng, aspect=None):
    """(source, target) views of a batch (§3.3): two augmentations, one, or another image of the
    class; from whole folder images (aspect given), views of image_size cut from all of the picture."""
    other = None
    if run.views == "class":
        other = run.x_train[data.class_partners(idx, run.y_train, run.classes, rng)]
    return data.make_views(xb, run.views, run.aug, rng, other, run.crop_min, aspect,
                           run.view_size if aspect is not None else None)


def train_step(run, it):
    """One optimisation step (§3.2, §3.4) on the global batch, in grad_accum micro-steps (each the
    denoising loss of its rows, backward; DDP all-reduces the gradients after the last), then
    gradient clipping, AdamW, the EMA. -> this process's loss, the mean over its micro-steps (a
    device tensor: no host sync); run.grad_norm, the global gradient's norm before clipping."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run, it) * group["lr_mult"]
    loss = 0.0
    for m, (slot, rows) in enumerate(zip(run.slots, run.micro_rows)):
        sync = m == run.grad_accum - 1 or not run.ddp
        with contextlib.nullcontext() if sync else run.net.no_sync():
            loss = loss + micro_step(run, it, slot, rows)
    if run.grad_clip > 0:
        run.grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_params, run.grad_clip)
    else:
        run.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.raw_params if p.grad is not None])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    # EMA with a half-life in images; ramped up early so short runs get a useful EMA (EDM)
    half = run.ema_halflife_kimg * 1000
    if run.ema_rampup > 0:
        half = min(half, (it + 1) * run.global_batch * run.ema_rampup)
    beta = 0.5 ** (run.global_batch / max(half, 1e-8))
    torch._foreach_lerp_(run.ema_params, run.raw_params, 1 - beta)
    for e, r in run.ema_buffers:  # running statistics (z_bn): the EMA model evaluates with the raw model's
        e.copy_(r)
    return loss


def micro_step(run, it, slot, rows):
    """Forward and backward of the global batch's `rows` (slot `slot`): views, noise level and noise
    are drawn for the whole global batch and sliced (data.Rng), so any split of the batch sees the
    same numbers; the global RNG (the UNet's dropout) is seeded by step and slot. z_bn's statistics
    are those of the micro-step's rows on all processes. -> the loss / grad_accum, detached."""
    torch.manual_seed(run.seed * 1_000_003 + it * run.world * run.grad_accum + slot + 1)
    rng = data.Rng(run.seed, it, run.global_batch, rows, run.dev)
    cond = {}
    if run.multiview:  # k source views + a target view of one object, with their rays
        k = 1 + rng.shared_randint(run.k_max)
        x_src, rays_src, x_tgt, rays_tgt = multiview.multiview_batch(run.mv_train, k, rng)
        cond = dict(rays_src=rays_src, rays_tgt=rays_tgt, pose_on=run.raw.draw_pose_on(rng.rand))
        if run.p_uncond_src_pose > 0:  # each source view's pose dropped too (§3.3 "Guidance")
            cond["src_pose_on"] = (rng.rand(k) >= run.p_uncond_src_pose).float()
    else:
        xb, _, idx, aspect = get_batch(run, it, rows)
        x_src, x_tgt = views_of(run, xb, idx, rng, aspect)
    x_src = x_src + run.enc_noise * rng.randn(*x_src.shape[1:])  # low noise on the encoder input (§3.4)
    z_on = run.raw.draw_z_on(rng.rand)
    u, eps = rng.rand(), rng.randn(*x_tgt.shape[1:])
    if run.segments:  # DiffSiam: the noise level decides which segments of z are on, on top of the dropout
        cond["segments_on"] = diffsiam.segments_switched_on(u, run.segments, run.segment_mode)
    x_pair = x_tgt  # DiffSiam's SimSiam loss: the second augmented view
    if run.channels_last and not run.multiview:
        x_src, x_tgt = x_src.contiguous(memory_format=run.mem), x_tgt.contiguous(memory_format=run.mem)
    with run.autocast():
        if run.simsiam_weight > 0:  # + the weighted SimSiam loss (thesis eq. 3.12)
            loss = diffsiam.loss(run.net, x_src, x_tgt, run.schedule_fn, u, eps, x_pair, run.simsiam_weight,
                                 weighting=run.weighting, z_on=z_on, **cond)
        else:
            loss = D.loss(run.net, x_src, x_tgt, run.schedule_fn, u=u, eps=eps, weighting=run.weighting, z_on=z_on,
                          **cond)
    loss = loss / run.grad_accum  # the micro-steps' mean: their gradients add up to the global batch's
    loss.backward()
    return loss.detach()
