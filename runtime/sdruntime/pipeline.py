"""Text-to-image, image-to-image and inpainting on an exported folder, step for step as diffusers'
StableDiffusion(XL)Pipeline, StableDiffusion(XL)Img2ImgPipeline and StableDiffusion(XL)InpaintPipeline do, with NumPy
and ONNX Runtime only.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .adapters import AdapterCache, AdapterSet, AdapterTarget
from .conditioning import MicroConditioning
from .control import ControlRun, load_control_image
from .decoders import FULL_DECODER, PreviewCallback, Previewer, decode, encode_tiny, scaling_factor, step_callback
from .image import load_init_image, short_hash, to_pil
from .inpaint import Inpainting, load_mask, mask_to_latents
from .manifest import FINAL_LAYER_NORM, TEXT_ENCODER_MASK, ExportError, HashCache, read_manifest, residual_names
from .memory import MemoryBudget, MemoryModel, Pieces, RequestShape, admit, resident_memory
from .noise import TorchGenerator, randn_tensor
from .plan import ExportFacts, Plan, resolve_plan
from .prompt_syntax import parse_prompt
from .prompt_weighting import DEFAULT_DOWNWEIGHT, TextEncoder, weighted_embeddings
from .request import GenerationError, GenerationRequest
from .result import GenerationResult, StepCallback
from .schedulers import Scheduler, read_scheduler_config
from .session import Component, SessionSettings, check_cpu_layout, first_provider, resolve_providers, shape_of
from .tokenizer import PromptTokenizer
from .transformer_pipeline import REPORTING_ARGUMENTS, TransformerPipeline

MICRO_CONDITIONING = tuple(f.name for f in fields(MicroConditioning))
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def final_layer_norm(hidden: np.ndarray, norm) -> np.ndarray:
    """CLIP's final LayerNorm (weights from FINAL_LAYER_NORM) over the last axis."""
    mean = hidden.mean(axis=-1, keepdims=True)
    var = np.square(hidden - mean).mean(axis=-1, keepdims=True)
    return ((hidden - mean) / np.sqrt(var + norm["eps"]) * norm["weight"] + norm["bias"]).astype(np.float32)


def per_image(rows: np.ndarray, guided: bool, num_images: int) -> np.ndarray:
    """Rows [prompts...] or [negatives..., prompts...] (guided), each repeated num_images times in its half."""
    if not guided:
        return np.repeat(rows, num_images, axis=0)
    uncond, cond = np.split(rows, 2)
    return np.concatenate([np.repeat(uncond, num_images, axis=0), np.repeat(cond, num_images, axis=0)])


class StableDiffusionPipeline:
    """An exported folder, loaded on one execution provider."""

    def __init__(self, folder: Path, provider, settings: SessionSettings, verify: bool, max_memory: int | None = None):
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
        self._active = threading.local()  # the adapter set (adapters.py) the generation in this thread draws with
        self.base_tokenizers = {
            name: PromptTokenizer(self.folder / folder / "tokenizer.json", max_length, pad_id)
            for name, (folder, max_length, pad_id) in {
                "text_encoder": ("tokenizer", facts.tokenizer_max_length, facts.pad_token_id),
                "text_encoder_2": ("tokenizer_2", facts.tokenizer_2_max_length, facts.tokenizer_2_pad_token_id),
            }.items()
            if name in self.encoders
        }
        self.scheduler_config = read_scheduler_config(self.folder)
        self.export = ExportFacts.of(self.manifest, self.scheduler_config)
        self.default_scheduler = self.export.default_scheduler
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
        self.memory_model = MemoryModel.of(self.manifest)
        self.memory_budget = MemoryBudget(max_memory)
        self.loaded_resident = resident_memory()  # what a generation's estimate adds to
        target = AdapterTarget(self.manifest, self.base_tokenizers)
        self.adapters = AdapterCache(target, self._create, settings.adapter_sets)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        provider="cpu",
        *,
        settings: SessionSettings | None = None,
        verify: bool = True,
        max_memory: int | None = None,
    ) -> StableDiffusionPipeline | TransformerPipeline:
        """Load an export; `provider` is "cpu", "cuda", "tensorrt" or a list of ORT providers. `max_memory`
        (bytes) caps this process's resident memory while drawing (default: what the machine has free): a
        batch past it is drawn in pieces, an image past it is refused (memory.py). An SD3 or Flux export loads
        as a TransformerPipeline, which draws the same requests."""
        if read_manifest(folder).pipeline.transformer_family:
            return TransformerPipeline.load(folder, provider, settings=settings, verify=verify, max_memory=max_memory)
        return cls(Path(folder), provider, settings or SessionSettings(), verify, max_memory)

    def component(self, name: str) -> Component:
        """A component's session, created on first use (the VAE encoder only for image-to-image); during a
        generation with LoRAs, the adapter set's session for the components they change."""
        adapted = getattr(self._active, "adapted", None)
        if adapted is not None and name in adapted.components:
            return adapted.components[name]
        if name not in self._components:
            self._components[name] = self._create(name)
        return self._components[name]

    def _create(self, name: str, overrides: Mapping[str, np.ndarray] | None = None) -> Component:
        if not self.manifest.has(name):
            raise ExportError(f"{self.folder} has no {name}: export it with `sdexport convert --components ...,{name}`")
        return Component(self.manifest, name, self.providers, self.settings, overrides)

    @property
    def tokenizers(self) -> dict[str, PromptTokenizer]:
        """Each text encoder's tokenizer: the export's, or the adapter set's where it changes one (embeddings)."""
        adapted = getattr(self._active, "adapted", None)
        return {**self.base_tokenizers, **adapted.tokenizers} if adapted is not None else self.base_tokenizers

    @property
    def tokenizer(self) -> PromptTokenizer:
        """The first text encoder's tokenizer."""
        return self.tokenizers[self.encoders[0]]

    @contextlib.contextmanager
    def adapted(self, adapters: AdapterSet):
        """Draw with an adapter set's sessions (made, or taken from the cache) within the block, in this thread."""
        made = self.adapters.sessions_created
        previous = getattr(self._active, "adapted", None)
        self._active.adapted = self.adapters.get(adapters) if adapters else None
        if self.adapters.sessions_created != made:  # new sessions: the memory budget's base grew
            self.loaded_resident = resident_memory()
        try:
            yield
        finally:
            self._active.adapted = previous

    def _model_hash(self) -> str:
        """Short sha256 over the manifest's hashes of the files that draw (text encoders, U-Net, VAE decoder)."""
        digest = hashlib.sha256()
        for name in (*self.encoders, "unet", "vae_decoder"):
            for entry in self.manifest.components[name].files:
                digest.update(f"{entry.path} {entry.sha256}\n".encode())
        return short_hash(digest.hexdigest())

    def previewer(self) -> Previewer:
        """Each step's latents through the tiny decoder, when the export has one (decoders.Previewer)."""
        return Previewer.of(self.manifest.pipeline, self.component)

    @property
    def component_providers(self) -> dict[str, str]:
        """Which execution provider runs each loaded component."""
        return {name: c.provider for name, c in self._components.items()}

    # -- the steps of a generation -----------------------------------------------------------

    def encode_prompt(
        self,
        prompts: list[str],
        negative: list[str] | None,
        num_images: int,
        clip_skip: int | None = None,
        prompt_syntax: str | None = None,
        downweight: str | None = None,
    ) -> np.ndarray:
        """Text embeddings [uncond..., cond...] (or cond only), each prompt repeated num_images times.

        With clip_skip, the prompts' embeddings (not the negative prompts', as in diffusers) are the
        final LayerNorm of the hidden state clip_skip layers before the last. With prompt_syntax, the
        prompts and negative prompts are weighted, long prompts (encode_weighted; `downweight` "mask" or "remove").
        """
        if prompt_syntax:
            weighted = self.encode_weighted(prompts, negative, num_images, prompt_syntax, clip_skip, False, downweight)
            return weighted[0]
        ids = self.tokenizer(prompts if negative is None else negative + prompts)
        outputs = self.run_text_encoder("text_encoder", ids)
        embeddings = outputs["last_hidden_state"]
        if clip_skip:
            embeddings[-len(prompts) :] = self.skipped_hidden_state(outputs, clip_skip)[-len(prompts) :]
        return per_image(embeddings, negative is not None, num_images)

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
        prompt_syntax: str | None = None,
        downweight: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """SDXL's (embeddings, pooled embeddings), [uncond..., cond...] (or cond only), each prompt repeated
        num_images times, as StableDiffusionXLPipeline.encode_prompt builds them.

        The embeddings are each encoder's penultimate hidden state (clip_skip layers further back for the
        prompts, never for the negative prompts, as in diffusers), joined along the last axis; the pooled
        ones are the second encoder's projected `text_embeds`. `zero_negative` (no negative prompt with
        force_zeros_for_empty_prompt) makes the unconditional half zeros instead of encoding "". With
        prompt_syntax, the prompts and negative prompts are weighted, long prompts (encode_weighted).
        """
        if prompt_syntax:
            return self.encode_weighted(
                prompts, negative, num_images, prompt_syntax, clip_skip, zero_negative, downweight
            )
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
            outputs = self.run_text_encoder(name, self.tokenizers[name](texts))
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
        guided = negative is not None
        return per_image(embeddings, guided, num_images), per_image(pooled, guided, num_images)

    def encode_weighted(
        self,
        prompts: list[str],
        negative: list[str] | None,
        num_images: int,
        syntax: str,
        clip_skip: int | None = None,
        zero_negative: bool = False,
        downweight: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(embeddings, SDXL's pooled embeddings or None) of prompts and negative prompts written in `syntax`
        ("compel" or "a1111"), laid out as encode_prompt(_xl) lays them out, with compel's math
        (prompt_weighting.py; weights below 1 as `downweight` says, "mask" by default): all of them padded to
        the longest with the empty prompt's embedding."""
        texts = prompts if negative is None or zero_negative else negative + prompts
        parsed = [parse_prompt(text, syntax) for text in texts]
        mode = downweight or DEFAULT_DOWNWEIGHT
        embeddings, pooled = weighted_embeddings(parsed, self.weighting_encoders(clip_skip), mode)
        fixed = self.component("unet").inputs["encoder_hidden_states"].shape[1]  # an int in static exports
        if isinstance(fixed, int) and fixed != embeddings.shape[1]:
            raise GenerationError(
                f"this static export's U-Net reads {fixed} tokens and these prompts take {embeddings.shape[1]} "
                "(past 75 tokens, .and() and BREAK take more): shorten them, or export without --static"
            )
        if negative is not None and zero_negative:
            embeddings = np.concatenate([np.zeros_like(embeddings), embeddings])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        guided = negative is not None
        if pooled is not None:
            pooled = per_image(pooled, guided, num_images)
        return per_image(embeddings, guided, num_images), pooled

    def weighting_encoders(self, clip_skip: int | None) -> list[TextEncoder]:
        """The text encoders as prompt_weighting reads them: SD's last hidden state (with clip_skip, that many
        layers further back for prompts and negative prompts alike, as compel and A1111 skip), SDXL's
        penultimate ones, and SDXL's pooled embedding from the encoder that projects one."""

        def run(name: str):
            return lambda ids, mask=None: self.run_text_encoder(name, ids, mask)

        masks = bool(self.manifest.pipeline.text_encoder_attention_mask)
        if not self.xl:
            encode = run("text_encoder")
            if clip_skip:
                return [
                    TextEncoder(
                        self.tokenizer, lambda ids, m: self.skipped_hidden_state(encode(ids, m), clip_skip), masks=masks
                    )
                ]
            return [TextEncoder(self.tokenizer, lambda ids, m: encode(ids, m)["last_hidden_state"], masks=masks)]
        facts, encoders = self.manifest.pipeline, []
        for name in self.encoders:
            count = int((facts.num_hidden_states_2 if name == "text_encoder_2" else facts.num_hidden_states) or 0)
            encode, state = run(name), f"hidden_states.{count - 2}"
            pool = (lambda ids, encode=encode: encode(ids)["text_embeds"]) if name == "text_encoder_2" else None
            embed = lambda ids, m, e=encode, s=state: e(ids, m)[s]  # noqa: E731
            encoders.append(TextEncoder(self.tokenizers[name], embed, pool, masks))
        return encoders

    def run_text_encoder(self, name: str, ids: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """A CLIP text encoder's outputs for token ids [N, L]; `mask` [N, L] (1 attends) is fed where given, and
        ones where the export's attention_mask has no default (tensorrt, static exports)."""
        feeds = {"input_ids": ids}
        if mask is None and TEXT_ENCODER_MASK in self.component(name).required_inputs:
            mask = np.ones_like(ids)
        if mask is not None:
            feeds[TEXT_ENCODER_MASK] = mask
        return self.component(name)(**feeds)

    def denoise(
        self,
        latents: np.ndarray,
        plan: Plan,
        unet_inputs: Mapping[str, np.ndarray],
        generator: TorchGenerator | list[TorchGenerator],
        callback: StepCallback | None = None,
        progress: bool = False,
        rows: int | None = None,
        inpainting: Inpainting | None = None,
        control: ControlRun | None = None,
    ) -> np.ndarray:
        """The loop over the plan's scheduler steps, guided as the plan's guidance says; the U-Net's inputs
        stay bound across steps, and the noise a step adds is drawn here, from the run's generator.
        `unet_inputs` are the U-Net's inputs that stay the same at every step (`encode`); the U-Net runs
        `rows` rows of its batch at a time (all by default), each row computed alone, so pieces change no pixel.
        `inpainting` (prepare_latents) adds a 9-channel U-Net's input channels, or blends a plain one's latents;
        `control` (prepare_control) gives the ControlNets' residuals at each step."""
        guidance, scheduler = plan.guidance, plan.scheduler
        unet = self.component("unet")
        batch = guidance.unet_batch_size(plan.batch)
        zeros = self.zero_residuals(batch, plan, always=control is not None)

        def unet_sample(sample: np.ndarray) -> np.ndarray:
            return sample if inpainting is None else inpainting.unet_sample(sample)

        feeds = {
            "sample": unet_sample(guidance.unet_sample(latents)),
            "timestep": np.zeros(batch, np.float32),
            **unet_inputs,
            **zeros,
        }
        rows = rows or batch
        cuts = [slice(start, start + rows) for start in range(0, batch, rows)]
        if unet.static_batch in (None, batch):
            bindings = [(cut, unet.bind({k: v[cut] for k, v in feeds.items()})) for cut in cuts]
        else:
            bindings = None
        steps = scheduler.step_indices
        if progress:
            steps = tqdm(steps, desc="denoising", unit="step")
        for n, i in enumerate(steps):
            t = scheduler.timesteps[i]
            scaled = scheduler.scale_model_input(guidance.unet_sample(latents), i)
            step = {"sample": unet_sample(scaled), "timestep": np.full(batch, t, np.float32)}
            if control is not None:
                step.update(self.control_residuals(control, plan, n, i, latents, scaled) or zeros)
            if bindings is not None:
                outputs = []
                for cut, binding in bindings:
                    for name, value in step.items():
                        binding.update(name, value[cut])
                    outputs.append(binding.run()["out_sample"])
                noise_pred = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
            else:  # a static export whose batch differs: pad through the plain call
                noise_pred = unet(**{**feeds, **step})["out_sample"]
            noise_pred = guidance.combine(noise_pred)
            noise = randn_tensor(latents.shape, generator) if scheduler.needs_noise(i) else None
            latents = scheduler.step(i, noise_pred, latents, noise)  # float32 already
            if inpainting is not None:
                latents = inpainting.after_step(latents, scheduler, i)
            if callback is not None:
                callback(n, float(t), latents)
        return latents

    def zero_residuals(self, batch: int, plan: Plan, always: bool) -> dict[str, np.ndarray]:
        """Zeros for the U-Net's ControlNet residual inputs: fed when ControlNets run (a step where none is on
        feeds them), or when the U-Net requires them (the tensorrt target's); else its defaults stand."""
        unet = self.component("unet")
        names = residual_names(len(self.manifest.pipeline.unet_residual_scales or ()))
        if not always:
            names = [name for name in names if name in unet.required_inputs]
        sizes = self.manifest.axis_sizes("unet", batch, plan.height, plan.width, guidance=False)
        # the run's batch, not a static export's: the U-Net's call pads or splits every input alike
        return {name: np.zeros((batch, *shape_of(unet.inputs[name].shape[1:], sizes)), np.float32) for name in names}

    def control_residuals(
        self, control: ControlRun, plan: Plan, n: int, i: int, latents: np.ndarray, scaled: np.ndarray
    ) -> dict[str, np.ndarray] | None:
        """The ControlNets' summed residuals at loop step n (scheduler index i). In guess mode under
        classifier-free guidance they see the prompts' half only and the negative half gets zeros, as in diffusers."""
        t = plan.scheduler.timesteps[i]
        if plan.control.guess_mode and plan.guidance.doubles_batch:
            sample, zeros_first = plan.scheduler.scale_model_input(latents, i), plan.batch
        else:
            sample, zeros_first = scaled, 0
        return control.residuals(n, sample, np.full(len(sample), t, np.float32), zeros_first)

    def prepare_control(self, plan: Plan, unet_inputs: Mapping[str, np.ndarray]) -> ControlRun | None:
        """The plan's ControlNets bound to their control images (RGB in [0, 1] at the drawn size, one row per
        image, twice under classifier-free guidance unless in guess mode) and the text conditioning they read."""
        control = plan.control
        if control is None:
            return None
        if not self.manifest.pipeline.unet_residual_scales:
            raise GenerationError(
                "this export's U-Net takes no ControlNet residuals (it predates them): re-export it with `sdexport convert`"
            )
        halve = control.guess_mode and plan.guidance.doubles_batch
        fixed = {
            name: np.split(unet_inputs[name], 2)[1] if halve else unet_inputs[name]
            for name in ("encoder_hidden_states", "text_embeds", "time_ids")
            if name in unet_inputs
        }
        images = []
        for unit in control.units:
            image = np.repeat(load_control_image(unit.image, plan.width, plan.height), plan.batch, axis=0)
            images.append(np.concatenate([image] * 2) if plan.guidance.doubles_batch and not halve else image)
        components = [self.component(unit.component) for unit in control.units]
        rows = len(images[0])
        if any(c.static_batch not in (None, rows) for c in components):
            raise GenerationError(
                f"this static export's ControlNets take {components[0].static_batch} rows, and this request feeds them "
                f"{rows}: draw the export's batch size without guess mode, or export without --static"
            )
        return ControlRun(control, components, images, fixed, len(plan.scheduler.step_indices))

    def vae_decode(self, latents: np.ndarray, rows: int | None = None, decoder: str = FULL_DECODER) -> np.ndarray:
        """Latents -> pixels in [-1, 1], `rows` images per decoder run (all by default), through the VAE's
        decoder or the tiny one (decoders.py), each reading latents / its own scaling factor."""
        return decode(self.component(decoder), latents, scaling_factor(decoder, self.manifest.pipeline), rows)

    def vae_encode(self, image: np.ndarray, generator) -> np.ndarray:
        """Sample the VAE's latent distribution, scaled, as diffusers' `retrieve_latents` does (a tiny VAE's
        encoder gives the latents themselves: nothing is drawn)."""
        if self.manifest.pipeline.vae_tiny:
            return encode_tiny(self.component("vae_encoder"), image, self.manifest.pipeline.vae_scaling_factor)
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

    def generate(
        self,
        request: GenerationRequest,
        callback: StepCallback | None = None,
        progress: bool = False,
        preview_callback: PreviewCallback | None = None,
        preview_every: int = 1,
    ) -> GenerationResult:
        """Draw what `request` asks: resolve it into a plan, then encode, prepare latents, denoise, decode and
        record, each stage reading the plan. `callback(step, timestep, latents)` runs after each step;
        `preview_callback` gets a decoders.StepPreview every `preview_every` steps and at the last."""
        started = time.perf_counter()
        plan = resolve_plan(request, self.export)
        with self.adapted(plan.adapters):
            return self._draw(plan, started, callback, progress, preview_callback, preview_every)

    def _draw(
        self,
        plan: Plan,
        started: float,
        callback: StepCallback | None,
        progress: bool,
        preview_callback: PreviewCallback | None,
        preview_every: int,
    ) -> GenerationResult:
        """generate's stages, with the plan's adapter set's sessions in place."""
        steps = len(plan.scheduler.step_indices)
        callback = step_callback(callback, preview_callback, self.previewer, steps, preview_every)
        pieces = self.admit(plan)
        generator = plan.seeds.generator()
        unet_inputs = self.encode(plan)
        latents, inpainting = self.prepare_latents(plan, generator)
        control = self.prepare_control(plan, unet_inputs)
        unet = self.component("unet")
        unet_before, loop_started = unet.run_seconds, time.perf_counter()
        final = self.denoise(
            latents, plan, unet_inputs, generator, callback, progress, pieces.unet_rows, inpainting, control
        )
        timings = {
            "denoise": time.perf_counter() - loop_started,
            "unet": unet.run_seconds - unet_before,
            "steps": float(len(plan.scheduler.step_indices)),
        }
        images = to_pil(self.vae_decode(final, pieces.decoder_rows, plan.decoder))
        timings["total"] = time.perf_counter() - started
        parameters = plan.parameters(self.model_hash, Path(self.manifest.source.name).name)
        return GenerationResult(images, final, parameters, list(plan.seeds.values), timings)

    def admit(self, plan: Plan) -> Pieces:
        """How the plan is drawn within the memory budget (memory.admit): in one piece when it fits, in pieces
        of U-Net rows and decoded images when not; MemoryRefused when one image cannot fit. Memory on a GPU
        is not this budget's: only sessions on the CPU count."""
        encoded_rows = len(plan.prompts) * (1 if plan.negative_prompts is None else 2)
        shape = RequestShape(
            plan.batch, plan.guidance.unet_batch_size(plan.batch), encoded_rows, plan.height, plan.width
        )
        total = self.memory_budget.total() if self.component("unet").device == "cpu" else None
        return admit(self.memory_model, shape, None if total is None else total - self.loaded_resident)

    def encode(self, plan: Plan) -> dict[str, np.ndarray]:
        """The U-Net's inputs that stay the same at every step: the text embeddings ([negatives..., prompts...]
        when the guidance doubles the batch), SDXL's pooled embeddings and time_ids, the guidance's own."""
        request = plan.request
        fixed = plan.guidance.fixed_inputs(plan.batch)
        if self.xl:
            embeddings, fixed["text_embeds"] = self.encode_prompt_xl(
                plan.prompts,
                plan.negative_prompts,
                request.num_images,
                request.clip_skip,
                plan.zero_negative,
                request.prompt_syntax,
                request.downweight,
            )
            fixed["time_ids"] = plan.guidance.time_ids(
                request.micro,
                (plan.height, plan.width),
                plan.batch,
                image_to_image=plan.image_to_image,
                aesthetic=bool(self.manifest.pipeline.requires_aesthetics_score),
            )
        elif request.prompt_embeds is None:
            embeddings = self.encode_prompt(
                plan.prompts,
                plan.negative_prompts,
                request.num_images,
                request.clip_skip,
                request.prompt_syntax,
                request.downweight,
            )
        else:  # given for the prompts; the negative prompts are still encoded, as in diffusers
            embeddings = np.repeat(np.asarray(request.prompt_embeds, np.float32), request.num_images, axis=0)
            if plan.negative_prompts is not None:
                uncond = self.encode_prompt(plan.negative_prompts, None, request.num_images)
                embeddings = np.concatenate([uncond, embeddings])
        return {"encoder_hidden_states": embeddings, **fixed}

    def prepare_latents(
        self, plan: Plan, generator: TorchGenerator | list[TorchGenerator]
    ) -> tuple[np.ndarray, Inpainting | None]:
        """The loop's starting latents: the init image's, noised to the first step's level, or noise (drawn,
        or the request's latents) scaled to the scheduler's initial sigma; and what inpainting adds to the loop."""
        request = plan.request
        if plan.inpaint:
            return self.inpaint_latents(plan, generator)
        if plan.image_to_image:
            init = load_init_image(request.image, plan.width, plan.height)
            return self.image_latents(init, plan.batch, generator, plan.scheduler), None
        if request.latents is not None:
            noise = np.asarray(request.latents, dtype=np.float32)
        else:
            noise = randn_tensor(plan.latent_shape, generator)
        return (noise * np.float32(plan.scheduler.init_noise_sigma)).astype(np.float32), None

    def inpaint_latents(
        self, plan: Plan, generator: TorchGenerator | list[TorchGenerator]
    ) -> tuple[np.ndarray, Inpainting]:
        """StableDiffusion(XL)InpaintPipeline's prepare_latents and prepare_mask_latents, drawing from the generator
        in their order: the init image's latents (a plain U-Net's, or for strength < 1), the noise, the masked
        image's latents. Strength 1 starts from noise alone, as diffusers does; SDXL's default 0.9999 starts from
        the image's latents noised to the first step. An SDXL VAE with force_upcast encodes in fp32, as diffusers
        upcasts it: the export keeps it fp32 (sdexport/plan.py), so nothing is cast here."""
        request, scheduler, batch = plan.request, plan.scheduler, plan.batch
        image = load_init_image(request.image, plan.width, plan.height)
        mask = load_mask(request.mask_image, plan.width, plan.height)
        # diffusers encodes the one init image with the first of several generators
        first = generator[0] if isinstance(generator, list) else generator
        from_noise = plan.strength == 1.0
        image_latents = None
        if not plan.unet_takes_mask or not from_noise:
            image_latents = np.repeat(self.vae_encode(image, first), batch, axis=0)
        noise = randn_tensor(plan.latent_shape, generator)
        if from_noise:
            latents = noise * np.float32(scheduler.init_noise_sigma)
        else:
            latents = scheduler.add_noise(image_latents, noise, scheduler.begin_index)
        masked_image_latents = self.vae_encode(image * (mask < 0.5), first)
        inpainting = Inpainting(
            mask=np.repeat(mask_to_latents(mask, int(self.manifest.pipeline.vae_scale_factor)), batch, axis=0),
            masked_image_latents=np.repeat(masked_image_latents, batch, axis=0),
            concatenated=plan.unet_takes_mask,
            image_latents=image_latents,
            noise=noise,
        )
        return latents.astype(np.float32), inpainting

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
        mask_image: str | Path | Image.Image | None = None,  # after the others: their places stay
        control_image: str | Path | Image.Image | Sequence[str | Path | Image.Image] | None = None,
        controlnet: str | Sequence[str] | None = None,
        controlnet_conditioning_scale: float | Sequence[float] | None = None,
        guess_mode: bool = False,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        decoder: str = "full",
        preview_callback: PreviewCallback | None = None,
        preview_every: int = 1,
        loras: Sequence[object] | None = None,
        embeddings: Sequence[object] | None = None,
        prompt_syntax: str | None = None,
        downweight: str | None = None,
    ) -> GenerationResult:
        """Draw images; arguments mean what they mean in diffusers' pipelines (StableDiffusionPipeline and
        StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline with `mask_image`, or the XL forms of the three
        for an SDXL export). `guidance_scale` and `strength` default to diffusers' values for the family
        (plan.family_defaults). SDXL's micro-conditioning: sizes (height, width; None: the generated size), crops and
        aesthetic scores. `prompt_embeds` ([len(prompt), max_length, hidden]) replaces the prompts' encoding (negatives
        are still encoded; `prompt` may be None). Weighted prompts: `prompt_syntax`, `downweight` (encode_weighted).

        The scheduler is built from the export's scheduler config as `Cls.from_config(config)` builds it;
        `timestep_spacing` ("leading", "linspace" or "trailing") and `scheduler_options` (other config keys,
        e.g. {"steps_offset": 1}) override it, as `Cls.from_config(config, **options)` does.

        `control_image` runs the export's ControlNets (StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline):
        one image per ControlNet, `controlnet` naming them (default: all exported); the scale and the span of
        the steps each is on are one value for all or one each (control.py). The scale defaults to diffusers'
        for the pipeline (1.0; 0.8 for image-to-image; 0.5 for SD inpainting).

        `decoder` "tiny" decodes with the tiny decoder `sdexport convert --tiny-vae FOLDER` exports beside the VAE
        (diffusers' `pipe.vae = AutoencoderTiny(...)`: a TAESD decodes in milliseconds what SD's VAE takes seconds
        for, a little blurrier); "full", the default, with the VAE's own (decoders.py).

        `callback(step, timestep, latents)` runs after each step (step 0 the first run). `preview_callback` gets a
        decoders.StepPreview (step, steps, timestep, latents, images) every `preview_every` steps and after the
        last: `images` are the step's latents through the tiny decoder, one PIL image per image drawn (the last
        step's are the images `decoder="tiny"` returns), or None when the export has no tiny decoder.

        `loras` ([(FILE, SCALE), ...] or "FILE[:SCALE]" strings) apply LoRAs in diffusers or kohya-ss format to the
        U-Net and text encoders for this call, as diffusers' `load_lora_weights` + `fuse_lora(lora_scale=SCALE)`
        would, without re-exporting (adapters.py); `embeddings` (["[TOKEN=]FILE", ...]) add textual-inversion
        tokens as `load_textual_inversion` does (textual_inversion.py); the last few sets' sessions stay cached.
        """
        # the arguments are GenerationRequest's fields, but SDXL's micro-conditioning, which it holds as one
        arguments = {k: v for k, v in locals().items() if k not in REPORTING_ARGUMENTS}
        micro = {k: arguments.pop(k) for k in MICRO_CONDITIONING}
        micro.update({k: tuple(micro[k]) for k in ("crops_coords_top_left", "negative_crops_coords_top_left")})
        request = GenerationRequest(**arguments, micro=MicroConditioning(**micro))
        return self.generate(request, callback, progress, preview_callback, preview_every)
