"""Two random models for the mixture-of-experts benchmark (bench/results/moe.md): a
Mixtral-shaped one (8 experts of width 1024, top-2) and a Mistral with the same active MLP
width (2048), so that a token's routed work is the same in both.

    python bench/moe_models.py DIR      # writes DIR/mixtral and DIR/mistral (HF folders)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

COMMON = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=10240, max_position_embeddings=4096)
MODELS = {"mixtral": ("MixtralConfig", dict(intermediate_size=1024, num_local_experts=8,
                                            num_experts_per_tok=2)),
          "mistral": ("MistralConfig", dict(intermediate_size=2048))}


def main(out: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 10240)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
    for name, (cls, kw) in MODELS.items():
        torch.manual_seed(0)
        config = getattr(transformers, cls)(**COMMON, **kw)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out / name)
        fast.save_pretrained(out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
