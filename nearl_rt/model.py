"""NEARL-CLIP: a frozen open_clip CLIP plus USEformer and an OCA after every layer of both towers.

The towers are reached through nearl_rt.towers (open_clip or timm ViT; CLIP or BERT text), so the
loops below are written once for every supported backbone.

Lock-step forward (per layer l):
    X = VisionBlock_l(X);  T = TextBlock_l(T)            frozen
    Z = USE_step(Z, X, T, l)                             per image
    X = OCA_v^l(X, Z);     T = OCA_t^l(T, Z)             each prompt reads its image's Z

In `text_cacheable` mode the text stream reads a synergy Z_t computed from the prompts alone, so
class text features (and the per-layer text tokens the image stream's USEformer reads) are
computed once per class set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from nearl_rt import kernels
from nearl_rt.adapters import build_adapters, count_parameters, state_mismatch
from nearl_rt.backbone import BackboneIdentity, build_backbone
from nearl_rt.config import NearlConfig, preset_config
from nearl_rt.core.imaging import IntensityPolicy
from nearl_rt.core.preprocess import image_list, preprocess_batch
from nearl_rt.prompts import DEFAULT_NEGATIVE, DEFAULT_POSITIVE, DEFAULT_TEMPLATE, Templates, class_prompts, \
    finding_prompts, normalise_templates, pool_prompts, pooling_matrix
from nearl_rt.tokenizer import tokenize
from nearl_rt.towers import PromptBatch, build_towers


@dataclass
class TextStream:
    """Output of the prompt-only text stream (text_cacheable mode)."""

    features: torch.Tensor            # [C, E] L2-normalised class text features
    layer_tokens: list                # per layer: [1, C*n, Dt] text tokens before OCA (USEformer keys)
    valid: torch.Tensor               # [1, C*n] bool, False at padding


class NearlCLIP(nn.Module):
    """The NEARL-CLIP model; build it with `nearl_rt.build_model`."""

    def __init__(self, config: NearlConfig, backbone: nn.Module, identity: BackboneIdentity, backend: str = "auto"):
        super().__init__()
        if backend not in kernels.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; use one of {kernels.BACKENDS}")
        self.config = config
        self.backend = backend
        self.backbone = backbone.requires_grad_(False).eval()
        self.backbone_identity = identity
        # plain objects, not submodules: they only reach into self.backbone's towers
        self.vision_tower, self.text_tower = build_towers(self.backbone, identity.name)
        layers = len(self.vision_tower.blocks)
        vw, tw = self.vision_tower.width, self.text_tower.width
        adapters = build_adapters(config, vw, tw, layers)
        self.use, self.oca_v, self.oca_t = adapters["use"], adapters["oca_v"], adapters["oca_t"]
        self.class_names: list[str] = []
        self.templates: Optional[Templates] = None  # a template, an ensemble list, or per-class prompts
        # multi-label (set_findings): class_names are findings, templates {"positive": ..., "negative": ...}
        self.multi_label = False
        self.register_buffer("class_tokens", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_pool", None, persistent=False)  # [C, P] prompt ensemble averaging
        self.prompt_context: Optional[nn.Module] = None  # CoOp's learned context (nearl_rt.coop)
        self._text_cache: Optional[tuple] = None
        self._class_prompts: Optional[tuple] = None
        self.trim_prompts = True  # False pads prompts to the full context (same result, slower)

    # ----------------------------------------------------------------------------------- basics
    @property
    def interaction(self) -> str:
        return self.config.interaction

    @property
    def template(self) -> Optional[str]:
        """The single prompt template, or the first of an ensemble list (None for per-class prompts)."""
        t = self.templates
        return t if isinstance(t, str) else t[0] if isinstance(t, list) else None

    @property
    def prompts(self) -> list[str]:
        """Every prompt, class by class (several per class with an ensemble)."""
        if not self.class_names:
            return []
        groups = finding_prompts(self.class_names, self.templates["positive"], self.templates["negative"]) \
            if self.multi_label else class_prompts(self.class_names, self.templates)
        return [p for ps in groups for p in ps]

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def embed_dim(self) -> int:
        """Width E of the joint image-text embedding (the features' size)."""
        return self.text_tower.output_dim

    @property
    def preprocess_cfg(self) -> dict:
        """Input size, mean, std and interpolation the backbone expects (open_clip's preprocess config)."""
        return dict(self.backbone.visual.preprocess_cfg)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode (dropout, patch dropout)
        return self

    def adapter_modules(self) -> dict[str, nn.Module]:
        return {"use": self.use, "oca_v": self.oca_v, "oca_t": self.oca_t}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, m in self.adapter_modules().items() for k, v in m.state_dict().items()}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.adapter_modules().values() for p in m.parameters()]

    def num_trainable_parameters(self) -> int:
        return sum(count_parameters(m) for m in self.adapter_modules().values())

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load adapter weights; raises ValueError naming missing, unexpected or mis-shaped entries."""
        own = self.adapter_state_dict()
        problem = state_mismatch({k: tuple(v.shape) for k, v in own.items()}, state)
        if problem:
            raise ValueError(problem)
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])

    def save_pretrained(self, outdir, extra: Optional[dict] = None, **card):
        """A shareable folder: adapter.safetensors, config.json and a README.md model card (nearl_rt.pretrained;
        extra: e.g. the intensity policy and calibration; card: metrics=, dataset=). Returns its path."""
        from nearl_rt.pretrained import save_model_pretrained
        return save_model_pretrained(self, outdir, extra, **card)

    # ---------------------------------------------------------------------------------- classes
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return tokenize(texts, self.backbone_identity)

    def set_classes(self, class_names: Sequence[str], template: Templates = DEFAULT_TEMPLATE) -> None:
        """Fix the classes `classify` scores (any class set). `template`: one template with '{}', a list of
        templates (prompt ensemble) or {class: [prompts]}; with several prompts per class the class text
        feature is the normalised mean of its prompts' features (nearl_rt.prompts)."""
        names = _checked_names(class_names)
        templates = normalise_templates(template)
        self._set_prompts(names, class_prompts(names, templates), templates, multi_label=False)

    def set_findings(self, finding_names: Sequence[str], positive: Templates = DEFAULT_POSITIVE,
                     negative: Templates = DEFAULT_NEGATIVE) -> None:
        """Multi-label: score each finding through a positive and a negative prompt (each side a template, an
        ensemble or per-finding prompts). `classify` then returns per-finding logits [B, F] = the positive prompt's
        logit minus the negative's, so sigmoid(logit) = softmax over the pair = P(finding present)."""
        names = _checked_names(finding_names)
        templates = {"positive": normalise_templates(positive), "negative": normalise_templates(negative)}
        self._set_prompts(names, finding_prompts(names, templates["positive"], templates["negative"]), templates,
                          multi_label=True)

    def _set_prompts(self, names: list, groups: list, templates, multi_label: bool) -> None:
        self.class_names, self.templates, self.multi_label = names, templates, multi_label
        device = self.class_tokens.device
        self.class_tokens = self.tokenize([p for ps in groups for p in ps]).to(device)
        pool = pooling_matrix([len(ps) for ps in groups])
        self.prompt_pool = None if pool is None else pool.to(device)
        self._text_cache = self._class_prompts = None

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits per prompt group [B, G] -> per class [B, C]: the same for single-label classes; for F findings
        (G = 2F) the positive group's logit minus the negative's (the logit bias cancels)."""
        if not self.multi_label:
            return logits
        n = len(self.class_names)
        return logits[:, :n] - logits[:, n:]

    def classify(self, images) -> torch.Tensor:
        """Logits [B, len(class_names)] for the classes set with `set_classes`. `images`: the preprocessed batch
        float [B, 3, H, W], or image files / PIL images / arrays (one, or a list), which `preprocess` turns into it."""
        if not self.class_names:
            raise RuntimeError("no classes set: call model.set_classes(['class a', 'class b', ...]) first")
        if not torch.is_tensor(images):
            images = self.preprocess(images)
        if self.interaction == "text_cacheable" and not torch.is_grad_enabled():
            return self.class_logits(self.scaled_logits(self.encode_images(images, self.cached_text_stream()),
                                                        pool_prompts(self._text_cache[1].features, self.prompt_pool)))
        return self(images, self.class_tokens)

    def preprocess(self, images, intensity: Optional[IntensityPolicy] = None) -> torch.Tensor:
        """Image files (PNG, JPEG, TIFF, DICOM; 16-bit too), PIL images or arrays, one or a list -> the float32 batch
        [B, 3, H, W] that `classify` takes, on the model's device: decoded and preprocessed exactly as training,
        evaluation and NearlSession do (nearl_rt.core). intensity: how >8-bit images map to 0..255 (default: the
        per-image min-max that training uses unless told otherwise; docs/medical-images.md)."""
        cfg = self.preprocess_cfg
        size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
        try:
            batch = preprocess_batch(image_list(images), int(size), cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"),
                                     intensity)
        except TypeError as e:
            raise TypeError(f"classify/preprocess take a float tensor [B, 3, {size}, {size}] or images (paths, PIL "
                            f"images, arrays): {e}") from None
        return torch.from_numpy(batch).to(self.class_tokens.device)

    def cuda_graph(self, batch_sizes: Sequence[int] = (1, 8, 64)):
        """`classify` captured in one CUDA graph per batch size: a callable images -> logits (nearl_rt.cuda_graph)."""
        from nearl_rt.cuda_graph import capture_classify
        return capture_classify(self, batch_sizes)

    def cached_text_stream(self) -> TextStream:
        """The class text stream, recomputed only when the classes, adapter weights, device or dtype change."""
        params = self.adapter_parameters() + (list(self.prompt_context.parameters()) if self.prompt_context is not None else [])
        key = (self.class_tokens.data_ptr(), self.dtype, tuple((p.data_ptr(), p._version) for p in params))
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                self._text_cache = (key, self.encode_text_stream(self.class_tokens))
        return self._text_cache[1]

    # ---------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (preprocessed), tokens [C, context] -> logits [B, C]. Passed the class prompts
        (`model.class_tokens`) of a prompt ensemble, the logits are per class (prompts averaged); of findings,
        per finding (class_logits)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [C, context_length] (from nearl_rt.tokenize), got {tuple(tokens.shape)}")
        own = tokens is self.class_tokens
        pool = self.prompt_pool if own else None
        if self.interaction == "text_cacheable":
            text = self.encode_text_stream(tokens)
            logits = self.scaled_logits(self.encode_images(images, text), pool_prompts(text.features, pool))
        else:
            img, txt = self._bidirectional(images, tokens)
            logits = self.scaled_logits_paired(img, pool_prompts(txt, pool))
        return self.class_logits(logits) if own else logits

    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features: image [B, E] and text [B, C, E] (prompt c as scored against image b)."""
        if self.interaction == "text_cacheable":
            text = self.encode_text_stream(tokens)
            img = self.encode_images(images, text)
            return img, text.features.unsqueeze(0).expand(img.shape[0], -1, -1)
        return self._bidirectional(images, tokens)

    def scaled_logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        logits = self.backbone.logit_scale.exp() * img @ txt.t()
        return logits if self.backbone.logit_bias is None else logits + self.backbone.logit_bias

    def scaled_logits_paired(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        logits = self.backbone.logit_scale.exp() * torch.einsum("be,bce->bc", img, txt)
        return logits if self.backbone.logit_bias is None else logits + self.backbone.logit_bias

    def prompt_batch(self, tokens: torch.Tensor) -> PromptBatch:
        """Trim prompts to the longest real prompt. For the class prompts the result is cached: trimming
        reads positions back to the host, which would stall the GPU (and break CUDA-graph capture)."""
        if tokens is not self.class_tokens:
            return self.trimmed_prompts(tokens)
        key = (tokens.data_ptr(), tokens.device, self.trim_prompts)
        if self._class_prompts is None or self._class_prompts[0] != key:
            self._class_prompts = (key, self.trimmed_prompts(tokens))
        return self._class_prompts[1]

    def trimmed_prompts(self, tokens: torch.Tensor) -> PromptBatch:
        text = self.text_tower
        lo, hi = (int(v) for v in torch.aminmax(tokens))
        if tokens.shape[1] > text.context_length or lo < 0 or hi >= text.vocab_size:
            raise ValueError(f"tokens [C, {tokens.shape[1]}] with ids {lo}..{hi} do not fit {self.backbone_identity.name}'s "
                             f"text tower (at most {text.context_length} tokens, ids < {text.vocab_size}); "
                             f"tokenize with model.tokenize(texts)")
        return text.prompts(tokens, self.trim_prompts)

    def embed_prompts(self, p: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings [C, n, Dt] and the text tower's attention mask for them."""
        return self.text_tower.embed(p, self.dtype, self.prompt_context)

    def _text_features(self, t: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_tower.features(t, pool), dim=-1)

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_tower.features(x), dim=-1)

    def _bidirectional(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers in lock-step; text row b*C + c is prompt c scored against image b."""
        p = self.prompt_batch(tokens)
        return self.lockstep(images, p, *self.embed_prompts(p))

    def lockstep(self, images: torch.Tensor, p: PromptBatch, t: torch.Tensor, mask: torch.Tensor):
        """_bidirectional on trimmed prompts `p` whose embeddings `t` and attention `mask` are given."""
        vision, text = self.vision_tower, self.text_tower
        x = vision.embed(images)
        B, (C, n) = x.shape[0], p.tokens.shape
        z = self.use.initial(B)
        image_group = torch.arange(B, device=x.device)
        text_group = image_group.repeat_interleave(C)
        valid_shared = p.valid.reshape(1, C * n)
        valid_per_image = valid_shared.expand(B, -1).contiguous()
        for layer in range(len(vision.blocks)):
            x = vision.block(layer, x)
            t = text.block(layer, t, mask)
            if t.shape[0] == C:  # prompts are identical across images until the first OCA
                z = self.use.step(z, layer, x, t.reshape(1, C * n, -1), valid_shared, self.backend)
                t = t.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * C, n, -1)
                mask = text.repeat_mask(mask, B)
            else:
                z = self.use.step(z, layer, x, t.reshape(B, C * n, -1), valid_per_image, self.backend)
            x = self.oca_v[layer](x, z, image_group, self.backend)
            t = self.oca_t[layer](t, z, text_group, self.backend)
        txt = self._text_features(t, p.pool.repeat(B)).view(B, C, -1)
        return self._image_features(x), txt

    def encode_text_stream(self, tokens: torch.Tensor) -> TextStream:
        """text_cacheable: the prompts' own stream, whose OCAs read the text-only synergy Z_t."""
        p = self.prompt_batch(tokens)
        t, mask = self.embed_prompts(p)
        C, n = p.tokens.shape
        valid = p.valid.reshape(1, C * n)
        zt = self.use.initial(1)
        group = torch.zeros(C, dtype=torch.long, device=t.device)
        layer_tokens = []
        for layer in range(len(self.text_tower.blocks)):
            t = self.text_tower.block(layer, t, mask)
            layer_tokens.append(t.reshape(1, C * n, -1))
            zt = self.use.step(zt, layer, None, layer_tokens[-1], valid, self.backend)
            t = self.oca_t[layer](t, zt, group, self.backend)
        return TextStream(features=self._text_features(t, p.pool), layer_tokens=layer_tokens, valid=valid)

    def encode_images(self, images: torch.Tensor, text: TextStream) -> torch.Tensor:
        """text_cacheable: image features [B, E] (normalised); the USEformer reads image + class prompts."""
        x = self.vision_tower.embed(images)
        z = self.use.initial(x.shape[0])
        group = torch.arange(x.shape[0], device=x.device)
        for layer in range(len(self.vision_tower.blocks)):
            x = self.vision_tower.block(layer, x)
            z = self.use.step(z, layer, x, text.layer_tokens[layer], text.valid, self.backend)
            x = self.oca_v[layer](x, z, group, self.backend)
        return self._image_features(x)


def _checked_names(names) -> list:
    if isinstance(names, str) or not names:
        raise ValueError("class_names must be a non-empty list of strings, e.g. ['normal', 'pneumonia']")
    names = [str(c) for c in names]
    if any(not c.strip() for c in names) or len(set(names)) != len(names):
        raise ValueError(f"class names must be non-empty and unique, got {names}")
    return names


def build_model(preset: Union[str, NearlConfig] = "vit_b16", *, interaction: str = "bidirectional",
                backend: str = "auto", pretrained: Optional[str] = None, backbone_init_seed: int = 0,
                **overrides) -> NearlCLIP:
    """Build NEARL-CLIP on a frozen open_clip backbone.

    preset: "vit_b16" (the paper's default), "vit_b32", "biomedclip", "tiny" / "tiny_bert" (CPU
    tests), or a NearlConfig.
    pretrained: a local open_clip / OpenAI CLIP weights file, or a model download folder (BiomedCLIP:
    open_clip_config.json + open_clip_pytorch_model.bin + tokenizer files); None = random backbone
    (warns: accuracy is then meaningless), drawn from `backbone_init_seed` on a private RNG so a
    checkpoint rebuilds it exactly. Nothing is ever downloaded.
    overrides: any NearlConfig field, e.g. oca_rank=16, orthogonal=False.
    """
    config = preset_config(preset, interaction=interaction, **overrides)
    backbone, identity = build_backbone(config.backbone, pretrained, quick_gelu=config.quick_gelu,
                                        init_seed=backbone_init_seed)
    config = config.replace(quick_gelu=identity.quick_gelu)
    return NearlCLIP(config, backbone, identity, backend=backend)
