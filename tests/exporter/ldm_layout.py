"""Write diffusers pipelines as original-layout (LDM) single-file checkpoints and LoRAs as kohya files.

Our own key mapping, diffusers -> LDM, the inverse of what diffusers' reader expects
(`diffusers/loaders/single_file_utils.py`: convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint). Every diffusers weight is mapped exactly
once; an unmapped one is a bug in the mapping, not a file to write.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class _Mapper:
    """Moves diffusers weights to LDM names by prefix and remembers which ones it used."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str):
        self.state, self.prefix, self.out, self.used = state, prefix, {}, set()

    def move(self, ldm: str, diffusers: str, rename: dict[str, str] | None = None, to_conv: bool = False) -> None:
        found = False
        for key, value in self.state.items():
            if not key.startswith(diffusers + "."):
                continue
            rest = key[len(diffusers) + 1 :]
            for old, new in (rename or {}).items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            if to_conv and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
            self.out[f"{self.prefix}{ldm}.{rest}"] = value
            self.used.add(key)
            found = True
        assert found, f"no weights under {diffusers}"

    def finish(self) -> dict[str, torch.Tensor]:
        missed = sorted(set(self.state) - self.used)
        assert not missed, f"weights not mapped to the LDM layout: {missed[:5]}"
        return self.out


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """U-Net: input_blocks / middle_block / output_blocks, for any layers_per_block and block types."""
    m = _Mapper(unet.state_dict(), UNET)
    for diffusers, ldm in UNET_TOP.items():
        m.move(ldm, diffusers)
    if unet.config.addition_embed_type == "text_time":  # SDXL's pooled-text and size embedding
        m.move("label_emb.0.0", "add_embedding.linear_1")
        m.move("label_emb.0.2", "add_embedding.linear_2")
    index = 1
    for b, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            m.move(f"input_blocks.{index}.0", f"down_blocks.{b}.resnets.{j}", UNET_RESNET)
            if getattr(block, "attentions", None):
                m.move(f"input_blocks.{index}.1", f"down_blocks.{b}.attentions.{j}")
            index += 1
        if block.downsamplers:
            m.move(f"input_blocks.{index}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
            index += 1
    m.move("middle_block.0", "mid_block.resnets.0", UNET_RESNET)
    m.move("middle_block.1", "mid_block.attentions.0")
    m.move("middle_block.2", "mid_block.resnets.1", UNET_RESNET)
    index = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            m.move(f"output_blocks.{index}.0", f"up_blocks.{b}.resnets.{j}", UNET_RESNET)
            if attentions:
                m.move(f"output_blocks.{index}.1", f"up_blocks.{b}.attentions.{j}")
            if j == len(block.resnets) - 1 and block.upsamplers:
                m.move(f"output_blocks.{index}.{2 if attentions else 1}.conv", f"up_blocks.{b}.upsamplers.0.conv")
            index += 1
    return m.finish()


CONTROLNET = "control_model."


def controlnet_to_ldm(controlnet, prefix: str = CONTROLNET) -> dict[str, torch.Tensor]:
    """ControlNet (lllyasviel's layout): the U-Net's time_embed, label_emb, input_blocks and middle_block, plus
    zero_convs.N.0 (controlnet_down_blocks), middle_block_out.0 and input_hint_block, a Sequential whose
    convolutions sit at even indices between SiLUs: conv_in at 0, the blocks at 2, 4, ..., conv_out last."""
    m = _Mapper(controlnet.state_dict(), prefix)
    for diffusers, ldm in UNET_TOP.items():
        if diffusers.startswith("time_embedding") or diffusers == "conv_in":
            m.move(ldm, diffusers)
    if controlnet.config.addition_embed_type == "text_time":
        m.move("label_emb.0.0", "add_embedding.linear_1")
        m.move("label_emb.0.2", "add_embedding.linear_2")
    index = 1
    for b, block in enumerate(controlnet.down_blocks):
        for j in range(len(block.resnets)):
            m.move(f"input_blocks.{index}.0", f"down_blocks.{b}.resnets.{j}", UNET_RESNET)
            if getattr(block, "attentions", None):
                m.move(f"input_blocks.{index}.1", f"down_blocks.{b}.attentions.{j}")
            index += 1
        if block.downsamplers:
            m.move(f"input_blocks.{index}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
            index += 1
    m.move("middle_block.0", "mid_block.resnets.0", UNET_RESNET)
    m.move("middle_block.1", "mid_block.attentions.0")
    m.move("middle_block.2", "mid_block.resnets.1", UNET_RESNET)
    for i in range(len(controlnet.controlnet_down_blocks)):
        m.move(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}")
    m.move("middle_block_out.0", "controlnet_mid_block")
    embedding = controlnet.controlnet_cond_embedding
    m.move("input_hint_block.0", "controlnet_cond_embedding.conv_in")
    for k in range(len(embedding.blocks)):
        m.move(f"input_hint_block.{2 * k + 2}", f"controlnet_cond_embedding.blocks.{k}")
    m.move(f"input_hint_block.{2 * len(embedding.blocks) + 2}", "controlnet_cond_embedding.conv_out")
    return {k: v.detach().contiguous().clone() for k, v in m.finish().items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """VAE: encoder.down.N.block.M, mid.block_1/attn_1/block_2, decoder.up.N (numbered from the bottom)."""
    m = _Mapper(vae.state_dict(), VAE)
    for part in ("encoder", "decoder"):
        for diffusers, ldm in VAE_TOP.items():
            m.move(f"{part}.{ldm}", f"{part}.{diffusers}")
        m.move(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", {"conv_shortcut": "nin_shortcut"})
        m.move(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION, to_conv=True)
        m.move(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", {"conv_shortcut": "nin_shortcut"})
    m.move("quant_conv", "quant_conv")
    m.move("post_quant_conv", "post_quant_conv")
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            m.move(
                f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", {"conv_shortcut": "nin_shortcut"}
            )
        if block.downsamplers:
            m.move(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    count = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            m.move(
                f"decoder.up.{count - 1 - i}.block.{j}",
                f"decoder.up_blocks.{i}.resnets.{j}",
                {"conv_shortcut": "nin_shortcut"},
            )
        if block.upsamplers:
            m.move(f"decoder.up.{count - 1 - i}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    return m.finish()


def clip_to_ldm(text_encoder, prefix: str = CLIP) -> dict[str, torch.Tensor]:
    """SD 1.x (and SDXL's first encoder): the transformers CLIPTextModel as is, under `prefix`."""
    out = {prefix + k: v for k, v in text_encoder.state_dict().items()}
    positions = text_encoder.config.max_position_embeddings
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]  # real SD 1.x files carry it
    return out


def open_clip_to_ldm(text_encoder, prefix: str = OPEN_CLIP) -> dict[str, torch.Tensor]:
    """SD 2.x (and SDXL's second encoder): OpenCLIP names, q/k/v packed into in_proj, and a text
    projection, [hidden, projection]: SDXL's is the transposed weight of diffusers' text_projection,
    SD 2.x's (which diffusers drops) an identity."""
    state = text_encoder.state_dict()
    used = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out = {
        "token_embedding.weight": take("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": take("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": take("text_model.final_layer_norm.weight"),
        "ln_final.bias": take("text_model.final_layer_norm.bias"),
    }
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}ln_1.{kind}"] = take(f"{src}layer_norm1.{kind}")
            out[f"{dst}ln_2.{kind}"] = take(f"{src}layer_norm2.{kind}")
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [take(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            out[f"{dst}attn.out_proj.{kind}"] = take(f"{src}self_attn.out_proj.{kind}")
            out[f"{dst}mlp.c_fc.{kind}"] = take(f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.c_proj.{kind}"] = take(f"{src}mlp.fc2.{kind}")
    if "text_projection.weight" in state:
        out["text_projection"] = take("text_projection.weight").T
    else:  # diffusers' CLIPTextModel has none; SD 2.x files do
        out["text_projection"] = torch.eye(text_encoder.config.hidden_size)
    missed = sorted(set(state) - used)
    assert not missed, f"weights not mapped to the OpenCLIP layout: {missed[:5]}"
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe, family: str) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict (family: sd1 = CLIP, sd2 = OpenCLIP,
    sdxl = both, as SDXL's conditioner.embedders.0 and .1)."""
    if family == "sdxl":
        text = {**clip_to_ldm(pipe.text_encoder, SDXL_CLIP), **open_clip_to_ldm(pipe.text_encoder_2, SDXL_OPEN_CLIP)}
    elif family == "sd1":
        text = clip_to_ldm(pipe.text_encoder)
    else:
        text = open_clip_to_ldm(pipe.text_encoder)
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **text}
    state["alphas_cumprod"] = torch.as_tensor(pipe.scheduler.alphas_cumprod)  # as LDM training saves it
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_configs(pipe, folder: Path) -> Path:
    """A diffusers folder with the configs only (no weights): what `--config DIR` reads."""
    pipe.save_config(folder)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    if getattr(pipe, "text_encoder_2", None) is not None:
        pipe.text_encoder_2.config.save_pretrained(folder / "text_encoder_2")
    pipe.scheduler.save_config(folder / "scheduler")
    return folder


def kohya_lora(unet_layers: dict[str, tuple], text_layers: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """kohya-ss names for LoRA layers: {module path: (down, up, alpha)} -> lora_unet_* / lora_te_* keys."""
    out = {}
    for prefix, layers in (("lora_unet_", unet_layers), ("lora_te_", text_layers)):
        for module, (down, up, alpha) in layers.items():
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.lora_up.weight"] = up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


@functools.cache
def ldm_checkpoints(root: Path, sd1_pipe) -> dict[str, dict]:
    """Once per session: an SD 1.x (the given pipeline) and an SD 2.x v-prediction checkpoint in the
    original layout, each with a configs-only folder for `--config`: {family: {file, configs, pipe}}."""
    from safetensors.torch import save_file

    from tests.conftest import sd2_style_pipeline

    root.mkdir(parents=True, exist_ok=True)
    found = {}
    for family, pipe in (("sd1", sd1_pipe), ("sd2", sd2_style_pipeline("v_prediction"))):
        file = root / f"{family}.safetensors"
        save_file(pipeline_to_ldm(pipe, family), file)
        found[family] = {"file": file, "configs": save_configs(pipe, root / f"{family}-configs"), "pipe": pipe}
    return found
