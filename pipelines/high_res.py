"""Two-stage high-resolution generation with hierarchical local attention (Scale-DiT) for Flux.

Stage 1 generates the low-resolution (LR) image at the base size with the plain model. Stage 2 decodes it,
upsamples it (bicubic, then an unsharp mask), encodes it at the target size, noises it to the start of the
last ``hr_steps`` of ``num_inference_steps`` steps (SDEdit-like) and denoises the high-resolution (HR)
latent with the clean LR latent appended to the image tokens, ``[text; HR; LR]`` in every block, under
``hilbert_local`` attention: HR tokens see a ``(2 radius + 1)^2`` neighbourhood, text, and the LR tokens
under their window and the adjacent windows; LR tokens see LR tokens within ``lr_radius``.

Scaled positional anchors: LR token position ids are multiplied by the HR/LR ratio, which places the LR
tokens on the HR RoPE grid. The LR tokens are clean: they get the adaLN modulation of their own timestep
0 (:class:`LRModulation` runs the Flux blocks with per-token modulation; the stock model has one timestep
per sample). The LoRA bridge (``diffattn.lora`` recipe ``high-res``, loadable with ``load_lora_weights``)
is what adapts a model to the LR pathway.

Sizes: height and width must be multiples of ``vae_scale_factor * 2`` (16 px for FLUX); anything else is
a ``ValueError`` naming the nearest valid sizes (no silent rounding), as is an HR/LR ratio that is not an
integer.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

import diffattn

__all__ = ["HighResPipeline", "LRModulation", "sharpen", "upsample_image"]

_NOTICED: set[bool] = set()  # the applied-methods notice is printed once per process


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def sharpen(image: torch.Tensor, amount: float = 0.5, sigma: float = 1.0) -> torch.Tensor:
    """Unsharp mask on ``(batch, channels, h, w)`` images: ``image + amount * (image - blur(image))``."""
    if amount == 0:
        return image
    k = _gaussian_kernel(sigma, image.dtype, image.device)
    c, r = image.shape[1], k.numel() // 2
    x = F.pad(image, (r, r, r, r), mode="replicate")
    blur = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    blur = F.conv2d(blur, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return image + amount * (image - blur)


def upsample_image(image: torch.Tensor, height: int, width: int, amount: float = 0.5) -> torch.Tensor:
    """Bicubic upsampling of ``[0, 1]`` images to ``height x width``, an unsharp mask, clamped to ``[0, 1]``."""
    up = F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False)
    return sharpen(up, amount).clamp(0, 1).to(image.dtype)


class LRModulation:
    """Give the last ``n_lr`` image tokens their own timestep's adaLN modulation in every Flux block.

    Scale-DiT denoises the HR tokens at step ``t`` next to clean LR tokens at timestep 0, but the stock
    ``FluxTransformer2DModel`` modulates every token of a sample with one timestep embedding. While
    installed, a forward pre-hook on the transformer computes the embedding of ``timestep`` (0: clean)
    with the call's guidance and pooled text, and the double- and single-stream blocks run a copy of their
    stock forward in which the norms (the same modules, so LoRA layers apply) modulate the last ``n_lr``
    image tokens with it: shift, scale and both gates. ``n_lr = 0`` runs the stock forward.

    With ``lr_only_lora`` (the default) the LoRA layers of the blocks' adaLN norms and feed-forward /
    MLP projections act on the LR tokens only, as in Scale-DiT's bridge: the other tokens run those
    layers with their adapters switched off (attention LoRA acts on every token).

    Set ``n_lr`` before each transformer call (the pipeline and the ``high-res`` recipe do); ``remove()``
    restores the blocks.
    """

    def __init__(self, transformer: torch.nn.Module, timestep: float = 0.0, lr_only_lora: bool = True) -> None:
        self.model = transformer
        self.lr_only_lora = lr_only_lora
        self.timestep = float(timestep)
        self.n_lr = 0
        self.temb: torch.Tensor | None = None
        self.handles = [transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        self.blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        for block in transformer.transformer_blocks:
            block.forward = _double_forward(self, block)
        for block in transformer.single_transformer_blocks:
            block.forward = _single_forward(self, block)

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.temb = None
        if not self.n_lr:
            return
        hidden = kwargs["hidden_states"]
        t = torch.full_like(kwargs["timestep"], self.timestep).to(hidden.dtype) * 1000
        pooled = kwargs["pooled_projections"]
        guidance = kwargs.get("guidance")
        if guidance is None:
            self.temb = module.time_text_embed(t, pooled)
        else:
            self.temb = module.time_text_embed(t, guidance.to(hidden.dtype) * 1000, pooled)

    def active(self) -> int:
        return self.n_lr if self.temb is not None else 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.handles, self.blocks = [], []

    def __enter__(self) -> LRModulation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class _AdaptersOff:
    """Switch the peft LoRA layers inside some modules off for a few calls (the weights stay trainable)."""

    def __init__(self, on: bool, *modules: torch.nn.Module) -> None:
        self.layers = [
            m for mod in modules if on for m in mod.modules() if hasattr(m, "lora_A") and hasattr(m, "_disable_adapters")
        ]

    def __enter__(self) -> None:
        self.before = [m._disable_adapters for m in self.layers]
        for m in self.layers:
            m._disable_adapters = True

    def __exit__(self, *exc: Any) -> None:
        for m, b in zip(self.layers, self.before, strict=True):
            m._disable_adapters = b


def _per_token(a: torch.Tensor, b: torch.Tensor, n_a: int, n_b: int) -> torch.Tensor:
    """``(B, D)`` modulations of two token runs as one ``(B, n_a + n_b, D)`` tensor."""
    return torch.cat([a[:, None].expand(-1, n_a, -1), b[:, None].expand(-1, n_b, -1)], dim=1)


def _double_forward(state: LRModulation, block: torch.nn.Module) -> Any:
    stock = type(block).forward

    def forward(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        n = state.active()
        if not n:
            return stock(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
        m = hidden_states.shape[1] - n
        with _AdaptersOff(state.lr_only_lora, block.norm1):
            nh, g_msa, sh_mlp, sc_mlp, g_mlp = block.norm1(hidden_states[:, :m], emb=temb)
        nl, lg_msa, lsh_mlp, lsc_mlp, lg_mlp = block.norm1(hidden_states[:, m:], emb=state.temb)
        norm_hidden_states = torch.cat([nh, nl], dim=1)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )
        outputs = block.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            **(joint_attention_kwargs or {}),
        )
        attn_output, context_attn_output = outputs[0], outputs[1]
        hidden_states = hidden_states + _per_token(g_msa, lg_msa, m, n) * attn_output
        norm_hidden_states = block.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + _per_token(sc_mlp, lsc_mlp, m, n)) + _per_token(
            sh_mlp, lsh_mlp, m, n
        )
        with _AdaptersOff(state.lr_only_lora, block.ff):
            ff_hr = block.ff(norm_hidden_states[:, :m])
        ff_output = torch.cat([ff_hr, block.ff(norm_hidden_states[:, m:])], dim=1)
        hidden_states = hidden_states + _per_token(g_mlp, lg_mlp, m, n) * ff_output
        if len(outputs) == 3:
            hidden_states = hidden_states + outputs[2]
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
        norm_encoder_hidden_states = block.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * block.ff_context(
            norm_encoder_hidden_states
        )
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states

    return forward


def _single_forward(state: LRModulation, block: torch.nn.Module) -> Any:
    stock = type(block).forward

    def forward(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        n = state.active()
        if not n:
            return stock(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        m = hidden_states.shape[1] - n
        off = _AdaptersOff(state.lr_only_lora, block.norm, block.proj_mlp, block.proj_out)
        with off:
            na, gate_a = block.norm(hidden_states[:, :m], emb=temb)
        nb, gate_b = block.norm(hidden_states[:, m:], emb=state.temb)
        norm_hidden_states = torch.cat([na, nb], dim=1)
        with off:
            mlp_a = block.proj_mlp(na)
        mlp_hidden_states = block.act_mlp(torch.cat([mlp_a, block.proj_mlp(nb)], dim=1))
        attn_output = block.attn(
            hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
        )
        hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
        with off:
            out_a = block.proj_out(hidden_states[:, :m])
        projected = torch.cat([out_a, block.proj_out(hidden_states[:, m:])], dim=1)
        hidden_states = residual + _per_token(gate_a, gate_b, m, n) * projected
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]

    return forward


class HighResPipeline(FluxPipeline):
    """Scale-DiT's two-stage high-resolution generation for ``FluxTransformer2DModel`` pipelines.

    Built from the components of a ``FluxPipeline`` (``HighResPipeline(**flux.components)`` or
    ``HighResPipeline.from_pretrained(...)``); LoRA bridge weights load with ``load_lora_weights``.
    Works for FLUX.1 and the testbed DiT (``digits-dit``, a tiny pixel-space Flux).
    """

    def _check_size(self, name: str, value: int) -> None:
        unit = self.vae_scale_factor * 2
        if not isinstance(value, int) or value < unit or value % unit:
            lo = max(unit, (int(value) // unit) * unit) if isinstance(value, int | float) else unit
            raise ValueError(
                f"{name}={value!r} must be a positive multiple of {unit} px (VAE factor {self.vae_scale_factor} x "
                f"patch 2); nearest valid: {lo} or {lo + unit}"
            )

    def _decode(self, latents: torch.Tensor, height: int, width: int, tiled: bool) -> torch.Tensor:
        """Packed latents -> images in ``[0, 1]``, ``(batch, 3, height, width)``."""
        z = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        z = z / self.vae.config.scaling_factor + self.vae.config.shift_factor
        with _Tiling(self.vae, tiled):
            image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _encode(self, image: torch.Tensor, generator: Any, tiled: bool) -> torch.Tensor:
        """Images in ``[0, 1]`` -> packed, normalised latents."""
        from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

        with _Tiling(self.vae, tiled):
            dist = self.vae.encode((image * 2 - 1).to(self.vae.dtype))
        z = retrieve_latents(dist, generator=generator, sample_mode="argmax")
        z = (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        b, c, h, w = z.shape
        return self._pack_latents(z, b, c, h, w)

    def method_steps(self, num_inference_steps: int | None = None, hr_steps: int | None = None, **_: Any) -> range:
        """The step indices, in the ``num_inference_steps`` schedule, at which methods applied by the user
        run: stage 2's last ``hr_steps`` (stage 1 runs them suspended). :func:`diffattn.calibrate` samples
        its steps among these; other keywords of the call are ignored. Defaults: ``__call__``'s."""
        import inspect

        params = inspect.signature(type(self).__call__).parameters
        num = params["num_inference_steps"].default if num_inference_steps is None else num_inference_steps
        hr = params["hr_steps"].default if hr_steps is None else hr_steps
        return range(num - min(hr, num), num)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str] | None = None,
        height: int = 2048,
        width: int = 2048,
        *,
        lr_height: int | None = None,
        lr_width: int | None = None,
        num_inference_steps: int = 28,
        hr_steps: int = 18,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        radius: int = 8,
        lr_radius: int = 2,
        lr_mode: str = "window",
        lr_window: int = 16,
        granularity: str = "token",
        backend: str = "auto",
        local_attention: bool = True,
        lr_timestep: float | None = 0.0,
        unsharp_amount: float = 0.5,
        tiled_vae: bool = True,
        max_sequence_length: int = 512,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_lr: bool = False,
    ) -> Any:
        """Generate ``height x width`` images in two stages.

        Args:
            prompt, negative_prompt, true_cfg_scale, guidance_scale, max_sequence_length: as ``FluxPipeline``.
            height, width: the target size in pixels (multiples of ``vae_scale_factor * 2``).
            lr_height, lr_width: the base size of stage 1; default: the largest integer fraction of the
                target that is at most 1024 px on its longer side (and a valid size).
            num_inference_steps: steps of the schedule both stages use.
            hr_steps: stage 2 starts at the last ``hr_steps`` steps of the HR schedule (Scale-DiT: 18 of 28).
            radius, lr_radius, lr_mode, lr_window, granularity, backend: ``hilbert_local`` options for stage 2.
            local_attention: False runs stage 2 with dense attention over the same tokens (a baseline).
                Where diffattn methods are already applied to the transformer (``diffattn.apply(pipe,
                "hilbert_local", layers=...)``, a calibrated preset, or ``"dense"``), stage 2 runs under
                them instead, stage 1 with them suspended, and this call's attention options are not used
                (a notice says so once): this is how :func:`diffattn.calibrate` and presets reach stage 2.
            lr_timestep: the timestep (0-1, 0: clean) whose modulation the LR tokens get
                (:class:`LRModulation`, which also keeps a bridge's norm/FF LoRA on the LR tokens); ``None``:
                the stock blocks (LR tokens share the HR step's modulation; every LoRA acts on every token).
            unsharp_amount: strength of the unsharp mask after bicubic upsampling.
            tiled_vae: decode and encode with the VAE's tiling where it has one (AutoencoderKL).
            return_lr: also return the stage-1 images (``output.lr_images``).

        Raises:
            ValueError: sizes the VAE and patchify cannot produce, an HR/LR ratio that is not an integer,
                ``hr_steps`` outside ``1..num_inference_steps``.
        """
        for name, value in (("height", height), ("width", width)):
            self._check_size(name, value)
        ratio = _ratio(height, width, lr_height, lr_width, self.vae_scale_factor * 2)
        lr_h, lr_w = height // ratio, width // ratio
        for name, value in (("lr_height", lr_h), ("lr_width", lr_w)):
            self._check_size(name, value)
        if not (isinstance(hr_steps, int) and 1 <= hr_steps <= num_inference_steps):
            raise ValueError(f"hr_steps must be an integer in 1..num_inference_steps={num_inference_steps}, got {hr_steps!r}")
        device = self._execution_device
        common = dict(
            guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale, negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length,
        )

        # ----- stage 1: the LR image with the plain model (a loaded bridge LoRA is switched off, methods the
        # user applied for stage 2 are suspended) --------------------------------------------------------------
        user_patches = diffattn.applied(self.transformer)
        if user_patches and not _NOTICED:
            _NOTICED.add(True)
            print(
                f"diffattn: HighResPipeline stage 2 runs the method(s) applied to the transformer "
                f"({', '.join(p.method for p in user_patches)}); stage 1 runs without them and this call's "
                "radius / lr_* / local_attention options are not used",
                file=sys.stderr,
            )
        bridge = bool(getattr(self.transformer, "peft_config", None))
        if bridge:
            self.disable_lora()
        try:
            with contextlib.ExitStack() as plain:
                for p in user_patches:
                    plain.enter_context(p.suspended())
                lr_latents = super().__call__(
                    prompt=prompt, height=lr_h, width=lr_w, num_inference_steps=num_inference_steps, generator=generator,
                    output_type="latent", **common,
                ).images
        finally:
            if bridge:
                self.enable_lora()
        lr_image = self._decode(lr_latents, lr_h, lr_w, tiled_vae)

        # ----- stage 2: upsample, encode, noise, denoise with the LR tokens --------------------------------
        hr_image = upsample_image(lr_image, height, width, unsharp_amount)
        x0 = self._encode(hr_image, generator, tiled_vae).to(lr_latents.dtype)
        batch = x0.shape[0]
        prompt_embeds, pooled, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        do_cfg = true_cfg_scale > 1 and negative_prompt is not None
        if do_cfg:
            neg_embeds, neg_pooled, neg_text_ids = self.encode_prompt(
                prompt=negative_prompt, prompt_2=None, device=device, max_sequence_length=max_sequence_length
            )
        if prompt_embeds.shape[0] != batch:
            raise ValueError(f"stage 1 made {lr_latents.shape[0]} images but the prompts encode {prompt_embeds.shape[0]}")

        h_tok, w_tok = height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2)
        hr_ids = self._prepare_latent_image_ids(batch, h_tok, w_tok, device, x0.dtype)
        lr_ids = self._prepare_latent_image_ids(batch, lr_h // (self.vae_scale_factor * 2),
                                                lr_w // (self.vae_scale_factor * 2), device, x0.dtype)
        lr_ids[:, 1:] *= ratio  # scaled positional anchors: LR tokens on the HR RoPE grid
        img_ids = torch.cat([hr_ids, lr_ids], dim=0)

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(
            x0.shape[1],
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        start = num_inference_steps - hr_steps
        timesteps = timesteps[start:]
        self.scheduler.set_begin_index(start)
        noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        latents = self.scheduler.scale_noise(x0, timesteps[:1].expand(batch), noise)
        guidance = (torch.full([batch], guidance_scale, device=device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        lr_tokens = lr_latents.to(latents.dtype)

        def predict(embeds: torch.Tensor, pooled_embeds: torch.Tensor, txt_ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.transformer(
                hidden_states=torch.cat([latents, lr_tokens], dim=1),
                timestep=t.expand(batch).to(latents.dtype) / 1000,
                guidance=guidance,
                pooled_projections=pooled_embeds,
                encoder_hidden_states=embeds,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            return out[:, : latents.shape[1]]

        options = dict(radius=radius, lr_radius=lr_radius, lr_mode=lr_mode, lr_window=lr_window,
                       granularity=granularity, lr_ratio=ratio, backend=backend)
        patch = diffattn.apply(self.transformer, "hilbert_local", **options) if local_attention and not user_patches else None
        modulation = LRModulation(self.transformer, lr_timestep) if lr_timestep is not None else None
        if modulation is not None:
            modulation.n_lr = lr_tokens.shape[1]
        try:
            with self.progress_bar(total=len(timesteps)) as bar:
                for t in timesteps:
                    noise_pred = predict(prompt_embeds, pooled, text_ids, t)
                    if do_cfg:
                        neg = predict(neg_embeds, neg_pooled, neg_text_ids, t)
                        noise_pred = neg + true_cfg_scale * (noise_pred - neg)
                    latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                    bar.update()
        finally:
            if modulation is not None:
                modulation.remove()
            if patch is not None:
                patch.remove()

        if output_type == "latent":
            images: Any = latents
        else:
            image = self._decode(latents, height, width, tiled_vae)
            images = self.image_processor.postprocess(image * 2 - 1, output_type=output_type)
        lr_out = self.image_processor.postprocess(lr_image * 2 - 1, output_type=output_type) if return_lr else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, lr_out) if return_lr else (images,)
        out = FluxPipelineOutput(images=images)
        if return_lr:
            out.lr_images = lr_out  # type: ignore[attr-defined]
        return out


class _Tiling:
    """Temporarily switch a VAE's tiling on (where it has one)."""

    def __init__(self, vae: Any, on: bool) -> None:
        self.vae, self.on = vae, on and hasattr(vae, "use_tiling")

    def __enter__(self) -> None:
        if self.on:
            self.before = self.vae.use_tiling
            self.vae.use_tiling = True

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            self.vae.use_tiling = self.before


def _ratio(height: int, width: int, lr_height: int | None, lr_width: int | None, unit: int) -> int:
    """The integer HR/LR ratio; without an LR size, the smallest one that brings the longer side to <= 1024 px."""
    if (lr_height is None) != (lr_width is None):
        raise ValueError("give lr_height and lr_width together, or neither")
    if lr_height is not None:
        if lr_height < 1 or lr_width < 1 or height % lr_height or width % lr_width \
                or height // lr_height != width // lr_width:
            raise ValueError(
                f"the HR/LR ratio must be the same integer on both axes: {height}x{width} from "
                f"{lr_height}x{lr_width}"
            )
        return height // lr_height
    for r in range(1, max(height, width) + 1):
        if height % r or width % r or (height // r) % unit or (width // r) % unit:
            continue
        if max(height, width) // r <= 1024:
            return r
    raise ValueError(f"no integer ratio brings {height}x{width} to a valid base size; pass lr_height and lr_width")
