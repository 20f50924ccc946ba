"""Small random-init models of the families awqtensor is checked on, from transformers
configs: shared by tests/test_architectures.py and benchmarks/architectures.py."""

import torch
import transformers
from torch import nn

VOCAB = 320


def build(family: str, seed: int = 0) -> nn.Module:
    """A small random-init model of ``family``."""
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128)
    llama_like = dict(base, hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    if family == "bert":
        cfg = transformers.BertConfig(**base, hidden_size=96, intermediate_size=192, num_attention_heads=4)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()
    if family == "opt-post-ln":
        cfg = transformers.OPTConfig(**base, hidden_size=96, ffn_dim=192, num_attention_heads=4,
                                     word_embed_proj_dim=96, do_layer_norm_before=False)
        return transformers.OPTForCausalLM(cfg).eval()
    if family == "gptj":
        cfg = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=96, n_layer=2, n_head=4, n_positions=128,
                                      rotary_dim=8, bos_token_id=0, eos_token_id=0)
        return transformers.GPTJForCausalLM(cfg).eval()
    if family == "phi":
        cfg = transformers.PhiConfig(**base, hidden_size=96, intermediate_size=192, num_attention_heads=4,
                                     partial_rotary_factor=0.5)
        return transformers.PhiForCausalLM(cfg).eval()
    if family == "falcon":  # parallel attention and MLP, one shared norm (Falcon-7B style)
        cfg = transformers.FalconConfig(**base, hidden_size=96, num_attention_heads=4, parallel_attn=True,
                                        new_decoder_architecture=False)
        return transformers.FalconForCausalLM(cfg).eval()
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**llama_like, intermediate_size=64, num_local_experts=4,
                                         num_experts_per_tok=2)
    elif family == "qwen2-moe":
        cfg = transformers.Qwen2MoeConfig(**llama_like, intermediate_size=128, moe_intermediate_size=64,
                                          shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2)
    elif family == "qwen3-moe":
        cfg = transformers.Qwen3MoeConfig(**llama_like, intermediate_size=128, moe_intermediate_size=64,
                                          num_experts=4, num_experts_per_tok=2, head_dim=24)
    elif family == "deepseek-v3":
        cfg = transformers.DeepseekV3Config(**dict(llama_like, num_key_value_heads=4), intermediate_size=128,
                                            moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
                                            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                            q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
                                            qk_nope_head_dim=16, v_head_dim=24)
    elif family == "llama":
        cfg = transformers.LlamaConfig(**llama_like, intermediate_size=160)
    elif family == "llava":
        return tiny_llava(seed)
    else:
        raise ValueError(family)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=VOCAB - 1,
                                      vision_feature_layer=-1)
    return transformers.LlavaForConditionalGeneration(config).eval()


def tiny_qwen2_vl(seed=0):
    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_scaling={"type": "mrope", "mrope_section": [4, 4, 4]})
    vision = dict(depth=2, embed_dim=64, hidden_size=96, num_heads=4, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB - 1,
                                        video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3)
    return transformers.Qwen2VLForConditionalGeneration(config).eval()
