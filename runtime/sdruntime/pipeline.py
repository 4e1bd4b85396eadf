"""Text-to-image and image-to-image on an exported folder, step for step as diffusers'
StableDiffusionPipeline and StableDiffusionImg2ImgPipeline do, with NumPy and ONNX Runtime only.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .conditioning import MicroConditioning, guidance_scale_embedding, img2img_time_ids, txt2img_time_ids
from .errors import InvalidArgument
from .image import init_image_hash, load_init_image, parameters_text, save_image, short_hash, to_pil
from .manifest import FINAL_LAYER_NORM, ExportError, HashCache, latent_shape, read_manifest
from .noise import make_generator, randn_tensor
from .schedulers import (
    SCHEDULERS,
    TIMESTEP_SPACINGS,
    Scheduler,
    img2img_begin_index,
    make_scheduler,
    scheduler_name_for_class,
)
from .session import Component, SessionSettings, check_cpu_layout, first_provider, resolve_providers
from .tokenizer import PromptTokenizer

StepCallback = Callable[[int, float, np.ndarray], None]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class GenerationError(InvalidArgument):
    """A request the pipeline cannot honour; the message says what to change."""


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: np.ndarray
    parameters: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    # seconds: "total", "denoise" (the loop), "unet" (inside the U-Net's session runs), "steps"
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> list[Path]:
        """Write the images with their parameters, as PNG, JPEG or WebP by the extension; several images
        get numbered names (out-0.png, out-1.png)."""
        path = Path(path)
        if len(self.images) == 1:
            return [save_image(self.images[0], path, self.parameters[0])]
        return [
            save_image(image, path.with_name(f"{path.stem}-{i}{path.suffix}"), text)
            for i, (image, text) in enumerate(zip(self.images, self.parameters))
        ]


def read_scheduler_config(folder: str | Path) -> dict:
    """An export's scheduler_config.json, as written: schedulers give the keys it lacks their own defaults.

    Exports made before the exporter kept the source's form have every key; they run as they always did.
    """
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing: run `sdexport convert` again to rewrite the export")
    return json.loads(path.read_text(encoding="utf-8"))


def final_layer_norm(hidden: np.ndarray, norm) -> np.ndarray:
    """CLIP's final LayerNorm (weights from FINAL_LAYER_NORM) over the last axis."""
    mean = hidden.mean(axis=-1, keepdims=True)
    var = np.square(hidden - mean).mean(axis=-1, keepdims=True)
    return ((hidden - mean) / np.sqrt(var + norm["eps"]) * norm["weight"] + norm["bias"]).astype(np.float32)


def _as_list(value: str | Sequence[str], what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value or not all(isinstance(v, str) for v in value):
        raise GenerationError(f"{what} must be a string or a non-empty list of strings")
    return list(value)


class StableDiffusionPipeline:
    """An exported folder, loaded on one execution provider."""

    def __init__(self, folder: Path, provider, settings: SessionSettings, verify: bool):
        self.manifest = read_manifest(folder)
        self.folder = Path(folder)
        facts = self.manifest.pipeline
        self.xl = facts.family == "sdxl"
        # SDXL's text encoders: both (base), or the second alone (refiner); SD 1.x/2.x: the one
        self.encoders = tuple(n for n in TEXT_ENCODERS if self.manifest.has(n)) if self.xl else ("text_encoder",)
        for needed in (*(self.encoders or ("text_encoder_2",)), "unet", "vae_decoder"):
            if not self.manifest.has(needed):
                raise ExportError(
                    f"{folder} has no {needed}: export it with `sdexport convert` (all components are needed to draw)"
                )
        if verify:
            self.manifest.verify(cache=HashCache())
        self.providers = resolve_providers(provider, self.manifest.target)
        check_cpu_layout(self.manifest)
        if self.manifest.dtype == "fp16" and first_provider(self.providers) == "CPUExecutionProvider":
            warnings.warn(
                "this export is fp16: the CPU EP runs fp16 graphs slower than fp32 ones (it casts around "
                "most ops); export fp32 for CPU",
                stacklevel=3,
            )
        self.settings = settings
        self.tokenizers = {
            name: PromptTokenizer(self.folder / folder / "tokenizer.json", max_length, pad_id)
            for name, (folder, max_length, pad_id) in {
                "text_encoder": ("tokenizer", facts.tokenizer_max_length, facts.pad_token_id),
                "text_encoder_2": ("tokenizer_2", facts.tokenizer_2_max_length, facts.tokenizer_2_pad_token_id),
            }.items()
            if name in self.encoders
        }
        self.tokenizer = self.tokenizers[self.encoders[0]]
        self.scheduler_config = read_scheduler_config(self.folder)
        self.default_scheduler = scheduler_name_for_class(facts.scheduler_class, self.scheduler_config) or "pndm"
        self.model_hash = self._model_hash()
        self._components: dict[str, Component] = {}
        names = (*self.encoders, "unet", "vae_decoder")
        if first_provider(self.providers) == "CPUExecutionProvider":
            # ORT lets go of the GIL while it loads a model: for SD 1.5 on 2 cores the three sessions
            # were created in 1.5-1.9 s side by side against 2.8-3.2 s one after another
            with ThreadPoolExecutor(len(names)) as pool:
                self._components.update(zip(names, pool.map(self._create, names)))
        for name in names:
            self.component(name)

    @classmethod
    def load(
        cls, folder: str | Path, provider="cpu", *, settings: SessionSettings | None = None, verify: bool = True
    ) -> StableDiffusionPipeline:
        """Load an export; `provider` is "cpu", "cuda", "tensorrt" or a list of ORT providers."""
        return cls(Path(folder), provider, settings or SessionSettings(), verify)

    def component(self, name: str) -> Component:
        """A component's session, created on first use (the VAE encoder only for image-to-image)."""
        if name not in self._components:
            self._components[name] = self._create(name)
        return self._components[name]

    def _create(self, name: str) -> Component:
        if not self.manifest.has(name):
            raise ExportError(f"{self.folder} has no {name}: export it with `sdexport convert --components ...,{name}`")
        return Component(self.manifest, name, self.providers, self.settings)

    def _model_hash(self) -> str:
        """Short sha256 over the manifest's hashes of the files that draw (text encoders, U-Net, VAE decoder)."""
        digest = hashlib.sha256()
        for name in (*self.encoders, "unet", "vae_decoder"):
            for entry in self.manifest.components[name].files:
                digest.update(f"{entry.path} {entry.sha256}\n".encode())
        return short_hash(digest.hexdigest())

    @property
    def component_providers(self) -> dict[str, str]:
        """Which execution provider runs each loaded component."""
        return {name: c.provider for name, c in self._components.items()}

    # -- the steps of a generation -----------------------------------------------------------

    def encode_prompt(
        self, prompts: list[str], negative: list[str] | None, num_images: int, clip_skip: int | None = None
    ) -> np.ndarray:
        """Text embeddings [uncond..., cond...] (or cond only), each prompt repeated num_images times.

        With clip_skip, the prompts' embeddings (not the negative prompts', as in diffusers) are the
        final LayerNorm of the hidden state clip_skip layers before the last.
        """
        ids = self.tokenizer(prompts if negative is None else negative + prompts)
        outputs = self.component("text_encoder")(input_ids=ids)
        embeddings = outputs["last_hidden_state"]
        if clip_skip:
            embeddings[-len(prompts) :] = self.skipped_hidden_state(outputs, clip_skip)[-len(prompts) :]
        if negative is None:
            return np.repeat(embeddings, num_images, axis=0)
        uncond, cond = np.split(embeddings, 2)
        return np.concatenate([np.repeat(uncond, num_images, axis=0), np.repeat(cond, num_images, axis=0)])

    def skipped_hidden_state(self, outputs: dict[str, np.ndarray], clip_skip: int) -> np.ndarray:
        count = int(self.manifest.pipeline.num_hidden_states or 0)
        if not count:
            raise GenerationError(
                "clip_skip needs the text encoder's hidden states, which this export lacks: re-export it"
            )
        if not 1 <= clip_skip < count:
            raise GenerationError(f"clip_skip must be between 1 and {count - 1} for this text encoder, got {clip_skip}")
        hidden = outputs[f"hidden_states.{count - 1 - clip_skip}"]
        return final_layer_norm(hidden, np.load(self.folder / FINAL_LAYER_NORM))

    def encode_prompt_xl(
        self,
        prompts: list[str],
        negative: list[str] | None,
        num_images: int,
        clip_skip: int | None = None,
        zero_negative: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """SDXL's (embeddings, pooled embeddings), [uncond..., cond...] (or cond only), each prompt repeated
        num_images times, as StableDiffusionXLPipeline.encode_prompt builds them.

        The embeddings are each encoder's penultimate hidden state (clip_skip layers further back for the
        prompts, never for the negative prompts, as in diffusers), joined along the last axis; the pooled
        ones are the second encoder's projected `text_embeds`. `zero_negative` (no negative prompt with
        force_zeros_for_empty_prompt) makes the unconditional half zeros instead of encoding "".
        """
        facts = self.manifest.pipeline
        texts = prompts if negative is None or zero_negative else negative + prompts
        n = len(prompts)
        hidden, pooled = [], None
        for name in self.encoders:
            count = int((facts.num_hidden_states_2 if name == "text_encoder_2" else facts.num_hidden_states) or 0)
            if clip_skip and not 1 <= clip_skip <= count - 2:
                raise GenerationError(
                    f"clip_skip must be between 1 and {count - 2} for this text encoder, got {clip_skip}"
                )
            outputs = self.component(name)(input_ids=self.tokenizers[name](texts))
            states = outputs[f"hidden_states.{count - 2}"]
            if clip_skip:
                states[-n:] = outputs[f"hidden_states.{count - 2 - clip_skip}"][-n:]
            hidden.append(states)
            if pooled is None and "text_embeds" in outputs:
                pooled = outputs["text_embeds"]
        embeddings = np.concatenate(hidden, axis=-1)
        if negative is not None and zero_negative:
            embeddings = np.concatenate([np.zeros_like(embeddings), embeddings])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        if negative is None:
            return np.repeat(embeddings, num_images, axis=0), np.repeat(pooled, num_images, axis=0)

        def halves(x: np.ndarray) -> np.ndarray:
            uncond, cond = np.split(x, 2)
            return np.concatenate([np.repeat(uncond, num_images, axis=0), np.repeat(cond, num_images, axis=0)])

        return halves(embeddings), halves(pooled)

    def check_size(self, height: int, width: int) -> None:
        multiple = self.manifest.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise GenerationError(
                    f"{name} {value} is not a positive multiple of {multiple}, this export's size multiple"
                )
        static = self.manifest.static
        if static and (height, width) != (static.height, static.width):
            raise GenerationError(
                f"this export is static at {static.height}x{static.width}: ask for that size or re-export"
            )

    def denoise(
        self,
        latents: np.ndarray,
        embeddings: np.ndarray,
        scheduler: Scheduler,
        guidance_scale: float,
        generator,
        callback: StepCallback | None,
        progress: bool,
        conditioning: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The classifier-free-guidance loop over the scheduler's steps; the U-Net's inputs stay bound across
        steps, and the noise a step adds is drawn here, from the run's generator. `conditioning` holds the
        U-Net's further inputs that stay the same at every step (SDXL's text_embeds and time_ids, an LCM
        U-Net's timestep_cond)."""
        guided = embeddings.shape[0] == 2 * latents.shape[0]
        unet = self.component("unet")
        batch = embeddings.shape[0]
        sample = np.concatenate([latents] * 2) if guided else latents
        feeds = {
            "sample": sample,
            "timestep": np.zeros(batch, np.float32),
            "encoder_hidden_states": embeddings,
            **(conditioning or {}),
        }
        binding = unet.bind(feeds) if unet.static_batch in (None, batch) else None
        steps = scheduler.step_indices
        if progress:
            steps = tqdm(steps, desc="denoising", unit="step")
        for n, i in enumerate(steps):
            t = scheduler.timesteps[i]
            model_input = np.concatenate([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, i)
            timestep = np.full(batch, t, np.float32)
            if binding is not None:
                binding.update("sample", model_input)
                binding.update("timestep", timestep)
                noise_pred = binding.run()["out_sample"]
            else:  # a static export whose batch differs: pad through the plain call
                noise_pred = unet(**{**feeds, "sample": model_input, "timestep": timestep})["out_sample"]
            if guided:
                uncond, cond = np.split(noise_pred, 2)
                noise_pred = uncond + np.float32(guidance_scale) * (cond - uncond)
            noise = randn_tensor(latents.shape, generator) if scheduler.needs_noise(i) else None
            latents = scheduler.step(i, noise_pred, latents, noise)  # float32 already
            if callback is not None:
                callback(n, float(t), latents)
        return latents

    def vae_decode(self, latents: np.ndarray) -> np.ndarray:
        scaled = latents / np.float32(self.manifest.pipeline.vae_scaling_factor)
        return self.component("vae_decoder")(latent_sample=scaled)["sample"]

    def vae_encode(self, image: np.ndarray, generator) -> np.ndarray:
        """Sample the VAE's latent distribution, scaled, as diffusers' `retrieve_latents` does."""
        parameters = self.component("vae_encoder")(sample=image)["latent_parameters"]
        mean, logvar = np.split(parameters, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        sample = mean + std * randn_tensor(mean.shape, generator)
        return sample * np.float32(self.manifest.pipeline.vae_scaling_factor)

    def image_latents(self, image: np.ndarray, batch: int, generator, scheduler: Scheduler) -> np.ndarray:
        """Noised latents of an init image at the first step's noise level
        (StableDiffusionImg2ImgPipeline.prepare_latents)."""
        if isinstance(generator, list):
            images = np.concatenate([image] * batch)
            init = np.concatenate([self.vae_encode(images[i : i + 1], generator[i]) for i in range(batch)])
        else:
            init = self.vae_encode(image, generator)
            if batch > init.shape[0]:
                init = np.concatenate([init] * (batch // init.shape[0]))
        noise = randn_tensor(init.shape, generator)
        return scheduler.add_noise(init, noise, scheduler.begin_index).astype(np.float32)

    # -- the call ------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str] | None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int | Sequence[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        latents: np.ndarray | None = None,
        eta: float = 0.0,
        clip_skip: int | None = None,
        callback: StepCallback | None = None,
        image: str | Path | Image.Image | None = None,
        strength: float | None = None,
        progress: bool = False,
        prompt_embeds: np.ndarray | None = None,
        timestep_spacing: str | None = None,
        scheduler_options: Mapping[str, object] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
    ) -> GenerationResult:
        """Draw images; arguments mean what they mean in diffusers' pipelines (StableDiffusionPipeline and
        StableDiffusionImg2ImgPipeline, or their XL forms for an SDXL export). `guidance_scale` and
        `strength` default to diffusers' 7.5 and 0.8, or 5.0 and 0.3 for SDXL. The sizes, crops and
        aesthetic scores are SDXL's micro-conditioning; sizes are (height, width), None meaning the
        generated size.

        `prompt_embeds` ([len(prompt), max_length, hidden]) replaces the text encoder's output for
        the prompts (the negative prompts are still encoded), as in diffusers; `prompt` may then be None.

        The scheduler is built from the export's scheduler config as `Cls.from_config(config)` builds it;
        `timestep_spacing` ("leading", "linspace" or "trailing") and `scheduler_options` (other config keys,
        e.g. {"steps_offset": 1}) override it, as `Cls.from_config(config, **options)` does.
        """
        call_started = time.perf_counter()
        if prompt is None and prompt_embeds is None:
            raise GenerationError("give a prompt, or prompt_embeds")
        prompts = [""] * len(prompt_embeds) if prompt is None else _as_list(prompt, "prompt")
        if prompt_embeds is not None and len(prompt_embeds) != len(prompts):
            raise GenerationError(
                f"{len(prompt_embeds)} prompt embeddings for {len(prompts)} prompts: give one per prompt"
            )
        negatives = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if negatives is not None and len(negatives) != len(prompts):
            raise GenerationError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one or as many")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise GenerationError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if num_images < 1:
            raise GenerationError(f"num_images must be at least 1, got {num_images}")
        micro = MicroConditioning(
            original_size,
            tuple(crops_coords_top_left),
            target_size,
            negative_original_size,
            tuple(negative_crops_coords_top_left),
            negative_target_size,
            aesthetic_score,
            negative_aesthetic_score,
        )
        if not self.xl and micro != MicroConditioning():
            raise GenerationError("sizes, crops and aesthetic scores condition SDXL exports only; this one is not SDXL")
        if self.xl and prompt_embeds is not None:
            raise GenerationError(
                "prompt_embeds needs pooled embeddings too on SDXL, which this pipeline does not take: pass prompts"
            )
        if strength is None:
            strength = 0.3 if self.xl else 0.8
        if guidance_scale is None:
            guidance_scale = 5.0 if self.xl else 7.5
        if image is not None and not 0.0 < strength <= 1.0:
            raise GenerationError(f"strength must be in (0, 1], got {strength}")
        name = scheduler or self.default_scheduler
        if name not in SCHEDULERS:
            raise GenerationError(f"unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}")
        options = dict(scheduler_options or {})
        if timestep_spacing is not None:
            if timestep_spacing not in TIMESTEP_SPACINGS:
                raise GenerationError(
                    f"unknown timestep_spacing '{timestep_spacing}': choose one of {', '.join(TIMESTEP_SPACINGS)}"
                )
            options["timestep_spacing"] = timestep_spacing

        facts = self.manifest.pipeline
        batch = len(prompts) * num_images
        if image is not None and height is None and width is None and not isinstance(image, np.ndarray):
            height, width = self._init_image_size(image)
        static = self.manifest.static
        default = (static.height, static.width) if static else (facts.default_height, facts.default_width)
        height = default[0] if height is None else height
        width = default[1] if width is None else width
        self.check_size(height, width)

        # one generator per image for a list of seeds, and for a random batch: each image's seed draws it alone
        per_image = isinstance(seed, (list, tuple)) or (seed is None and batch > 1)
        seeds = self._seeds(seed, batch)
        generator = make_generator(seeds if per_image else seeds[0])
        sched = make_scheduler(
            name, self.scheduler_config, num_inference_steps, options, eta=eta if name == "ddim" else 0.0
        )
        # an LCM U-Net takes the guidance scale as an embedding (timestep_cond) instead of a second batch
        lcm_dim = facts.time_cond_proj_dim
        guided = guidance_scale > 1.0 and lcm_dim is None
        if lcm_dim is None and (guidance_scale < 1.0 or (guidance_scale == 1.0 and negative_prompt)):
            warnings.warn(
                f"guidance_scale {guidance_scale:g} <= 1 turns classifier-free guidance off, as in diffusers: the "
                "prompt alone steers and the negative prompt is unused; use a value above 1 to guide",
                stacklevel=2,
            )
        if eta and name != "ddim":
            warnings.warn(f"eta {eta:g} only applies to ddim: {name} ignores it", stacklevel=2)
        zero_negative = bool(self.xl and negatives is None and facts.force_zeros_for_empty_prompt)
        negatives = (negatives or [""] * len(prompts)) if guided else None
        conditioning: dict[str, np.ndarray] = {}
        if lcm_dim is not None:
            conditioning["timestep_cond"] = guidance_scale_embedding([guidance_scale - 1.0] * batch, lcm_dim)
        if self.xl:
            embeddings, pooled = self.encode_prompt_xl(prompts, negatives, num_images, clip_skip, zero_negative)
            conditioning["text_embeds"] = pooled
            size = (height, width)
            if image is None:
                conditioning["time_ids"] = txt2img_time_ids(micro, size, batch, guided)
            else:
                aesthetic = bool(facts.requires_aesthetics_score)
                conditioning["time_ids"] = img2img_time_ids(micro, size, batch, guided, aesthetic)
        elif prompt_embeds is None:
            embeddings = self.encode_prompt(prompts, negatives, num_images, clip_skip)
        else:
            embeddings = np.repeat(np.asarray(prompt_embeds, np.float32), num_images, axis=0)
            if negatives is not None:
                uncond = self.encode_prompt(negatives, None, num_images)
                embeddings = np.concatenate([uncond, embeddings])

        shape = latent_shape(facts, batch, height, width)
        if image is not None:
            init = load_init_image(image, width, height)
            begin = img2img_begin_index(num_inference_steps, strength, sched.order)
            if begin >= len(sched.timesteps):
                raise GenerationError(
                    f"strength {strength} with {num_inference_steps} steps leaves no step to run: raise either"
                )
            sched = sched.starting_at(begin)
            start_latents = self.image_latents(init, batch, generator, sched)
        else:
            if latents is not None:
                if tuple(latents.shape) != shape:
                    raise GenerationError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
                noise = np.asarray(latents, dtype=np.float32)
            else:
                noise = randn_tensor(shape, generator)
            start_latents = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)

        unet = self.component("unet")
        unet_before, loop_started = unet.run_seconds, time.perf_counter()
        final = self.denoise(
            start_latents, embeddings, sched, guidance_scale, generator, callback, progress, conditioning
        )
        timings = {
            "denoise": time.perf_counter() - loop_started,
            "unet": unet.run_seconds - unet_before,
            "steps": float(len(sched.step_indices)),
        }
        images = to_pil(self.vae_decode(final))
        timings["total"] = time.perf_counter() - call_started
        # A1111's fields first, in its order; then what only this runtime sets
        method = {
            "Steps": num_inference_steps,
            "Sampler": name,
            "Timestep spacing": sched.config.get("timestep_spacing"),
            "CFG scale": f"{guidance_scale:g}",
        }
        settings = {
            "Size": f"{width}x{height}",
            "Model hash": self.model_hash,
            "Model": Path(self.manifest.source.name).name,
            "Denoising strength": f"{strength:g}" if image is not None else None,
            "Init image hash": init_image_hash(image) if image is not None else None,
            "Clip skip": clip_skip or None,
            "Eta": f"{eta:g}" if name == "ddim" else None,
            "Scheduler options": "; ".join(f"{k}={v}" for k, v in (scheduler_options or {}).items()) or None,
            "Latents": "given" if latents is not None and image is None else None,
            "Prompt embeds": "given" if prompt_embeds is not None else None,
        }
        texts = []
        for i in range(batch):
            # a shared generator draws the whole batch: its seed brings image i back only with the batch
            batch_fields = {} if per_image or batch == 1 else {"Batch size": batch, "Batch pos": i}
            fields = {**method, "Seed": seeds[i] if per_image else seeds[0], **settings, **batch_fields}
            negative = (negatives or [""] * len(prompts))[i // num_images]
            texts.append(parameters_text(prompts[i // num_images], negative, fields))
        return GenerationResult(images=images, latents=final, parameters=texts, seeds=seeds, timings=timings)

    def _init_image_size(self, image) -> tuple[int, int]:
        """The init image's size rounded down to the size multiple (diffusers rounds to the VAE factor)."""
        if not isinstance(image, Image.Image):
            image = load_init_image_size(image)
        m = self.manifest.size_multiple
        return max(m, image.height // m * m), max(m, image.width // m * m)

    @staticmethod
    def _seeds(seed, batch: int) -> list[int]:
        if seed is None:
            start = secrets.randbelow(2**32 - batch + 1)
            return list(range(start, start + batch))
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch:
                raise GenerationError(f"{len(seed)} seeds for {batch} images: give one seed or one per image")
            return [int(s) for s in seed]
        return [int(seed)]


def load_init_image_size(path) -> Image.Image:
    """Open an init image just to read its size; errors as load_init_image's."""
    try:
        return Image.open(path)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read the init image {path}: {e}; pass a PNG or JPEG file") from e
