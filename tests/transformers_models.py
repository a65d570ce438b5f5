"""Tiny random models of every supported family, built with transformers itself, and where their
MoE layer sits: what ``test_vs_transformers`` checks the project's layer against.

Each entry builds a 2-layer model small enough to run in a blink and names, for one MoE layer, the
module path of its block and of its router, plus what the decoder adds around the block (a shared
MLP held beside it, GraniteMoeShared). Weights are redrawn at the scale of a trained layer (an
initialiser's 0.02 std would route almost uniformly and hide the routing rules). ``case(name)`` is
one family's model saved with save_pretrained, read back by the project's reader and loader, and
its layer run by transformers: what tests/test_vs_transformers.py asserts on and
benchmarks/vs_transformers.py tabulates.
"""

from __future__ import annotations

import functools
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from moecap_kernels.checkpoint import load_layer
from moecap_kernels.hf_config import read_hf_config

COMMON = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True}
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


@dataclass(frozen=True)
class TinyFamily:
    build: Callable[[], torch.nn.Module]  # a random model (eval mode)
    block: str  # module path of the MoE block of layer ``layer``
    router: str  # module path of its router (its forward returns the chosen ids among its outputs)
    layer: int = 1
    shared_beside: str | None = None  # a shared MLP the decoder adds beside the block
    dense_compute: bool = False  # transformers runs every expert on every token (Llama 4)
    router_gives_logits: bool = False  # its router returns only logits: the choice is their top-k (DBRX)


def _model(config_name: str, model_name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**kwargs)
        return getattr(transformers, model_name)(config).eval()

    return build


def _qwen3_omni() -> torch.nn.Module:
    import transformers

    text = dict(**COMMON, intermediate_size=48, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                rope_parameters={**MROPE, "interleaved": True})  # fmt: skip
    audio = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16, d_model=16,
                 output_dim=32, downsample_hidden_size=8)  # fmt: skip
    config = transformers.Qwen3OmniMoeThinkerConfig(
        text_config=text, vision_config=dict(VISION, deepstack_visual_indexes=[0]), audio_config=audio
    )
    return transformers.Qwen3OmniMoeThinkerForConditionalGeneration(config).eval()


MLP = "model.layers.1.mlp"
SPARSE = "model.layers.1.block_sparse_moe"
QWEN_NEXT = dict(head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                 linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])  # fmt: skip

FAMILIES: dict[str, TinyFamily] = {
    "mixtral": TinyFamily(
        _model(
            "MixtralConfig",
            "MixtralForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        MLP,
        MLP + ".gate",
    ),
    "minimax": TinyFamily(
        _model(
            "MiniMaxConfig",
            "MiniMaxForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            block_size=16,
        ),
        MLP,
        MLP + ".gate",
    ),
    "qwen2_moe": TinyFamily(
        _model(
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
        ),
        MLP,
        MLP + ".gate",
    ),
    "qwen3_moe": TinyFamily(
        _model(
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=8,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
        MLP,
        MLP + ".gate",
    ),
    "qwen3_next": TinyFamily(
        _model(
            "Qwen3NextConfig",
            "Qwen3NextForCausalLM",
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            **QWEN_NEXT,
        ),
        MLP,
        MLP + ".gate",
    ),
    "qwen3_5_moe": TinyFamily(
        _model(
            "Qwen3_5MoeTextConfig",
            "Qwen3_5MoeForCausalLM",
            **COMMON,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            **QWEN_NEXT,
        ),
        MLP,
        MLP + ".gate",
    ),
    "qwen3_vl_moe": TinyFamily(
        _model(
            "Qwen3VLMoeConfig",
            "Qwen3VLMoeForConditionalGeneration",
            text_config=dict(
                **COMMON,
                intermediate_size=48,
                moe_intermediate_size=8,
                num_experts=6,
                num_experts_per_tok=2,
                rope_parameters=MROPE,
            ),
            vision_config=dict(VISION, deepstack_visual_indexes=[0]),
        ),
        "model.language_model.layers.1.mlp",
        "model.language_model.layers.1.mlp.gate",
    ),
    "qwen3_omni_moe": TinyFamily(
        _qwen3_omni, "model.language_model.layers.1.mlp", "model.language_model.layers.1.mlp.gate"
    ),
    "olmoe": TinyFamily(
        _model(
            "OlmoeConfig",
            "OlmoeForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_experts=6,
            num_experts_per_tok=2,
        ),
        MLP,
        MLP + ".gate",
    ),
    "flex_olmo": TinyFamily(
        _model(
            "FlexOlmoConfig",
            "FlexOlmoForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            pad_token_id=0,
        ),
        MLP,
        MLP + ".gate",
    ),
    "phimoe": TinyFamily(
        _model(
            "PhimoeConfig",
            "PhimoeForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_local_experts=6,
            num_experts_per_tok=2,
            router_jitter_noise=0.2,
        ),
        MLP,
        MLP + ".router",
    ),
    "deepseek_v2": TinyFamily(
        _model(
            "DeepseekV2Config",
            "DeepseekV2ForCausalLM",
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            routed_scaling_factor=1.5,
            first_k_dense_replace=1,
            n_shared_experts=2,
            **MLA,
        ),
        MLP,
        MLP + ".gate",
    ),
    "deepseek_v3": TinyFamily(
        _model(
            "DeepseekV3Config",
            "DeepseekV3ForCausalLM",
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            n_shared_experts=1,
            **MLA,
        ),
        MLP,
        MLP + ".gate",
    ),
    "glm4_moe": TinyFamily(
        _model(
            "Glm4MoeConfig",
            "Glm4MoeForCausalLM",
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            head_dim=8,
        ),
        MLP,
        MLP + ".gate",
    ),
    "dots1": TinyFamily(
        _model(
            "Dots1Config",
            "Dots1ForCausalLM",
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=2,
            head_dim=8,
        ),
        MLP,
        MLP + ".gate",
    ),
    "glm4_moe_lite": TinyFamily(
        _model(
            "Glm4MoeLiteConfig",
            "Glm4MoeLiteForCausalLM",
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        MLP,
        MLP + ".gate",
    ),
    "glm4v_moe": TinyFamily(
        _model(
            "Glm4vMoeConfig",
            "Glm4vMoeForConditionalGeneration",
            text_config=dict(
                vocab_size=128,
                hidden_size=32,
                intermediate_size=64,
                moe_intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                n_routed_experts=8,
                num_experts_per_tok=2,
                first_k_dense_replace=1,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [1, 1, 0],
                    "partial_rotary_factor": 0.5,
                },
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=32,
                patch_size=2,
                spatial_merge_size=1,
                temporal_patch_size=1,
            ),
        ),
        "model.language_model.layers.1.mlp",
        "model.language_model.layers.1.mlp.gate",
    ),
    "deepseek_v32": TinyFamily(
        _model(
            "DeepseekV32Config",
            "DeepseekV32ForCausalLM",
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            first_k_dense_replace=1,
            index_topk=4,
            index_head_dim=16,
            index_n_heads=2,
        ),
        MLP,
        MLP + ".gate",
    ),
    "kimi_linear": TinyFamily(
        _model(
            "KimiLinearConfig",
            "KimiLinearForCausalLM",
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_token=2,
            num_expert_group=2,
            topk_group=1,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            first_k_dense_replace=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            linear_attn_config={
                "head_dim": 8,
                "num_heads": 4,
                "short_conv_kernel_size": 4,
                "full_attn_layers": [2],
                "kda_layers": [1],
            },
        ),
        MLP,
        MLP + ".gate",
    ),
    "bailing_hybrid": TinyFamily(
        _model(
            "BailingHybridConfig",
            "BailingHybridForCausalLM",
            vocab_size=160,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_token=2,
            num_expert_group=2,
            topk_group=1,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            head_dim=8,
            first_k_dense_replace=1,
            layer_group_size=2,
            pad_token_id=0,
            eos_token_id=1,
        ),
        MLP,
        MLP + ".gate",
    ),
    "granitemoehybrid": TinyFamily(
        _model(
            "GraniteMoeHybridConfig",
            "GraniteMoeHybridForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_local_experts=6,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
            layer_types=["mamba", "attention"],
            mamba_n_heads=8,
            mamba_d_state=8,
            mamba_chunk_size=16,
        ),
        SPARSE,
        SPARSE + ".router",
        shared_beside="model.layers.1.shared_mlp",
    ),
    "dbrx": TinyFamily(
        _model(
            "DbrxConfig",
            "DbrxForCausalLM",
            n_layers=2,
            d_model=32,
            n_heads=4,
            vocab_size=64,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(
                ffn_hidden_size=16, moe_num_experts=6, moe_top_k=2, moe_normalize_expert_weights=2.0
            ),
        ),
        "transformer.blocks.1.ffn",
        "transformer.blocks.1.ffn.router",
        router_gives_logits=True,
    ),
    "gpt_oss": TinyFamily(
        _model(
            "GptOssConfig",
            "GptOssForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_local_experts=6,
            num_experts_per_tok=2,
            head_dim=8,
            swiglu_limit=1.0,
        ),
        MLP,
        MLP + ".router",
    ),
    "llama4": TinyFamily(
        _model(
            "Llama4TextConfig",
            "Llama4ForCausalLM",
            **COMMON,
            intermediate_size=16,
            intermediate_size_mlp=24,
            num_local_experts=4,
            num_experts_per_tok=1,
            head_dim=8,
            interleave_moe_layer_step=2,
        ),
        "model.layers.1.feed_forward",
        "model.layers.1.feed_forward.router",
        dense_compute=True,
    ),
    "granitemoe": TinyFamily(
        _model(
            "GraniteMoeConfig",
            "GraniteMoeForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_local_experts=6,
            num_experts_per_tok=2,
        ),
        SPARSE,
        SPARSE + ".router",
    ),
    "granitemoeshared": TinyFamily(
        _model(
            "GraniteMoeSharedConfig",
            "GraniteMoeSharedForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_local_experts=6,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
        ),
        SPARSE,
        SPARSE + ".router",
        shared_beside="model.layers.1.shared_mlp",
    ),
    "hunyuan_v1_moe": TinyFamily(
        _model(
            "HunYuanMoEV1Config",
            "HunYuanMoEV1ForCausalLM",
            **COMMON,
            intermediate_size=16,
            head_dim=8,
            num_experts=6,
            moe_topk=2,
        ),
        MLP,
        MLP + ".gate",
    ),
    "ernie4_5_moe": TinyFamily(
        _model(
            "Ernie4_5_MoeConfig",
            "Ernie4_5_MoeForCausalLM",
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            moe_num_experts=6,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
        ),
        MLP,
        MLP + ".gate",
    ),
    "jamba": TinyFamily(
        _model(
            "JambaConfig",
            "JambaForCausalLM",
            **COMMON,
            intermediate_size=16,
            num_experts=6,
            num_experts_per_tok=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
        ),
        "model.layers.1.feed_forward",
        "model.layers.1.feed_forward.router",
    ),
}


@torch.no_grad()
def redraw(module: torch.nn.Module, seed: int) -> None:
    """Every parameter and float buffer of ``module`` drawn anew: matrices N(0, 1/fan_in), vectors
    (biases, correction biases) N(0, 1/4); the initialiser's scale routes almost uniformly."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    for tensor in tensors:
        if tensor.dim() >= 2:
            fan_in = tensor.shape[-1] if tensor.shape[-1] > 1 else tensor.shape[-2]
            std = 1 / math.sqrt(fan_in)
        else:
            std = 0.5
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)


TOKENS = 13  # tokens of the input each family's layer is compared on


class Case:
    """One family's tiny model, saved and read back, and its MoE layer run by transformers."""

    def __init__(self, name: str, family: TinyFamily, folder: Path) -> None:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = family.build()
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation("eager")  # the per-expert loop: FLOP counters see its GEMMs
        self.block = model.get_submodule(family.block)
        redraw(self.block, seed=1)
        self.shared = model.get_submodule(family.shared_beside) if family.shared_beside else None
        if self.shared is not None:
            redraw(self.shared, seed=2)
        model.save_pretrained(folder)
        self.folder, self.family, self.model = folder, family, model
        self.spec, self.origins = read_hf_config(folder, dtype="float32")
        self.weights = load_layer(folder, self.spec, family.layer)
        self.x = torch.randn(TOKENS, self.spec.hidden_size, generator=torch.Generator().manual_seed(5))
        self.hf_out, self.hf_ids, self.hf_flops = self._transformers()

    def _transformers(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        captured: list = []
        router = self.model.get_submodule(self.family.router)
        hook = router.register_forward_hook(lambda module, args, out: captured.append(out))
        # with autograd on: FlopCounterMode's module tracker hooks the outputs' gradient functions
        with FlopCounterMode(display=False) as flops:
            out = self.block(self.x[None])
            out = (out[0] if isinstance(out, tuple) else out).reshape(TOKENS, -1)
            if self.shared is not None:
                out = out + self.shared(self.x[None]).reshape(TOKENS, -1)
        hook.remove()
        return out.detach().double(), self.chosen(captured[0], TOKENS), flops.get_total_flops()

    def chosen(self, outputs: object, tokens: int) -> torch.Tensor:
        """The experts transformers' router chose, [T, k], from whatever its router returns."""
        k = self.spec.top_k
        tensors = [
            t for t in (outputs if isinstance(outputs, tuple) else (outputs,)) if isinstance(t, torch.Tensor)
        ]
        tensors = [t.detach() for t in tensors]
        for t in tensors:
            if t.dtype == torch.int64 and t.shape == (tokens, k):
                return t
        for t in tensors:  # Llama 4: scores [T, E], zero where not chosen
            if (
                t.is_floating_point()
                and t.shape == (tokens, self.spec.num_experts)
                and ((t != 0).sum(-1) == k).all()
            ):
                return (t != 0).nonzero()[:, 1].view(tokens, k)
        assert self.family.router_gives_logits, "the router's outputs hold no choice of experts"
        return tensors[0].topk(k, dim=-1).indices  # DBRX: softmax then top-k, the top-k of its logits


@functools.cache
def case(name: str) -> Case:
    """The family's case, made once per process (saved under a fresh temporary folder)."""
    return Case(name, FAMILIES[name], Path(tempfile.mkdtemp(prefix=f"moecap-hf-{name}-")))
