"""The config of gpt2forge's ``modern`` architecture for Hugging Face ``transformers`` (remote code).

Shipped by ``gpt2forge export`` next to ``modeling_gpt2forge.py`` and loaded through ``config.json``'s
``auto_map`` with ``trust_remote_code=True``. Self-contained: it needs ``transformers``, not gpt2forge. Its fields
are gpt2forge's ``ModernConfig`` fields, under the same names and with the same meanings.
"""

from transformers import PretrainedConfig

FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "rope_base", "rope_fraction", "qk_norm", "mlp",
          "embed_norm", "tie_embeddings", "zero_init", "logit_softcap", "logit_softcap_form", "bias", "attn_scale",
          "residual_scalars", "value_embeds")


class Gpt2forgeModernConfig(PretrainedConfig):
    model_type = "gpt2forge_modern"
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
                     "max_position_embeddings": "block_size"}

    def __init__(self, n_layer=12, n_head=6, n_embd=768, block_size=1024, vocab_size=50257, rope_base=1024.0,
                 rope_fraction=0.5, qk_norm=True, mlp="relu2", embed_norm=True, tie_embeddings=False, zero_init=True,
                 logit_softcap=15.0, logit_softcap_form="algebraic", bias=True, attn_scale=0.12,
                 residual_scalars=False, value_embeds=0, **kwargs):
        self.n_layer, self.n_head, self.n_embd, self.block_size = n_layer, n_head, n_embd, block_size
        self.vocab_size, self.rope_base, self.rope_fraction = vocab_size, rope_base, rope_fraction
        self.qk_norm, self.mlp, self.embed_norm, self.tie_embeddings = qk_norm, mlp, embed_norm, tie_embeddings
        self.zero_init, self.logit_softcap, self.bias, self.attn_scale = zero_init, logit_softcap, bias, attn_scale
        self.logit_softcap_form, self.residual_scalars, self.value_embeds = (logit_softcap_form, residual_scalars,
                                                                             value_embeds)
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs["tie_word_embeddings"] = tie_embeddings
        kwargs.setdefault("bos_token_id", 50256)
        kwargs.setdefault("eos_token_id", 50256)
        super().__init__(**kwargs)
