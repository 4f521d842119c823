"""Tiny random Hugging Face MoE checkpoints made with transformers and `save_pretrained`, for tests.

Every family of `beam_jax.FAMILIES` has a base config here (head_dim >= 32, as vLLM's CPU attention needs);
`make_tiny(family, path, **overrides)` saves one and returns the torch model (float32, eval mode).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BASE = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)

FAMILY_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(head_dim=32, intermediate_size=48, num_local_experts=5, num_experts_per_tok=2,
                                      rope_theta=10000.0)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(head_dim=32, intermediate_size=56, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                                         norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=32, intermediate_size=56, moe_intermediate_size=24, num_experts=7,
                                         num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=5, num_experts_per_tok=2, num_key_value_heads=2,
                                  num_attention_heads=2, clip_qkv=None, pad_token_id=0, eos_token_id=1,
                                  bos_token_id=None)),
    "deepseek_v2": ("DeepseekV2Config", dict(intermediate_size=56, moe_intermediate_size=24, n_routed_experts=6,
                                             num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16,
                                             q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=32,
                                             v_head_dim=32, first_k_dense_replace=1, num_key_value_heads=4,
                                             topk_method="group_limited_greedy", n_group=3, topk_group=2,
                                             routed_scaling_factor=1.5, num_hidden_layers=3)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=56, moe_intermediate_size=24, n_routed_experts=8,
                                             num_experts_per_tok=3, n_shared_experts=1, kv_lora_rank=16,
                                             q_lora_rank=24, qk_nope_head_dim=32, qk_rope_head_dim=32,
                                             v_head_dim=32, first_k_dense_replace=1, num_key_value_heads=4,
                                             n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                             norm_topk_prob=True, num_hidden_layers=3)),
    "glm4_moe": ("Glm4MoeConfig", dict(head_dim=32, intermediate_size=56, moe_intermediate_size=24,
                                       n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=2,
                                       topk_group=1, routed_scaling_factor=1.5, first_k_dense_replace=1,
                                       attention_bias=True, use_qk_norm=True, norm_topk_prob=True,
                                       num_hidden_layers=3)),
}


def hf_config(family: str, **overrides):
    import transformers

    cls_name, extra = FAMILY_CONFIGS[family]
    kw = {**BASE, **extra, **overrides}
    if family != "olmoe":
        kw.setdefault("pad_token_id", 0)
        kw.setdefault("eos_token_id", 1)
        kw.setdefault("bos_token_id", 2)
    return getattr(transformers, cls_name)(**kw)


def make_tiny(family: str, path, seed: int = 0, dtype="float32", scale_router: float = 8.0, **overrides):
    """Save a random tiny `family` model to `path`; returns the torch model (float32, eval).

    Router weights are scaled up (x `scale_router`) so routing is decisive: with HF's 0.02 init every
    softmax is nearly uniform and Top-K would be decided by rounding noise.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and "shared_expert_gate" not in name and p.dim() == 2:
                p.mul_(scale_router)
            if "norm" in name:  # move norm weights off 1 so a transposed or missing norm would show
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero at init: give it a say in the choice
                b.copy_(0.05 * torch.randn_like(b))
    path = Path(path)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return model.float().eval()


def capture_routing(torch_model):
    """Register hooks on every HF Top-K router; returns a list filled with (router_logits, indices) per call."""
    records = []

    def hook(_module, _inp, out):
        logits, _scores, indices = out
        records.append((logits.detach().float().numpy(), indices.detach().numpy()))

    for name, mod in torch_model.named_modules():
        if type(mod).__name__.endswith(("TopKRouter", "TopkRouter")):
            mod.register_forward_hook(hook)
    return records


def legacy_rope_theta(path):
    """Rewrite config.json with the pre-v5 `rope_theta` field instead of `rope_parameters`."""
    f = Path(path) / "config.json"
    c = json.loads(f.read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope["rope_theta"]
    f.write_text(json.dumps(c))


def fuse_experts(path):
    """Rewrite a per-expert checkpoint into the fused layout (experts.gate_up_proj [E, 2f, d],
    experts.down_proj [E, d, f]) under the in-memory module name `mlp`."""
    from safetensors.numpy import load_file, save_file

    path = Path(path)
    tensors = load_file(path / "model.safetensors")
    out, groups = {}, {}
    names = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    for k, v in tensors.items():
        parts = k.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            prefix = ".".join(parts[:i]).replace("block_sparse_moe", "mlp")
            groups.setdefault(prefix, {}).setdefault(names[parts[i + 2]], {})[int(parts[i + 1])] = v
        else:
            out[k.replace("block_sparse_moe", "mlp")] = v
    for prefix, g in groups.items():
        E = len(g["gate"])
        gate = np.stack([g["gate"][e] for e in range(E)])
        up = np.stack([g["up"][e] for e in range(E)])
        out[f"{prefix}.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        out[f"{prefix}.experts.down_proj"] = np.stack([g["down"][e] for e in range(E)])
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
