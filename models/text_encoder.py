"""The umT5-XXL text encoder, through `transformers.UMT5EncoderModel` (a dependency, not a rewrite).

Prompts are cleaned as Wan does, tokenized to exactly `text_len` (512) tokens with the
end-of-sequence token, encoded, and the rows past each prompt's length are zeroed: the
DiT attends to all 512 rows, so what the pad rows hold matters (they must be zeros).
"""

from __future__ import annotations

import html
import logging
import os
import re
from pathlib import Path

import torch

from flashdreams.errors import CheckpointError, InvalidArgumentError, NotFoundError

log = logging.getLogger(__name__)

# Wan's original checkpoint names (models_t5_umt5-xxl-enc-bf16.pth) -> transformers names.
_WAN_TO_HF = [
    (r"^token_embedding\.", "shared."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.(q|k|v|o)\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
    (r"^norm\.", "encoder.final_layer_norm."),
]


def wan_t5_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Wan-layout umT5 keys to `UMT5EncoderModel` keys (others pass through)."""
    out = {}
    for k, v in sd.items():
        new = k
        for pattern, repl in _WAN_TO_HF:
            if re.match(pattern, k):
                new = re.sub(pattern, repl, k)
                break
        out[new] = v
    if "shared.weight" in out and "encoder.embed_tokens.weight" not in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy if installed, HTML unescape twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def zero_padding_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows past each sequence's length become exactly zero (the reference zeroes them in place)."""
    return hidden * mask[..., None].to(hidden.dtype)


class TextEncoder:
    """umT5 encoder + tokenizer from a local directory (HF layout: config.json, weights, tokenizer files)."""

    def __init__(self, model, tokenizer=None, text_len: int = 512) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def from_dir(cls, path: str | os.PathLike, device="cpu", dtype=torch.bfloat16, text_len: int = 512) -> TextEncoder:
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except ImportError:
            raise InvalidArgumentError("the text encoder needs transformers: pip install 'flashdreams[text]'") from None
        p = Path(path)
        if not p.is_dir():
            raise NotFoundError(f"text encoder directory '{p}' does not exist")
        model_dir = p / "text_encoder" if (p / "text_encoder").is_dir() else p
        tok_dir = p / "tokenizer" if (p / "tokenizer").is_dir() else p
        if not (model_dir / "config.json").is_file():
            raise NotFoundError(f"'{model_dir}' has no config.json: expected a transformers UMT5 encoder directory")
        try:
            model = UMT5EncoderModel.from_pretrained(str(model_dir), torch_dtype=dtype, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the umT5 encoder from '{model_dir}': {exc}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        except (OSError, ValueError) as exc:
            raise NotFoundError(f"no tokenizer in '{tok_dir}' (google/umt5-xxl's files are needed): {exc}") from None
        return cls(model.to(device), tokenizer, text_len)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, text_len] token ids + mask -> [B, text_len, d_model] float32, pad rows zero."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return zero_padding_rows(hidden.float(), mask)

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> [B, text_len, d_model] float32 embeddings, the DiT's `prompt_embeds`."""
        if self.tokenizer is None:
            raise InvalidArgumentError("this text encoder has no tokenizer; use encode_ids")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = self.tokenizer(
            [clean_prompt(t) for t in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return self.encode_ids(tok["input_ids"], tok["attention_mask"])

    def offload(self) -> None:
        """Free the encoder's device memory (it runs once per prompt; the DiT needs the room)."""
        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
