"""Train the `shapes` demo: a small latent diffusion pipeline, with diffusers' own classes, on CPU.

    python scripts/make_shapes_dataset.py -o out/shapes-data
    nohup nice -n 10 python scripts/train_demo.py --data out/shapes-data --work out/shapes-train \
        --out models/shapes > /tmp/train_demo.log 2>&1 &

Stages, each resumable from its checkpoint in --work (run the same command again to go on), each
with a step count and an optional wall-time budget (the learning rate follows whichever runs out
first). The defaults are the shipped model's run (models/shapes/README.md), about 2 hours on 2 CPU
cores:
1. an `AutoencoderKL` (2 levels by default: 32x32 RGB -> 16x16x4 latents; `--vae-widths 8 16 32`:
   3 levels, 8x8x4, the first shapes model's), trained on reconstruction (L1 + MSE) with a tiny KL term;
2. the training images encoded once (mean and log-variance cached), the latent scaling factor set
   to 1 / std of the sampled latents;
3. the decoder fine-tuned on those cached latents with the encoder frozen (sharper edges, same
   latent space), then the VAE alone judged on held-out renders (`vae_round_trip`);
4. a small CLIP text encoder (transformers `CLIPTextModel`, the real CLIP vocabulary, 77 positions)
   and a `UNet2DConditionModel` with cross-attention, trained together on the cached latents with
   v (or epsilon) prediction, scaled-linear betas to `--beta-end`, 10% caption dropout (for
   classifier-free guidance), 20% of captions without their position phrase, AdamW with warmup and
   cosine decay, and an EMA of the weights;
5. a guidance-aware fine-tune (`train_guided`) so that the default guidance 7.5 acts like guidance
   `--guided-effective` (2.5) on a model trained towards the true target: clean pictures that follow
   the caption, where the plain model saturates at 7.5.
The EMA weights are saved once, at the end, with `StableDiffusionPipeline.save_pretrained` (a
PNDMScheduler with SD 1.x's config, the betas and prediction type trained with, no safety checker),
in fp16 unless --fp32.
Every random draw of step k comes from a generator seeded by (seed, k), so a resumed run takes the
same batches as an uninterrupted one. Use --threads 1 on a shared machine: two OpenMP threads
competing with other jobs ran 5-30x slower here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "clip-tokenizer"
SD1_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def scheduler_config(beta_end: float = SD1_SCHEDULER["beta_end"], prediction_type: str = "epsilon") -> dict:
    """SD 1.x's PNDM config, with the end of the scaled-linear betas moved to `beta_end` (a larger one
    leaves less of the image at the first sampling step) and the model's prediction type."""
    return {**SD1_SCHEDULER, "beta_end": beta_end, "prediction_type": prediction_type}


def alphas_cumprod(beta_end: float = SD1_SCHEDULER["beta_end"]) -> torch.Tensor:
    """The scaled-linear schedule's cumulative alphas, as PNDMScheduler(**scheduler_config(beta_end)) has them."""
    betas = torch.linspace(SD1_SCHEDULER["beta_start"] ** 0.5, beta_end**0.5, 1000) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sample_noise(shape: tuple, gen: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise plus `offset` times a per-sample, per-channel constant (offset noise): the model
    then learns to move a latent's mean too, not only the details around it."""
    noise = torch.randn(shape, generator=gen)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=gen)
    return noise


def unplaced(caption: str) -> str:
    """The caption without its position phrase: "a red circle on a blue background"."""
    return caption.rsplit(", ", 1)[0]


def vae_config(widths: tuple[int, ...] = (8, 16, 32)) -> dict:
    """The VAE: one level per width, each but the last halving the side (3 levels: 32x32 RGB <-> 8x8x4
    latents; 2 levels: 16x16x4, which keeps a star's points)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "sample_size": 32,
        "block_out_channels": tuple(widths),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
        "down_block_types": ("DownEncoderBlock2D",) * len(widths),
        "up_block_types": ("UpDecoderBlock2D",) * len(widths),
    }


def text_config(width: int, layers: int) -> dict:
    return {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_attention_heads": max(1, width // 32),
        "num_hidden_layers": layers,
        "projection_dim": width,
        "hidden_act": "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def unet_config(
    widths: tuple[int, ...], layers: int, cross_dim: int, attn_levels: int = 1, sample_size: int = 8
) -> dict:
    """One level per width; self- and cross-attention in the `attn_levels` lowest-resolution levels
    (and always in the middle block)."""
    down = tuple(
        "CrossAttnDownBlock2D" if level >= len(widths) - attn_levels else "DownBlock2D" for level in range(len(widths))
    )
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": layers,
        "block_out_channels": widths,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": 8,
        "down_block_types": down,
        "up_block_types": tuple(block.replace("Down", "Up") for block in reversed(down)),
    }


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_images(data: Path) -> torch.Tensor:
    images = np.load(data / "train.npz")["images"]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def cosine_lr(step: int, progress: float, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 5% of `peak` as progress goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def progress(step: int, steps: int, elapsed: float, minutes: float | None) -> float:
    """How far through the run: by steps, or by wall time when a budget is set, whichever is further."""
    by_steps = step / steps
    return max(by_steps, elapsed / (60 * minutes)) if minutes else by_steps


def train_vae(args, images: torch.Tensor):
    from diffusers import AutoencoderKL

    ckpt = args.work / "vae.pt"
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config(args.vae_widths))
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = 0
    state = {}
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    if start >= args.vae_steps:
        return vae.eval()
    log = open(args.work / "vae_loss.csv", "a", newline="")
    writer = csv.writer(log)
    elapsed = state["elapsed"] if start else 0.0
    t0 = time.time() - elapsed
    bar = tqdm(range(start, args.vae_steps), desc="vae", initial=start, total=args.vae_steps, mininterval=10)
    recent = []
    step = start
    for step in bar:
        done = progress(step, args.vae_steps, time.time() - t0, args.vae_minutes)
        if done >= 1.0:
            break
        gen = step_generator(args.seed + 1, step)
        x = images[torch.randint(len(images), (args.vae_batch,), generator=gen)]
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, done, 50, args.vae_lr)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        recent.append(rec.item())
        if (step + 1) % 50 == 0:
            writer.writerow([step + 1, f"{np.mean(recent):.5f}", f"{kl.item():.3f}", f"{time.time() - t0:.1f}"])
            log.flush()
            bar.set_postfix(rec=f"{np.mean(recent):.4f}")
            recent = []
        if (step + 1) % 100 == 0:
            atomic_save(
                {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "elapsed": time.time() - t0},
                ckpt,
            )
    else:
        step = args.vae_steps
    # the final checkpoint marks the stage done (step = vae_steps) whether steps or time ran out
    atomic_save(
        {
            "model": vae.state_dict(),
            "opt": opt.state_dict(),
            "step": args.vae_steps,
            "steps_run": step,
            "elapsed": time.time() - t0,
        },
        ckpt,
    )
    print(f"vae: {step} steps, {time.time() - t0:.0f} s in all", flush=True)
    return vae.eval()


def load_vae(folder: Path):
    """The VAE of a saved pipeline, in fp32 and frozen: its latent space (and scaling factor) is reused."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae


@torch.no_grad()
def encode_latents(
    args, vae, images: torch.Tensor, scaling_factor: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encode the training images once; the scaling factor is 1 / std of the sampled latents unless given."""
    cache = args.work / "latents.pt"
    if cache.is_file():
        state = torch.load(cache)
        return state["mean"], state["logvar"], state["scaling_factor"]
    means, logvars = [], []
    for chunk in images.split(256):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        logvars.append(dist.logvar)
    mean, logvar = torch.cat(means), torch.cat(logvars)
    sample = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=step_generator(args.seed, 0))
    scaling_factor = scaling_factor or float(1.0 / sample.std())
    recon = torch.cat([vae.decode(m).sample for m in mean[:512].split(256)])
    psnr = 10 * math.log10(4.0 / F.mse_loss(recon.clamp(-1, 1), images[:512]).item())
    print(
        f"latents: {tuple(mean.shape)}, std {sample.std():.3f}, scaling factor {scaling_factor:.4f}, "
        f"reconstruction PSNR {psnr:.1f} dB",
        flush=True,
    )
    atomic_save({"mean": mean, "logvar": logvar, "scaling_factor": scaling_factor, "recon_psnr": psnr}, cache)
    return mean, logvar, scaling_factor


def finetune_decoder(args, vae, images: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor):
    """Train the VAE decoder further on the cached latents with the encoder frozen (as SD's ft-MSE
    decoder): the latent space the U-Net learns stays the same, edges get sharper."""
    ckpt = args.work / "decoder.pt"
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    start, elapsed = 0, 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
        if state.get("finished"):
            return vae.eval()
    for p in params:
        p.requires_grad_(True)
    vae.train()
    log = open(args.work / "decoder_loss.csv", "a", newline="")
    writer = csv.writer(log)
    t0 = time.time() - elapsed
    recent = []
    step = start
    bar = tqdm(
        range(start, args.decoder_steps), desc="decoder", initial=start, total=args.decoder_steps, mininterval=10
    )
    for step in bar:
        done = progress(step, args.decoder_steps, time.time() - t0, args.decoder_minutes)
        if done >= 1.0:
            break
        gen = step_generator(args.seed + 2, step)
        idx = torch.randint(len(images), (args.vae_batch,), generator=gen)
        z = mean[idx] + torch.exp(0.5 * logvar[idx]) * torch.randn(mean[idx].shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, done, 50, args.decoder_lr)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, images[idx]) + F.mse_loss(recon, images[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % 50 == 0:
            writer.writerow([step + 1, f"{np.mean(recent):.5f}", f"{time.time() - t0:.1f}"])
            log.flush()
            bar.set_postfix(rec=f"{np.mean(recent):.4f}")
            recent = []
        if (step + 1) % 200 == 0:
            atomic_save(
                {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "elapsed": time.time() - t0},
                ckpt,
            )
    else:
        step = args.decoder_steps
    atomic_save(
        {
            "model": vae.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": time.time() - t0,
            "finished": True,
        },
        ckpt,
    )
    with torch.no_grad():
        vae.eval()
        recon = torch.cat([vae.decode(m).sample for m in mean[:512].split(256)])
        psnr = 10 * math.log10(4.0 / F.mse_loss(recon.clamp(-1, 1), images[:512]).item())
    print(f"decoder: {step} steps, {time.time() - t0:.0f} s in all, reconstruction PSNR {psnr:.1f} dB", flush=True)
    for p in params:
        p.requires_grad_(False)
    return vae


@torch.no_grad()
def vae_round_trip(vae, variants: int = 2, seed: int = 1) -> dict:
    """The VAE alone, judged as the generator will be: held-out renders (28 triples x 5 positions x
    `variants`) encoded to their latent means, decoded, and scored by eval_demo's judge. A shape the
    VAE cannot give back, the U-Net cannot draw either."""
    import eval_demo
    import make_shapes_dataset as shapes

    images, truth = shapes.make_split(shapes.held_out_triples(), variants, seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(256)])
    pixels = recon.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    judge = eval_demo.Judge()
    judged = [judge(image) for image in pixels]
    result = eval_demo.score(judged, truth)
    result["psnr"] = float(np.mean([eval_demo.psnr(a, b) for a, b in zip(pixels, images)]))
    by_shape = eval_demo.score_by(judged, truth, lambda item: item["shape"])
    result["shape by shape"] = {name: r["shape"] for name, r in by_shape.items()}
    print(
        f"vae round trip on {len(images)} held-out renders: {result['psnr']:.1f} dB; colour {result['colour']:.1%}, "
        f"background {result['background']:.1%}, shape {result['shape']:.1%} "
        f"({', '.join(f'{k} {v:.1%}' for k, v in result['shape by shape'].items())}), position {result['position']:.1%}",
        flush=True,
    )
    return result


def make_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), model_max_length=77)


def build_models(args, latent_size: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(args.text_width, args.text_layers)))
    torch.manual_seed(args.seed + 3)
    attn_levels = len(args.unet_widths) if args.attn_top else args.attn_levels
    unet = UNet2DConditionModel(
        **unet_config(tuple(args.unet_widths), args.unet_layers, args.text_width, attn_levels, latent_size)
    )
    return text_encoder, unet


def save_unet_checkpoint(path, text_encoder, unet, opt, ema, step, elapsed, finished=False) -> None:
    atomic_save(
        {
            "text_encoder": text_encoder.state_dict(),
            "unet": unet.state_dict(),
            "opt": opt.state_dict(),
            "ema": ema,
            "step": step,
            "elapsed": elapsed,
            "finished": finished,
        },
        path,
    )


def resume(ckpt: Path, text_encoder, unet, opt, ema: list, label: str):
    """Load a stage's checkpoint if there is one: (ema, step, elapsed seconds, finished)."""
    if not ckpt.is_file():
        return ema, 0, 0.0, False
    state = torch.load(ckpt, weights_only=False)
    text_encoder.load_state_dict(state["text_encoder"])
    unet.load_state_dict(state["unet"])
    opt.load_state_dict(state["opt"])
    print(f"{label}resumed at step {state['step']}", flush=True)
    return state["ema"], state["step"], state["elapsed"], bool(state.get("finished"))


def loss_log(path: Path, start: int):
    """The stage's loss CSV, appended to when resuming."""
    log = open(path, "a", newline="")
    writer = csv.writer(log)
    if start == 0:
        writer.writerow(["step", "loss", "lr", "elapsed_s"])
    return log, writer


def log_step(recent: list, loss: float, step: int, lr: float, t0: float, writer, log, bar) -> list:
    """Collect the loss; every 50 steps write its mean to the CSV and the progress bar."""
    recent.append(loss)
    if (step + 1) % 50 == 0:
        writer.writerow([step + 1, f"{np.mean(recent):.5f}", f"{lr:.2e}", f"{time.time() - t0:.1f}"])
        log.flush()
        bar.set_postfix(loss=f"{np.mean(recent):.4f}")
        return []
    return recent


def end_stage(
    label: str, ckpt: Path, text_encoder, unet, opt, ema: list, params: list, step: int, start: int, t0: float
):
    """Mark the stage finished (a step count below the target means the time budget ended it) and
    load the EMA weights into the models."""
    if step > start:
        save_unet_checkpoint(ckpt, text_encoder, unet, opt, ema, step, time.time() - t0, finished=True)
    print(f"{label}: {step} steps, {time.time() - t0:.0f} s in all", flush=True)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return text_encoder.eval(), unet.eval()


class Captions:
    """Token ids of every training caption, of each caption without its position phrase, and of "".

    `pick` chooses each sample's caption for a step: the empty one with probability `uncond_prob`
    (for classifier-free guidance), else the caption without its position with probability
    `unplaced_prob` (the image's position is then any position), else the full caption."""

    def __init__(self, captions: list[str], uncond_prob: float, unplaced_prob: float = 0.0):
        placed = sorted(set(captions))
        unique = placed + sorted({unplaced(c) for c in placed}) + [""]
        lookup = {c: i for i, c in enumerate(unique)}
        self.ids = make_tokenizer()(
            unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        self.placed = torch.tensor([lookup[c] for c in captions])
        self.unplaced = torch.tensor([lookup[unplaced(c)] for c in captions])
        self.empty = len(unique) - 1
        self.uncond_prob, self.unplaced_prob = uncond_prob, unplaced_prob

    def pick(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [B, 77], keep [B]: whether the sample has a caption rather than the empty one)."""
        keep = torch.rand(len(idx), generator=gen) >= self.uncond_prob
        chosen = self.placed[idx]
        if self.unplaced_prob:
            drop = torch.rand(len(idx), generator=gen) < self.unplaced_prob
            chosen = torch.where(drop, self.unplaced[idx], chosen)
        return self.ids[torch.where(keep, chosen, torch.full_like(idx, self.empty))], keep


def prediction_target(prediction_type: str, z: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to output for latents z noised with `noise` at cumulative alpha `a`: the
    noise (epsilon), or v = sqrt(a) noise - sqrt(1 - a) z (v_prediction). v weights the picture itself
    at the noisiest steps, where the caption alone has to decide what is drawn and where; epsilon
    gives those steps almost no say in the loss."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * z
    raise ValueError(f"prediction_type {prediction_type!r}: choose epsilon or v_prediction")


def noisy_batch(args, mean, logvar, scaling_factor: float, acp: torch.Tensor, gen: torch.Generator):
    """One step's batch: (indices, the prediction target, timesteps, noisy latents)."""
    idx = torch.randint(len(mean), (args.batch,), generator=gen)
    z = mean[idx] + torch.exp(0.5 * logvar[idx]) * torch.randn(mean[idx].shape, generator=gen)
    z = z * scaling_factor
    noise = sample_noise(z.shape, gen, args.offset_noise)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    a = acp[t].view(-1, 1, 1, 1)
    return idx, prediction_target(args.prediction_type, z, noise, a), t, a.sqrt() * z + (1 - a).sqrt() * noise


def train_unet(args, mean: torch.Tensor, logvar: torch.Tensor, scaling_factor: float, captions: list[str]):
    table = Captions(captions, args.uncond_prob, args.unplaced_prob)
    acp = alphas_cumprod(args.beta_end)

    text_encoder, unet = build_models(args, mean.shape[-1])
    params = list(text_encoder.parameters()) + list(unet.parameters())
    print(
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M params, "
        f"U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params",
        flush=True,
    )
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    ckpt = args.work / "unet.pt"
    ema, start, elapsed, finished = resume(ckpt, text_encoder, unet, opt, ema, "")
    if finished:
        args.steps = start
    log, writer = loss_log(args.work / "loss.csv", start)
    text_encoder.train()
    unet.train()
    t0 = time.time() - elapsed
    recent = []
    bar = tqdm(range(start, args.steps), desc="unet", initial=start, total=args.steps, mininterval=10)
    step = start
    for step in bar:
        done = progress(step, args.steps, time.time() - t0, args.minutes)
        if done >= 1.0:
            break
        gen = step_generator(args.seed, step)
        idx, target, t, noisy = noisy_batch(args, mean, logvar, scaling_factor, acp, gen)
        token_ids, keep = table.pick(idx, gen)
        lr = cosine_lr(step, done, args.warmup, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        hidden = text_encoder(token_ids).last_hidden_state
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        recent = log_step(recent, loss.item(), step, lr, t0, writer, log, bar)
        if (step + 1) % args.checkpoint_every == 0:
            save_unet_checkpoint(ckpt, text_encoder, unet, opt, ema, step + 1, time.time() - t0)
    else:
        step = args.steps
    return end_stage("unet", ckpt, text_encoder, unet, opt, ema, params, step, start, t0)


def guided_target(uncond: torch.Tensor, truth: torch.Tensor, effective: float = 1.0) -> torch.Tensor:
    """What the guided prediction u + w (c - u) is trained towards: classifier-free guidance at scale
    `effective` with the model's own u and the true target (the noise, or v; 1: the target itself)."""
    return truth if effective == 1 else uncond + effective * (truth - uncond)


def frozen_copy(text_encoder, unet):
    """Copies of the two models with gradients off, in eval mode: the guided stage's teacher."""
    import copy

    copies = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    for model in copies:
        model.requires_grad_(False)
    return copies


def train_guided(args, text_encoder, unet, mean, logvar, scaling_factor: float, captions: list[str]):
    """Fine-tune for the guidance scale the pipeline will be run at (default 7.5): the caption branch
    learns c = sg(u) + (noise - sg(u)) / w, where u is the model's own prediction for the empty prompt,
    so that classifier-free guidance u + w (c - u) lands on the noise instead of overshooting it (a
    small model trained the plain way saturates and loses colours at w = 7.5). Empty-prompt samples
    keep the plain target, so u stays the unconditional model.

    With --guided-effective g above 1 the target is u + g (noise - u) instead: guidance w then acts
    like guidance g on the plain model, which follows the caption more closely.

    With --guided-teacher the true target is replaced by a frozen copy of the stage-4 model's own
    prediction for the sample's caption (guidance distillation): the caption branch learns
    sg(u) + g (teacher - sg(u)) / w and the empty-prompt samples the teacher's u. Unlike the noisy
    true target, the teacher's is what the plain model draws at guidance g, so guidance w gives its
    picture back; every error of the caption branch is still multiplied by w when sampling."""
    table = Captions(captions, args.uncond_prob, args.unplaced_prob)
    acp = alphas_cumprod(args.beta_end)
    ids, empty = table.ids, table.empty
    teacher = frozen_copy(text_encoder, unet) if args.guided_teacher else None
    params = list(text_encoder.parameters()) + list(unet.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.guided_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    ckpt = args.work / "guided.pt"
    ema, start, elapsed, finished = resume(ckpt, text_encoder, unet, opt, ema, "guided: ")
    if finished:
        args.guided_steps = start
    log, writer = loss_log(args.work / "guided_loss.csv", start)
    text_encoder.train()
    unet.train()
    w = args.guidance
    t0 = time.time() - elapsed
    recent = []
    step = start
    bar = tqdm(range(start, args.guided_steps), desc="guided", initial=start, total=args.guided_steps, mininterval=10)
    for step in bar:
        done = progress(step, args.guided_steps, time.time() - t0, args.guided_minutes)
        if done >= 1.0:
            break
        gen = step_generator(args.seed + 3, step)
        idx, target, t, noisy = noisy_batch(args, mean, logvar, scaling_factor, acp, gen)
        token_ids, keep = table.pick(idx, gen)
        lr = cosine_lr(step, done, 100, args.guided_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            uncond_hidden = text_encoder(ids[empty : empty + 1]).last_hidden_state.expand(args.batch, -1, -1)
            uncond = unet(noisy, t, uncond_hidden).sample
            if teacher is not None:
                target = teacher[1](noisy, t, teacher[0](token_ids).last_hidden_state).sample
        pred = unet(noisy, t, text_encoder(token_ids).last_hidden_state).sample
        guided = uncond + w * (pred - uncond)
        per_sample_cond = ((guided - guided_target(uncond, target, args.guided_effective)) ** 2).mean(dim=(1, 2, 3)) / w
        per_sample_uncond = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = torch.where(keep, per_sample_cond, per_sample_uncond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(args.guided_ema, (1 + step) / (10 + step)))
        recent = log_step(recent, loss.item(), step, lr, t0, writer, log, bar)
        if (step + 1) % args.checkpoint_every == 0:
            save_unet_checkpoint(ckpt, text_encoder, unet, opt, ema, step + 1, time.time() - t0)
    else:
        step = args.guided_steps
    return end_stage("guided", ckpt, text_encoder, unet, opt, ema, params, step, start, t0)


def assemble(
    vae,
    text_encoder,
    unet,
    scaling_factor: float,
    beta_end: float = SD1_SCHEDULER["beta_end"],
    prediction_type="epsilon",
):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler(**scheduler_config(beta_end, prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def preview(pipe, prompts: list[str], path: Path) -> None:
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    tiles = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator("cpu").manual_seed(i)
        image = pipe(prompt, num_inference_steps=25, guidance_scale=7.5, generator=gen, output_type="np").images[0]
        tiles.append((image * 255).round().astype(np.uint8))
    rows = [np.concatenate(tiles[i : i + 8], axis=1) for i in range(0, len(tiles), 8)]
    rows = [np.pad(r, ((0, 0), (0, 8 * 32 - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows)).resize((8 * 96, len(rows) * 96), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("out/shapes-data"))
    parser.add_argument("--work", type=Path, default=Path("out/shapes-train"), help="checkpoints and loss logs")
    parser.add_argument("--out", type=Path, help="where to save the diffusers pipeline (omit in a pilot)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared machine)")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument(
        "--vae-minutes", type=float, default=7.0, help="wall-time budget of the VAE stage (ends it early)"
    )
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument(
        "--vae-widths", type=int, nargs="+", default=[16, 32], help="VAE channels per level (3: 4x, 2: 2x)"
    )
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-6)
    parser.add_argument("--decoder-steps", type=int, default=6000, help="decoder fine-tuning steps")
    parser.add_argument("--decoder-minutes", type=float, default=7.0, help="wall-time budget of the decoder stage")
    parser.add_argument("--decoder-lr", type=float, default=1e-3)
    parser.add_argument("--decoder-only", action="store_true", help="stop after the decoder stage")
    parser.add_argument("--steps", type=int, default=16000, help="U-Net + text encoder steps")
    parser.add_argument(
        "--minutes", type=float, default=112.0, help="wall-time budget of the U-Net stage; the LR follows it"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--guided-steps", type=int, default=2000, help="guidance-aware fine-tuning steps (0: none)")
    parser.add_argument(
        "--guided-minutes", type=float, help="wall-time budget of the guided stage (default: none, the steps decide)"
    )
    parser.add_argument("--guided-lr", type=float, default=2e-4)
    parser.add_argument("--guided-ema", type=float, default=0.995)
    parser.add_argument("--guidance", type=float, default=7.5, help="the guidance scale the guided stage aims at")
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument(
        "--unplaced-prob", type=float, default=0.2, help="share of captions trained without their position phrase"
    )
    parser.add_argument("--offset-noise", type=float, default=0.1, help="offset noise strength (0: plain noise)")
    parser.add_argument("--beta-end", type=float, default=0.02, help="end of the scaled-linear betas")
    parser.add_argument(
        "--guided-effective",
        type=float,
        default=2.5,
        help="the plain guidance the guided stage makes --guidance act as (1: none beyond the caption)",
    )
    parser.add_argument(
        "--guided-teacher",
        action="store_true",
        help="guided stage: distil the stage-4 model's own predictions instead of the true target",
    )
    parser.add_argument(
        "--vae-from", type=Path, help="a diffusers pipeline folder whose VAE to reuse (skips the VAE stages)"
    )
    parser.add_argument("--text-width", type=int, default=128)
    parser.add_argument("--text-layers", type=int, default=3)
    parser.add_argument("--unet-widths", type=int, nargs="+", default=[32, 64, 128], help="U-Net channels per level")
    parser.add_argument("--unet-layers", type=int, default=1)
    parser.add_argument(
        "--attn-levels", type=int, default=1, help="U-Net levels with attention, counted from the lowest resolution"
    )
    parser.add_argument("--attn-top", action="store_true", help="attention at every U-Net level")
    parser.add_argument(
        "--prediction-type", choices=("epsilon", "v_prediction"), default="v_prediction", help="what the U-Net predicts"
    )
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights (default: fp16)")
    parser.add_argument("--preview", type=int, default=16, help="held-out prompts drawn into preview.png (0: none)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    with open(args.work / "args.jsonl", "a") as f:
        f.write(json.dumps({k: str(v) for k, v in vars(args).items()}) + "\n")
    started = time.time()
    images = load_images(args.data)
    records = json.loads((args.data / "records.json").read_text())
    if args.vae_from:
        vae = load_vae(args.vae_from)
        mean, logvar, scaling_factor = encode_latents(args, vae, images, vae.config.scaling_factor)
    else:
        vae = train_vae(args, images)
        for p in vae.parameters():
            p.requires_grad_(False)
        mean, logvar, scaling_factor = encode_latents(args, vae, images)
        vae = finetune_decoder(args, vae, images, mean, logvar)
        check = args.work / "vae_round_trip.json"
        if not check.is_file():
            check.write_text(json.dumps(vae_round_trip(vae), indent=1))
    if args.decoder_only:
        return
    captions = [r["caption"] for r in records["train"]]
    text_encoder, unet = train_unet(args, mean, logvar, scaling_factor, captions)
    if args.guided_steps:
        text_encoder, unet = train_guided(args, text_encoder, unet, mean, logvar, scaling_factor, captions)
    pipe = assemble(vae, text_encoder, unet, scaling_factor, args.beta_end, args.prediction_type)
    if args.preview:
        held_out = [r["caption"] for r in records["eval"]][::5][: args.preview]
        preview(pipe, held_out, args.work / "preview.png")
    if args.out:
        if not args.fp32:
            pipe.to(torch.float16)
        pipe.save_pretrained(args.out, safe_serialization=True)
        size = sum(f.stat().st_size for f in args.out.rglob("*.safetensors"))
        print(f"saved {args.out} ({size / 1e6:.1f} MB of safetensors)", flush=True)
    print(f"done in {time.time() - started:.0f} s (this invocation)", flush=True)


if __name__ == "__main__":
    main()
