"""Train the bundled tiny FLUX pipeline (fluxlab/tiny) on captioned shapes, from scratch, seeded.

    python scripts/train_tiny.py [--out fluxlab/tiny] [--device cuda] [--scale 1.0]

FLUX's components scaled down (FluxTransformer2DModel, a 16-channel 8x AutoencoderKL, small CLIP and T5 text
encoders with offline tokenizers, the flow-matching scheduler), trained in three phases:
  1. the VAE, to reconstruct 128x128 shape images;
  2. transformer and text encoders with the rectified-flow objective FLUX uses (x_t = (1-t) x0 + t noise,
     predict noise - x0), captions dropped 10% of the time so the model also learns the unconditional velocity;
  3. guidance distillation, as FLUX.1-dev was: the student, given a guidance scale g in [1, 5], learns the
     teacher's classifier-free-guided velocity v_u + g (v_c - v_u), so `guidance_scale` works without a second pass.
With no options it repeats the shipped pipeline's run (3470 flow steps at batch 1024; 411 s on one H100).
`--budget-s` picks the flow steps that fit that many seconds here instead; `--scale` multiplies every phase's step
count (e.g. 0.01 for a quick CPU try). Prints progress and loss; writes the pipeline with save_pretrained
(safetensors) and training.json (steps, losses, times, device).
"""
import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from fluxlab import shapes
from fluxlab.pipeline import build_pipeline
from fluxlab.settings import TINY_DIR

RESOLUTION = 128
MAX_SEQUENCE_LENGTH = 64
TINY_CONFIGS = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=3, num_single_layers=6, attention_head_dim=32,
                        num_attention_heads=6, joint_attention_dim=128, pooled_projection_dim=64,
                        guidance_embeds=True, axes_dims_rope=[8, 12, 12]),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=16,
                block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=1.0, shift_factor=0.0,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
    "text_encoder": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=64,
                         hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1),
    "text_encoder_2": dict(vocab_size=128, d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=2,
                           feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False),
    "scheduler": dict(base_image_seq_len=64, base_shift=0.5, max_image_seq_len=1024, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
}
STEPS = dict(vae=600, flow=3470, distill=347)  # the shipped pipeline's run (--budget-s 360 on one H100)
BANK = 131072  # pre-encoded training images (random placements of the training captions)
BATCH = dict(vae=64, flow=1024, distill=1024)
LR = dict(flow=1e-3, distill=4e-4)
EMA_DECAY = 0.999  # the flow phase's weights are an exponential moving average (sharper samples than the last step)


class Progress:
    def __init__(self, phase: str, total: int):
        self.phase, self.total, self.start, self.losses = phase, total, time.perf_counter(), []

    def step(self, i: int, loss: torch.Tensor) -> None:
        self.losses.append(loss.item())
        if (i + 1) % max(1, self.total // 10) == 0 or i + 1 == self.total:
            recent = self.losses[-max(1, self.total // 10):]
            print(f"{self.phase}: step {i + 1}/{self.total} loss {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - self.start:.0f} s)", flush=True)

    def summary(self) -> dict:
        return dict(steps=self.total, seconds=round(time.perf_counter() - self.start, 1),
                    final_loss=sum(self.losses[-50:]) / max(1, len(self.losses[-50:])))


def batch_of(train: list, n: int, gen: torch.Generator) -> list:
    return [train[i] for i in torch.randint(len(train), (n,), generator=gen).tolist()]


def train_vae(vae, train, steps, batch, gen, device) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    progress = Progress("vae", steps)
    vae.train()
    for i in range(steps):
        x = shapes.draw(batch_of(train, batch, gen), RESOLUTION, gen, device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.step(i, loss)
    vae.eval().requires_grad_(False)
    # FLUX normalises latents as (z - shift) * scale: unit variance, zero mean.
    with torch.no_grad():
        z = torch.cat([vae.encode(shapes.draw(batch_of(train, 64, gen), RESOLUTION, gen, device)).latent_dist.mode()
                       for _ in range(8)])
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
    return progress.summary()


class Bank:
    """Training examples encoded once: packed, normalised VAE latents and token ids of their captions.

    Token ids come from the pipeline's own tokenizers with the pipeline's padding, so `encode` computes exactly
    what `FluxPipeline.encode_prompt` does at inference, with gradients."""

    def __init__(self, pipe, train, size, gen, device):
        vae, combos, latents = pipe.vae, batch_of(train, size, gen), []
        with torch.no_grad():
            for i in range(0, size, 512):
                z = vae.encode(shapes.draw(combos[i:i + 512], RESOLUTION, gen, device)).latent_dist.mode()
                z = (z - vae.config.shift_factor) * vae.config.scaling_factor
                b, c, h, w = z.shape
                latents.append(pipe._pack_latents(z, b, c, h, w))
        self.latents = torch.cat(latents)
        self.img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, z.dtype)
        captions = [shapes.caption(*c) for c in train] + [""]
        index = {c: i for i, c in enumerate(captions)}
        self.caption_index = torch.tensor([index[shapes.caption(*c)] for c in combos], device=device)
        self.empty = index[""]
        self.clip_ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer_max_length,
                                       truncation=True, return_tensors="pt").input_ids.to(device)
        self.t5_ids = pipe.tokenizer_2(captions, padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                                       truncation=True, return_tensors="pt").input_ids.to(device)

    def sample(self, n, gen):
        rows = torch.randint(len(self.latents), (n,), generator=gen, device=self.latents.device)
        return self.latents[rows], self.caption_index[rows]


def encode(pipe, bank, captions):
    pooled = pipe.text_encoder(bank.clip_ids[captions], output_hidden_states=False).pooler_output
    prompt_embeds = pipe.text_encoder_2(bank.t5_ids[captions], output_hidden_states=False)[0]
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=prompt_embeds.device)
    return prompt_embeds, pooled, text_ids


def velocity(transformer, x_t, t, g, text, img_ids):
    prompt_embeds, pooled, text_ids = text
    return transformer(hidden_states=x_t, timestep=t, guidance=g, pooled_projections=pooled,
                       encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]


def inference_shift(pipe, image_tokens: int) -> float:
    """The timestep shift FluxPipeline applies at this many image tokens (sigma -> s sigma / (1 + (s-1) sigma))."""
    c = pipe.scheduler.config
    return math.exp(calculate_shift(image_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                                    c.max_shift))


def noised(x0, gen, shift: float):
    """Rectified flow: t from a logit-normal (as SD3/FLUX), shifted towards noise as the sampler's steps are,
    x_t = (1 - t) x0 + t noise."""
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen, device=x0.device))
    t = shift * t / (1 + (shift - 1) * t)
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    return t, noise, (1 - t[:, None, None]) * x0 + t[:, None, None] * noise


def update(opt, sched, params, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def trainable(pipe):
    return [*pipe.transformer.parameters(), *pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]


def optimizer(params, lr, device):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.type == "cuda")


def flow_step(run, gen):
    x0, captions = run.bank.sample(run.batch, gen)
    dropped = torch.rand(run.batch, generator=gen, device=run.device) < 0.1
    captions = torch.where(dropped, run.bank.empty, captions)
    t, noise, x_t = noised(x0, gen, run.shift)
    g = torch.ones(run.batch, device=run.device)
    v = velocity(run.net, x_t, t, g, encode(run.pipe, run.bank, captions), run.bank.img_ids)
    return F.mse_loss(v, noise - x0)


def steps_within(budget_s: float, run) -> tuple[int, float]:
    """How many flow steps (plus a tenth as many distillation steps, ~2x the cost) fit `budget_s` here, timed
    with a zero learning rate (weights unchanged; it also compiles the step); the count goes into training.json,
    so `--flow-steps` reproduces the run."""
    params, gen = trainable(run.pipe), torch.Generator(run.device).manual_seed(12345)
    opt = optimizer(params, 0.0, run.device)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    for i in range(13):
        if i == 3:  # after warm-up (and compilation)
            sync()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        flow_step(run, gen).backward()
        opt.step()
    sync()
    seconds = (time.perf_counter() - start) / 10
    return int(budget_s / (1.2 * seconds)), seconds


def train_flow(run, steps, gen) -> dict:
    params = trainable(run.pipe)
    ema = [p.detach().clone() for p in params]
    opt = optimizer(params, LR["flow"], run.device)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR["flow"], total_steps=steps, pct_start=0.05)
    progress = Progress("flow", steps)
    for i in range(steps):
        loss = flow_step(run, gen)
        update(opt, sched, params, loss)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(EMA_DECAY, (1 + i) / (10 + i)))
        progress.step(i, loss)
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    return progress.summary()


def distill_guidance(run, steps, gen) -> dict:
    teacher = copy.deepcopy(run.pipe)
    for m in (teacher.transformer, teacher.text_encoder, teacher.text_encoder_2):
        m.eval().requires_grad_(False)
    teacher_net = run.wrap(teacher.transformer)
    params = trainable(run.pipe)
    opt = optimizer(params, LR["distill"], run.device)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR["distill"], total_steps=steps, pct_start=0.05)
    progress = Progress("distill", steps)
    bank, batch, device = run.bank, run.batch, run.device
    for i in range(steps):
        x0, captions = bank.sample(batch, gen)
        empty = torch.full_like(captions, bank.empty)
        t, noise, x_t = noised(x0, gen, run.shift)
        g = 1 + 4 * torch.rand(batch, generator=gen, device=device)
        with torch.no_grad():
            ones = torch.ones(batch, device=device)
            v_c = velocity(teacher_net, x_t, t, ones, encode(teacher, bank, captions), bank.img_ids)
            v_u = velocity(teacher_net, x_t, t, ones, encode(teacher, bank, empty), bank.img_ids)
            target = v_u + g[:, None, None] * (v_c - v_u)
        v = velocity(run.net, x_t, t, g, encode(run.pipe, bank, captions), bank.img_ids)
        loss = F.mse_loss(v, target)
        update(opt, sched, params, loss)
        progress.step(i, loss)
    return progress.summary()


@dataclasses.dataclass
class Run:
    """What the flow and distillation phases share: the pipeline, its training bank, and the transformer to call
    (compiled on CUDA: the tiny model's step is launch-bound, and inductor's fused kernels cut the launches)."""

    pipe: object
    bank: Bank
    batch: int
    device: torch.device
    shift: float
    compile: bool
    net: object = dataclasses.field(init=False)

    def __post_init__(self):
        self.net = self.wrap(self.pipe.transformer)

    def wrap(self, transformer):
        return torch.compile(transformer) if self.compile else transformer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TINY_DIR))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every phase's steps")
    parser.add_argument("--flow-steps", type=int, help="flow steps (distillation gets a tenth as many)")
    parser.add_argument("--budget-s", type=float, help="choose the flow steps that fit this many seconds here")
    parser.add_argument("--batch", type=int, default=BATCH["flow"], help="flow and distillation batch")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the transformer's training step (default: on CUDA only)")
    args = parser.parse_args()
    if args.scale <= 0 or (args.flow_steps or 1) <= 0 or (args.budget_s or 1) <= 0 or args.batch <= 0:
        raise SystemExit("error: --scale, --flow-steps, --budget-s and --batch must be > 0")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator().manual_seed(args.seed)
    steps = {k: max(1, math.ceil(v * args.scale)) for k, v in STEPS.items()}
    if args.flow_steps:
        steps.update(flow=args.flow_steps, distill=max(1, args.flow_steps // 10))
    train, held_out = shapes.split()
    print(f"training on {device}: {len(train)} captions ({len(held_out)} held out)", flush=True)
    pipe = build_pipeline(TINY_CONFIGS, device, torch.float32, seed=args.seed)
    start = time.perf_counter()
    batch = dict(BATCH, flow=args.batch, distill=args.batch)
    compiled = device.type == "cuda" if args.compile is None else args.compile
    log = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", seed=args.seed,
               steps=steps, batch=batch, lr=LR, compile=compiled, resolution=RESOLUTION,
               max_sequence_length=MAX_SEQUENCE_LENGTH, torch=torch.__version__)
    log["vae"] = train_vae(pipe.vae, train, steps["vae"], BATCH["vae"], gen, device)
    bank = Bank(pipe, train, max(64, int(BANK * min(1.0, args.scale))), gen, device)
    run = Run(pipe, bank, args.batch, device, inference_shift(pipe, bank.latents.shape[1]), compiled)
    log["timestep_shift"] = round(run.shift, 4)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.train().requires_grad_(True)
    if args.budget_s:
        flow, seconds = steps_within(args.budget_s, run)
        steps.update(flow=flow, distill=max(1, flow // 10))
        log["budget"] = dict(seconds=args.budget_s, flow_step_s=round(seconds, 4))
        print(f"flow step {seconds * 1e3:.1f} ms (batch {args.batch})", flush=True)
    print(f"steps {steps}", flush=True)
    gen = torch.Generator(device).manual_seed(args.seed)  # noise drawn where it is used, not copied over
    log["flow"] = train_flow(run, steps["flow"], gen)
    log["distill"] = distill_guidance(run, steps["distill"], gen)
    log["total_seconds"] = round(time.perf_counter() - start, 1)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.eval().requires_grad_(False)
    pipe.to("cpu")
    pipe.transformer.to(torch.float16)  # stored in float16 to keep the package small; fluxlab loads it as float32
    pipe.save_pretrained(args.out, safe_serialization=True)
    Path(args.out, "training.json").write_text(json.dumps(log, indent=1))
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {log['total_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
