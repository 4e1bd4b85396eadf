"""Text-to-image, image-to-image and inpainting on an SD3 or Flux export, step for step as diffusers'
StableDiffusion3(Img2Img|Inpaint)Pipeline and Flux(Img2Img|Inpaint)Pipeline do, with NumPy and ONNX Runtime only.

Both families denoise with flow matching (FlowMatchEulerDiscreteScheduler: the transformer predicts a velocity)
and keep their latents as (z - vae_shift_factor) * vae_scaling_factor. SD3's transformer reads latents
[B, 16, h, w], CLIP-L's and CLIP-G's penultimate states beside T5's and a pooled pair, timesteps sigma x 1000,
and guides as Stable Diffusion does. Flux's reads 2x2-packed latents (flux_latents.py) with their rotary
positions, T5's states and CLIP-L's pooled output, the sigma itself, and dev's embedded guidance; its classifier-
free guidance ("true CFG") is optional.

Where diffusers differs: SD3's inpainting pipeline decodes without adding the VAE's shift (its own image latents
are shifted, so the picture is off by it; diffusers issue 13611, fixed in PR 14671): here every pipeline decodes
latents / scaling + shift. SD3's image-to-image with one generator per image fails in diffusers when given one
image; here each image's latents are encoded with its own generator, as diffusers does given the image once per
image.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .decoders import PreviewCallback, Previewer, step_callback
from .flux_latents import latent_image_ids, pack_latents, unpack_latents
from .image import load_init_image, short_hash, to_pil
from .inpaint import load_mask, mask_to_latents
from .manifest import TRANSFORMER_FAMILIES, ExportError, HashCache, read_manifest
from .memory import MemoryBudget, resident_memory
from .noise import TorchGenerator, randn_tensor
from .plan import ExportFacts
from .request import GenerationError, GenerationRequest
from .result import GenerationResult, StepCallback
from .schedulers import Scheduler, read_scheduler_config
from .session import Component, SessionSettings, check_cpu_layout, first_provider, resolve_providers
from .t5_tokenizer import T5PromptTokenizer
from .tokenizer import PromptTokenizer
from .transformer_plan import T5_ENCODER, TransformerPlan, resolve_transformer_plan

# __call__'s arguments that are not GenerationRequest fields: how the run reports, not what it draws
REPORTING_ARGUMENTS = ("self", "callback", "progress", "preview_callback", "preview_every")

Generator = TorchGenerator | list[TorchGenerator]
CLIP_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
T5_TOKENIZER = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}


@dataclass(frozen=True, eq=False)
class KeptRegion:
    """Inpainting with a plain transformer: after each step the region the mask keeps is put back, as the
    init image's latents noised to the next step's sigma (the last step keeps them clean)."""

    mask: np.ndarray  # 1 where the picture is repainted, in the latents' layout (packed for Flux)
    image_latents: np.ndarray
    noise: np.ndarray

    def after_step(self, latents: np.ndarray, scheduler: Scheduler, i: int) -> np.ndarray:
        kept = self.image_latents
        if i + 1 < len(scheduler.timesteps):
            kept = scheduler.add_noise(kept, self.noise, i + 1)
        return ((1 - self.mask) * kept + self.mask * latents).astype(np.float32)


class TransformerPipeline:
    """An SD3 or Flux export, loaded on one execution provider."""

    def __init__(self, folder: Path, provider, settings: SessionSettings, verify: bool, max_memory: int | None = None):
        self.manifest = read_manifest(folder)
        self.folder = Path(folder)
        facts = self.manifest.pipeline
        if facts.family not in TRANSFORMER_FAMILIES:
            raise ExportError(f"{folder} is a {facts.family} export: load it with StableDiffusionPipeline.load")
        self.family = facts.family
        self.t5 = T5_ENCODER[self.family]
        clips = ("text_encoder", "text_encoder_2") if self.family == "sd3" else ("text_encoder",)
        # SD3 draws without T5 (zeros stand for its states, as in diffusers); Flux's T5 gives all the text states
        self.encoders = clips + ((self.t5,) if self.family == "flux" or self.manifest.has(self.t5) else ())
        for needed in (*self.encoders, "transformer", "vae_decoder"):
            if not self.manifest.has(needed):
                raise ExportError(
                    f"{folder} has no {needed}: export it with `sdexport convert` (all components are needed to draw)"
                )
        if verify:
            self.manifest.verify(cache=HashCache())
        self.providers = resolve_providers(provider, self.manifest.target)
        check_cpu_layout(self.manifest)
        if self.manifest.dtype == "fp16" and first_provider(self.providers) == "CPUExecutionProvider":
            warnings.warn("this export is fp16: the CPU EP runs fp16 graphs slowly; export fp32 for CPU", stacklevel=3)
        self.settings = settings
        self.tokenizers = {
            "text_encoder": PromptTokenizer(
                self.folder / "tokenizer" / "tokenizer.json", facts.tokenizer_max_length, facts.pad_token_id
            )
        }
        if self.family == "sd3":
            self.tokenizers["text_encoder_2"] = PromptTokenizer(
                self.folder / "tokenizer_2" / "tokenizer.json",
                int(facts.tokenizer_2_max_length),
                int(facts.tokenizer_2_pad_token_id),
            )
        self._t5_tokenizers: dict[int, T5PromptTokenizer] = {}  # by max_sequence_length
        self.scheduler_config = read_scheduler_config(self.folder)
        self.export = ExportFacts.of(self.manifest, self.scheduler_config)
        self.default_scheduler = self.export.default_scheduler
        self.model_hash = self._model_hash()
        self._components: dict[str, Component] = {}
        names = (*self.encoders, "transformer", "vae_decoder")
        if first_provider(self.providers) == "CPUExecutionProvider":
            with ThreadPoolExecutor(len(names)) as pool:  # ORT lets go of the GIL while it loads (pipeline.py)
                self._components.update(zip(names, pool.map(self._create, names)))
        for name in names:
            self.component(name)
        # memory.py's estimates model the U-Net and its VAE: these families draw each request in one piece
        self.memory_model = None
        self.memory_budget = MemoryBudget(max_memory)
        self.loaded_resident = resident_memory()

    @classmethod
    def load(
        cls,
        folder: str | Path,
        provider="cpu",
        *,
        settings: SessionSettings | None = None,
        verify: bool = True,
        max_memory: int | None = None,
    ) -> TransformerPipeline:
        """Load an SD3 or Flux export; `provider` is "cpu", "cuda", "tensorrt" or a list of ORT providers.
        `max_memory` is taken for StableDiffusionPipeline.load's sake: these families are drawn in one piece."""
        return cls(Path(folder), provider, settings or SessionSettings(), verify, max_memory)

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
        """Short sha256 over the manifest's hashes of the files that draw (text encoders, transformer, VAE decoder)."""
        digest = hashlib.sha256()
        for name in (*self.encoders, "transformer", "vae_decoder"):
            for entry in self.manifest.components[name].files:
                digest.update(f"{entry.path} {entry.sha256}\n".encode())
        return short_hash(digest.hexdigest())

    @property
    def component_providers(self) -> dict[str, str]:
        return {name: c.provider for name, c in self._components.items()}

    @property
    def flux(self) -> bool:
        return self.family == "flux"

    # -- text ----------------------------------------------------------------------------------------

    def t5_states(self, texts: list[str], max_sequence_length: int) -> np.ndarray:
        """T5's last hidden state [n, max_sequence_length, width]; zeros of the transformer's joint width for an SD3
        export without T5, as diffusers gives with text_encoder_3=None."""
        if self.t5 not in self.encoders:
            width = int(self.manifest.pipeline.joint_attention_dim)
            return np.zeros((len(texts), max_sequence_length, width), np.float32)
        if max_sequence_length not in self._t5_tokenizers:
            path = self.folder / T5_TOKENIZER[self.family] / "tokenizer.json"
            self._t5_tokenizers[max_sequence_length] = T5PromptTokenizer(path, max_sequence_length)
        ids = self._t5_tokenizers[max_sequence_length](texts)
        return self.component(self.t5)(input_ids=ids)["last_hidden_state"]

    def clip_states(
        self, name: str, texts: list[str], clip_skip: int | None, prompts: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """SD3's CLIP (states, pooled): hidden_states[-2], or [-(clip_skip + 2)] for the last `prompts` rows (the
        prompts: the negative prompts never skip, as in diffusers), and the projected `text_embeds`."""
        facts = self.manifest.pipeline
        count = int((facts.num_hidden_states_2 if name == "text_encoder_2" else facts.num_hidden_states) or 0)
        if clip_skip and not 1 <= clip_skip <= count - 2:
            raise GenerationError(f"clip_skip must be between 1 and {count - 2} for this text encoder, got {clip_skip}")
        outputs = self.component(name)(input_ids=self.tokenizers[name](texts))
        states = outputs[f"hidden_states.{count - 2}"]
        if clip_skip:
            states[-prompts:] = outputs[f"hidden_states.{count - 2 - clip_skip}"][-prompts:]
        return states, outputs["text_embeds"]

    def encode_text(
        self, texts: dict[str, list[str]], plan: TransformerPlan, prompts: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(encoder_hidden_states, pooled_projections) of one row per text, as the family's encode_prompt builds them.

        SD3: CLIP-L's and CLIP-G's states joined on the last axis and zero-padded to T5's width, then T5's after
        them on the sequence; pooled, the two projections joined. Flux: T5's states; pooled, CLIP-L's pooler_output.
        """
        if self.flux:
            pooled = self.component("text_encoder")(input_ids=self.tokenizers["text_encoder"](texts["text_encoder"]))
            states = self.t5_states(texts["text_encoder_2"], plan.max_sequence_length)
            return states, pooled["pooler_output"]
        clip_skip = plan.request.clip_skip
        first, pooled_1 = self.clip_states("text_encoder", texts["text_encoder"], clip_skip, prompts)
        second, pooled_2 = self.clip_states("text_encoder_2", texts["text_encoder_2"], clip_skip, prompts)
        t5 = self.t5_states(texts["text_encoder_3"], plan.max_sequence_length)
        clip = np.concatenate([first, second], axis=-1)
        padded = np.zeros((*clip.shape[:2], t5.shape[-1]), np.float32)
        kept = min(clip.shape[-1], t5.shape[-1])  # torch's F.pad crops when the pad is negative
        padded[..., :kept] = clip[..., :kept]
        return np.concatenate([padded, t5], axis=1), np.concatenate([pooled_1, pooled_2], axis=-1)

    def encode(self, plan: TransformerPlan) -> dict[str, np.ndarray]:
        """The transformer's inputs that stay the same at every step: text states and pooled projections
        ([negatives..., prompts...] under guidance, each repeated num_images times), Flux's positions and
        dev's embedded guidance."""
        n = len(plan.prompts["text_encoder"])
        negatives = plan.negative_prompts
        texts = {k: (negatives[k] if negatives else []) + v for k, v in plan.prompts.items()}
        states, pooled = self.encode_text(texts, plan, n)
        images = plan.request.num_images

        def repeated(x: np.ndarray) -> np.ndarray:
            halves = np.split(x, 2) if negatives else [x]
            return np.concatenate([np.repeat(half, images, axis=0) for half in halves]).astype(np.float32)

        fixed = {"encoder_hidden_states": repeated(states), "pooled_projections": repeated(pooled)}
        if self.flux:
            h, w = plan.latent_shape[2:]
            fixed["txt_ids"] = np.zeros((states.shape[1], 3), np.float32)
            fixed["img_ids"] = latent_image_ids(h, w)
            if self.manifest.pipeline.guidance_embeds:  # dev's embedded guidance; schnell has none
                rows = plan.guidance.unet_batch_size(plan.batch)
                fixed["guidance"] = np.full(rows, plan.guidance_scale, np.float32)
        return fixed

    # -- latents -------------------------------------------------------------------------------------

    def model_layout(self, latents: np.ndarray) -> np.ndarray:
        """Latents [B, C, h, w] as the transformer reads them: packed for Flux."""
        return pack_latents(latents) if self.flux else latents

    def latent_layout(self, latents: np.ndarray, plan: TransformerPlan) -> np.ndarray:
        return unpack_latents(latents, *plan.latent_shape[2:]) if self.flux else latents

    def vae_encode(self, image: np.ndarray, generator: TorchGenerator) -> np.ndarray:
        """A sample of the VAE's latent distribution, shifted and scaled ((z - shift) * scaling, `_encode_vae_image`)."""
        facts = self.manifest.pipeline
        parameters = self.component("vae_encoder")(sample=image)["latent_parameters"]
        mean, logvar = np.split(parameters, 2, axis=1)
        sample = mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * randn_tensor(mean.shape, generator)
        return ((sample - np.float32(facts.vae_shift_factor or 0.0)) * np.float32(facts.vae_scaling_factor)).astype(
            np.float32
        )

    def image_latents(self, plan: TransformerPlan, generator: Generator) -> np.ndarray:
        """The init image's latents, one row per image. One generator encodes it once; several encode it with the
        first (Flux's pipelines, and SD3's inpainting), or SD3's image-to-image each copy with its own."""
        image = load_init_image(plan.request.image, plan.width, plan.height)
        if isinstance(generator, list) and self.family == "sd3" and not plan.inpaint:
            return np.concatenate([self.vae_encode(image, g) for g in generator])
        first = generator[0] if isinstance(generator, list) else generator
        return np.repeat(self.vae_encode(image, first), plan.batch, axis=0)

    def prepare_latents(self, plan: TransformerPlan, generator: Generator) -> tuple[np.ndarray, KeptRegion | None]:
        """The loop's starting latents in the model's layout, drawn in diffusers' order: the init image's latents,
        then the noise; noised to the first step's sigma (scale_noise) for image-to-image and inpainting, where
        SD3 starts from the noise alone at strength 1. Inpainting also gives the region the mask keeps (diffusers
        encodes the masked image too, which a plain transformer never reads, after every draw)."""
        request, scheduler = plan.request, plan.scheduler
        if not plan.image_to_image:
            given = request.latents is not None
            noise = np.asarray(request.latents, np.float32) if given else randn_tensor(plan.latent_shape, generator)
            return self.model_layout(noise.astype(np.float32)), None
        channels = self.component("transformer").inputs["hidden_states"].shape
        if plan.inpaint and not self.flux and channels[1] != plan.latent_shape[1]:
            raise GenerationError(
                f"this SD3 transformer takes {channels[1]} channels: only 16-channel transformers inpaint here"
            )
        init = self.image_latents(plan, generator)
        noise = randn_tensor(plan.latent_shape, generator)
        if plan.inpaint and not self.flux and plan.strength == 1.0:
            latents = noise
        else:
            latents = scheduler.add_noise(init, noise, scheduler.begin_index).astype(np.float32)
        if not plan.inpaint:
            return self.model_layout(latents), None
        mask = load_mask(plan.request.mask_image, plan.width, plan.height)
        mask = mask_to_latents(mask, int(self.manifest.pipeline.vae_scale_factor))
        mask = np.broadcast_to(mask, plan.latent_shape).astype(np.float32)
        kept = KeptRegion(self.model_layout(mask), self.model_layout(init), self.model_layout(noise))
        return self.model_layout(latents), kept

    # -- the loop and the decoder --------------------------------------------------------------------

    def model_timestep(self, t: np.float32) -> np.float32:
        """SD3's transformer takes the scheduler's timestep (sigma x 1000); Flux's takes t / 1000, in float32."""
        return np.float32(t) / np.float32(1000) if self.flux else np.float32(t)

    def denoise(
        self,
        latents: np.ndarray,
        plan: TransformerPlan,
        fixed: dict[str, np.ndarray],
        generator: Generator,
        callback: StepCallback | None = None,
        progress: bool = False,
        kept: KeptRegion | None = None,
    ) -> np.ndarray:
        """The loop over the plan's scheduler steps on latents in the model's layout: the transformer's inputs stay
        bound, each step writes the latents (twice under guidance) and the timestep. `callback(step, timestep,
        latents)` sees the latents [B, C, h, w] after each step."""
        guidance, scheduler = plan.guidance, plan.scheduler
        transformer = self.component("transformer")
        batch = guidance.unet_batch_size(plan.batch)
        if transformer.static_batch not in (None, batch):
            raise GenerationError(
                f"this static export's transformer takes {transformer.static_batch} rows and this request needs "
                f"{batch}: draw the export's batch size, or export without --static"
            )
        binding = transformer.bind(
            {"hidden_states": guidance.unet_sample(latents), "timestep": np.zeros(batch, np.float32), **fixed}
        )
        steps = scheduler.step_indices
        if progress:
            steps = tqdm(steps, desc="denoising", unit="step")
        for n, i in enumerate(steps):
            t = scheduler.timesteps[i]
            binding.update("hidden_states", guidance.unet_sample(latents))
            binding.update("timestep", np.full(batch, self.model_timestep(t), np.float32))
            velocity = guidance.combine(binding.run()["out_hidden_states"])
            noise = randn_tensor(latents.shape, generator) if scheduler.needs_noise(i) else None
            latents = scheduler.step(i, velocity, latents, noise)
            if kept is not None:
                latents = kept.after_step(latents, scheduler, i)
            if callback is not None:
                callback(n, float(t), self.latent_layout(latents, plan))
        return latents

    def vae_decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [B, C, h, w] -> pixels in [-1, 1]: the decoder reads latents / scaling + shift."""
        facts = self.manifest.pipeline
        scaled = latents / np.float32(facts.vae_scaling_factor) + np.float32(facts.vae_shift_factor or 0.0)
        return self.component("vae_decoder")(latent_sample=scaled.astype(np.float32))["sample"]

    def previewer(self) -> Previewer:
        """A previewer without a tiny decoder (decoders.Previewer): previews' images are None."""
        return Previewer.of(self.manifest.pipeline, self.component)

    # -- the call ------------------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        callback: StepCallback | None = None,
        progress: bool = False,
        preview_callback: PreviewCallback | None = None,
        preview_every: int = 1,
    ) -> GenerationResult:
        """Draw what `request` asks: resolve it into a plan, then encode, prepare latents, denoise, decode and
        record, each stage reading the plan. `callback` and `preview_callback` as StableDiffusionPipeline's (no
        tiny decoder reads these latents here: a StepPreview's images are None)."""
        started = time.perf_counter()
        plan = resolve_transformer_plan(request, self.manifest, self.scheduler_config)
        steps = len(plan.scheduler.step_indices)
        callback = step_callback(callback, preview_callback, self.previewer, steps, preview_every)
        generator = plan.seeds.generator()
        fixed = self.encode(plan)
        latents, kept = self.prepare_latents(plan, generator)
        transformer = self.component("transformer")
        before, loop_started = transformer.run_seconds, time.perf_counter()
        final = self.latent_layout(self.denoise(latents, plan, fixed, generator, callback, progress, kept), plan)
        timings = {
            "denoise": time.perf_counter() - loop_started,
            "transformer": transformer.run_seconds - before,
            "steps": float(len(plan.scheduler.step_indices)),
        }
        images = to_pil(self.vae_decode(final))
        timings["total"] = time.perf_counter() - started
        embedded = bool(self.manifest.pipeline.guidance_embeds)
        parameters = plan.parameters(self.model_hash, Path(self.manifest.source.name).name, embedded)
        return GenerationResult(images, final, parameters, list(plan.seeds.values), timings)

    def __call__(
        self,
        prompt: str | Sequence[str] | None,
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        negative_prompt_3: str | Sequence[str] | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        seed: int | Sequence[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        max_sequence_length: int | None = None,
        sigmas: Sequence[float] | None = None,
        latents: np.ndarray | None = None,
        clip_skip: int | None = None,
        image: str | Path | Image.Image | None = None,
        mask_image: str | Path | Image.Image | None = None,
        strength: float | None = None,
        scheduler_options: dict[str, object] | None = None,
        decoder: str = "full",
        callback: StepCallback | None = None,
        progress: bool = False,
        preview_callback: PreviewCallback | None = None,
        preview_every: int = 1,
    ) -> GenerationResult:
        """Draw images; arguments mean what they mean in diffusers' StableDiffusion3Pipeline or FluxPipeline (their
        Img2Img forms with `image`, their Inpaint forms with `image` and `mask_image`), `num_images` being
        num_images_per_prompt and `seed` one seed or one per image in place of generators. Defaults are diffusers':
        28 steps, guidance 7.0 (SD3) or 3.5 (Flux; 7.0 for its image-to-image and inpainting), strength 0.6,
        max_sequence_length 256 (SD3) or 512 (Flux: pass 256 for schnell, and guidance_scale is unused there).
        `latents` are the starting noise [images, channels, h, w], unpacked for Flux too, as `result.latents` are.
        `scheduler_options` override the export's scheduler config (e.g. {"shift": 3.0}). `callback` and
        `preview_callback` as StableDiffusionPipeline's (a StepPreview's images are None here); `decoder` "tiny" is
        refused: no tiny decoder reads these 16-channel latents here."""
        arguments = {k: v for k, v in locals().items() if k not in REPORTING_ARGUMENTS}
        return self.generate(GenerationRequest(**arguments), callback, progress, preview_callback, preview_every)
