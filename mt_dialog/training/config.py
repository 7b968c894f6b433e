"""Training configuration: one dataclass per concern, each field a Megatron-style flag.

``ModelConfig`` (--num-layers ...), ``ParallelConfig`` (--tensor-model-parallel-size ...),
``DataConfig`` (--data-path, --micro-batch-size, --global-batch-size ...), ``OptimConfig``
(--lr, --min-lr, --lr-decay-style ...), ``TrainConfig`` (--train-iters, --save, --load ...).
Each validates its own fields in ``__post_init__``; ``validate_world`` checks the combination
against the world size before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from mt_dialog.config_utils import check_choice, option
from mt_dialog.data.storage import REPLY_LENGTH_EDGES
from mt_dialog.training.loss import NORMALIZATIONS


RECOMPUTE_GRANULARITIES = ("full", "selective")
# --moe-router-load-balancing-type values mt_dialog gives a defined scale under its per-turn loss
MOE_LOAD_BALANCING = ("aux_loss", "none")
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_DISPATCHERS = ("allgather", "alltoall")
RECOMPUTE_METHODS = ("uniform", "block")
SOFTMAX_TYPES = ("vanilla", "off-by-one", "learnable")
MLA_ROPE_TYPES = ("rope", "yarn")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
              "rope_type")
YARN_FIELDS = ("rotary_scaling_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
               "original_max_position_embeddings")
POSITION_EMBEDDINGS = ("rope", "yarn")


def _positive(name: str, value: Optional[float], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")


@dataclass
class ModelConfig:
    """Llama-style GPT (RMSNorm, SwiGLU, RoPE, grouped-query attention) on megatron-core.
    The block features below the MoE fields turn it into Gemma 3's, gpt-oss's or GLM-4.5's block
    (``training/block.py``).

    ``ffn_hidden_size``, ``num_query_groups`` and ``kv_channels`` left None are derived in
    ``__post_init__`` (as megatron-core's ``TransformerConfig`` does), so every reader sees the
    sizes the model has; a saved config with null there (older checkpoints) loads the same way.
    """

    num_layers: int = option(2, help="transformer layers")
    hidden_size: int = option(64, help="hidden size")
    ffn_hidden_size: Optional[int] = option(None, help="SwiGLU inner size (default: the Llama "
                                            "rule, 8/3 x hidden rounded up to a multiple of 64)")
    num_attention_heads: int = option(4, help="attention heads")
    num_query_groups: Optional[int] = option(None, help="key/value groups for grouped-query "
                                             "attention (default: one per head)")
    kv_channels: Optional[int] = option(None, help="attention head size (default: hidden size "
                                        "/ attention heads)")
    rotary_base: float = option(10000.0, help="RoPE base")
    use_rope_scaling: bool = option(False, help="Llama 3.1-style RoPE frequency scaling "
                                    "(--rope-scaling-* below)")
    rope_scaling_factor: float = option(8.0, help="with --use-rope-scaling: divide the low "
                                        "frequencies by this")
    rope_scaling_low_freq_factor: float = option(1.0, help="with --use-rope-scaling: "
                                                 "wavelengths above original / this are scaled")
    rope_scaling_high_freq_factor: float = option(4.0, help="with --use-rope-scaling: "
                                                  "wavelengths below original / this are kept")
    rope_scaling_original_max_position: int = option(8192, help="with --use-rope-scaling: "
                                                     "the context length of pretraining")
    rotary_seq_len_interpolation_factor: Optional[float] = option(
        None, help="linear RoPE position interpolation: positions are divided by this")
    norm_epsilon: float = option(1e-5, help="RMSNorm epsilon")
    untie_embeddings_and_output_weights: bool = option(False, help="separate output layer "
                                                       "instead of the input embedding")
    add_qkv_bias: bool = option(False, help="bias on the QKV projection (Qwen2)")
    qk_layernorm: bool = option(False, help="RMSNorm on each query and key head (weights of "
                                "the head size, shared by all heads; Qwen3), before RoPE")
    init_method_std: float = option(0.02, help="std of the normal weight initialization")
    make_vocab_size_divisible_by: int = option(128, help="pad the vocabulary to a multiple of "
                                               "this times the tensor-parallel size")
    transformer_impl: str = option("auto", choices=("auto", "local", "transformer_engine"),
                                   help="layer implementation: transformer_engine (CUDA + TE), "
                                   "local (megatron-core's torch layers), auto picks TE when usable")
    packed_attention: str = option("isolated", choices=("isolated", "causal"),
                                   help="isolated: conversations in a pack never attend to each "
                                   "other and positions restart; causal: one causal mask over "
                                   "the pack (for comparison)")
    recompute_activations: bool = option(False, help="recompute attention in backward "
                                         "(selective) to save memory; Megatron-LM's alias of "
                                         "--recompute-granularity selective")
    recompute_granularity: Optional[str] = option(
        None, choices=RECOMPUTE_GRANULARITIES, help="activation recompute: full (whole "
        "transformer layers, see --recompute-method) or selective (core attention only)")
    recompute_method: Optional[str] = option(
        None, choices=RECOMPUTE_METHODS, help="with --recompute-granularity full: uniform "
        "recomputes every layer, --recompute-num-layers at a time; block recomputes only the "
        "first --recompute-num-layers layers of each pipeline stage (default: uniform)")
    recompute_num_layers: Optional[int] = option(
        None, help="with --recompute-granularity full: layers per recompute chunk (uniform) or "
        "recomputed layers per pipeline stage (block) (default: 1)")
    num_experts: Optional[int] = option(None, help="Mixture of Experts: experts per layer (every "
                                        "layer's MLP becomes a routed MoE layer; default: dense)")
    moe_router_topk: int = option(2, help="with --num-experts: experts each token is routed to")
    moe_ffn_hidden_size: Optional[int] = option(None, help="with --num-experts: SwiGLU inner "
                                                "size of each expert (default: --ffn-hidden-size)")
    moe_router_load_balancing_type: str = option(
        "aux_loss", choices=MOE_LOAD_BALANCING, help="with --num-experts: aux_loss adds the "
        "Switch-Transformer load-balancing loss times --moe-aux-loss-coeff (docs/moe.md, 'Mixture "
        "of Experts', for its scale under the per-turn loss); none: no balancing loss")
    moe_aux_loss_coeff: float = option(0.0, help="with --num-experts: weight of the "
                                       "load-balancing loss (0: off, the loss is the dialogue "
                                       "loss alone)")
    moe_router_score_function: str = option(
        "softmax", choices=MOE_SCORE_FUNCTIONS, help="with --num-experts: router scores of the "
        "expert logits")
    moe_router_pre_softmax: bool = option(
        False, help="with --num-experts: softmax over all experts, then the top k keep their "
        "scores (Qwen3-MoE with norm_topk_prob false); default: softmax over the top k only "
        "(Mixtral; Qwen3-MoE with norm_topk_prob true)")
    moe_token_dispatcher_type: str = option(
        "allgather", choices=MOE_DISPATCHERS, help="with --num-experts: how tokens reach experts "
        "on other expert-parallel ranks (alltoall: the usual choice at EP > 1 on GPUs)")
    # --- attention variants: sliding windows, attention sinks, multi-latent attention (MLA) ---
    window_size: Optional[List[int]] = option(
        None, nargs=2, metavar="N", help="sliding-window attention: LEFT RIGHT, a query sees "
        "itself and the LEFT tokens before it (RIGHT must be 0: causal); HF's sliding_window W is "
        "--window-size W-1 0 (default: full attention)")
    window_attn_skip_freq: Optional[List[int]] = option(
        None, help="with --window-size: one value N makes every N-th layer full attention "
        "(gpt-oss: 2, Gemma 3: 6); one 0/1 value per layer says which layers are windowed (1) "
        "(default: every layer windowed)")
    softmax_type: str = option(
        "vanilla", choices=SOFTMAX_TYPES, help="attention softmax: learnable adds one trained "
        "sink logit per head to each softmax denominator (gpt-oss's sinks, saved as "
        "self_attention.core_attention.softmax_offset); off-by-one a fixed sink logit 0")
    multi_latent_attention: bool = option(False, help="multi-latent attention (DeepSeek-V3, "
                                          "Kimi K2): low-rank query and key/value projections; "
                                          "--qk-layernorm gives the latent RMSNorms")
    q_lora_rank: Optional[int] = option(None, help="with --multi-latent-attention: rank of the "
                                        "query down-projection (default: none, a full query "
                                        "projection as in the Lite models)")
    kv_lora_rank: int = option(512, help="with --multi-latent-attention: rank of the key/value "
                               "down-projection")
    qk_head_dim: int = option(128, help="with --multi-latent-attention: query/key head size "
                              "without RoPE (HF qk_nope_head_dim)")
    qk_pos_emb_head_dim: int = option(64, help="with --multi-latent-attention: query/key head "
                                      "size with RoPE (HF qk_rope_head_dim)")
    v_head_dim: int = option(128, help="with --multi-latent-attention: value head size")
    rope_type: str = option("rope", choices=MLA_ROPE_TYPES, help="with "
                            "--multi-latent-attention: rope, or yarn (--rotary-scaling-factor, "
                            "--mscale, --mscale-all-dim, --beta-fast, --beta-slow, "
                            "--original-max-position-embeddings)")
    rotary_scaling_factor: float = option(1.0, help="with --rope-type yarn: context extension "
                                          "factor (HF rope_scaling factor)")
    mscale: float = option(1.0, help="with --rope-type yarn: YaRN mscale")
    mscale_all_dim: float = option(0.0, help="with --rope-type yarn: YaRN mscale_all_dim (the "
                                   "softmax scale is multiplied by mscale(factor, this)^2)")
    beta_fast: float = option(32.0, help="with --rope-type yarn: YaRN beta_fast")
    beta_slow: float = option(1.0, help="with --rope-type yarn: YaRN beta_slow")
    original_max_position_embeddings: int = option(4096, help="with --rope-type yarn: the "
                                                   "context length before extension")

    # --- MoE routing of the 2026 families (DeepSeek-V3 / Kimi K2, GLM-4.5, gpt-oss): shared
    # experts, sigmoid scores with an expert bias, group-limited routing, dense layers between
    # MoE layers, linear biases (see _check_moe_routing, moe_routing_settings) ---
    moe_shared_expert_intermediate_size: Optional[int] = option(
        None, help="with --num-experts: inner size of the shared expert every token also goes "
        "through (SwiGLU, no gate; n shared experts of size f: n x f), added to the routed "
        "experts' output (DeepSeek-V3, GLM-4.5: moe_intermediate_size x n_shared_experts)")
    moe_shared_expert_gate: bool = option(
        False, help="with --moe-shared-expert-intermediate-size: the shared expert's output "
        "times sigmoid(x . w) of a learned vector w (Qwen2-MoE's shared_expert_gate), saved as "
        "mlp.shared_experts.gate_weight")
    moe_router_enable_expert_bias: bool = option(
        False, help="with --moe-router-score-function sigmoid: a per-expert bias added to the "
        "scores for choosing the experts only (not to the weights): DeepSeek-V3's "
        "e_score_correction_bias, saved as mlp.router.expert_bias; never trained by the "
        "optimizer (see --moe-router-bias-update-rate)")
    moe_router_bias_update_rate: float = option(
        0.0, help="with --moe-router-enable-expert-bias: after each step, every expert's bias "
        "moves by this towards balance (+rate below the mean load, -rate above; megatron-core's "
        "aux-loss-free balancing, from the step's token counts). 0 keeps the bias as loaded "
        "(the fine-tuning default, see docs/moe.md); Megatron-LM's pretraining default is 1e-3")
    moe_router_num_groups: Optional[int] = option(
        None, help="with --num-experts: group-limited routing: experts in this many equal "
        "groups (DeepSeek-V3's n_group); needs --moe-router-group-topk")
    moe_router_group_topk: Optional[int] = option(
        None, help="with --moe-router-num-groups: groups each token may use, chosen by the sum "
        "of their top (topk / group-topk) scores (DeepSeek-V3's topk_group)")
    moe_router_topk_scaling_factor: Optional[float] = option(
        None, help="with --num-experts: the chosen experts' weights are multiplied by this, "
        "after the sigmoid weights are renormalized over the top k (DeepSeek-V3's "
        "routed_scaling_factor)")
    moe_layer_freq: Union[str, int, List[int]] = option(
        1, metavar="N|PATTERN", help="with --num-experts: which layers are MoE layers: N (every "
        "N-th layer from the first) or a 0/1 list of one entry per layer as Megatron-LM writes it, "
        "e.g. '([0]*3+[1]*58)' (dense layers: --ffn-hidden-size; experts: --moe-ffn-hidden-size)")
    add_bias_linear: bool = option(
        False, help="biases on every linear layer of megatron-core (attention QKV and output, "
        "dense MLP, each expert's fc1/fc2, shared experts, the router): gpt-oss")

    # --- block features: Gemma 3 norms / GeGLU / embedding scale, gpt-oss clamped SwiGLU,
    # --- partial RoPE, YaRN (checked by _check_block, passed on by block_settings)
    apply_layernorm_1p: bool = option(False, help="zero-centered RMSNorm weights: every norm "
                                      "computes x_hat * (1 + w), w starting at 0 (Gemma 3)")
    sandwich_norm: bool = option(False, help="an RMSNorm on the attention output and one on the "
                                 "MLP output, before each residual add (Gemma 3's "
                                 "post_attention_layernorm / post_feedforward_layernorm)")
    scale_embeddings: bool = option(False, help="multiply the input embeddings by sqrt(hidden "
                                    "size), in the embedding dtype (Gemma 3)")
    openai_gelu: bool = option(False, help="GeGLU with the tanh-approximated GELU "
                               "(gelu_pytorch_tanh, Gemma 3) instead of SwiGLU")
    quick_geglu: bool = option(False, help="gate * sigmoid(1.702 * gate) instead of SwiGLU's "
                               "SiLU (gpt-oss; with --glu-linear-offset 1 and "
                               "--activation-func-clamp-value 7)")
    glu_linear_offset: float = option(0.0, help="with --quick-geglu: the MLP computes "
                                      "act(gate) * (up + offset) (gpt-oss: 1)")
    activation_func_clamp_value: Optional[float] = option(
        None, help="with --quick-geglu: clamp the gate to <= value and the linear part to "
        "[-value, value] (gpt-oss swiglu_limit: 7)")
    softmax_scale: Optional[float] = option(None, help="attention softmax scale (default: "
                                            "1/sqrt(head size); Gemma 3: "
                                            "query_pre_attn_scalar ** -0.5)")
    rotary_percent: float = option(1.0, help="fraction of each head's dimensions RoPE rotates "
                                   "(the first ones, rotate-half inside them; GLM-4.5: 0.5)")
    rotary_base_local: Optional[float] = option(
        None, help="RoPE base of the sliding-window layers (Gemma 3 rope_local_base_freq); "
        "the other layers use --rotary-base (and its scaling)")
    position_embedding_type: str = option("rope", choices=POSITION_EMBEDDINGS,
                                          help="rope, or yarn (YaRN-scaled RoPE, gpt-oss: "
                                          "--yarn-* below)")
    yarn_rotary_scaling_factor: Optional[float] = option(
        None, help="with --position-embedding-type yarn: the context extension factor")
    yarn_original_max_position_embeddings: Optional[int] = option(
        None, help="with --position-embedding-type yarn: the pretraining context length")
    yarn_beta_fast: float = option(32.0, help="with --position-embedding-type yarn: beta_fast")
    yarn_beta_slow: float = option(1.0, help="with --position-embedding-type yarn: beta_slow")
    yarn_mscale: Optional[float] = option(None, help="with --position-embedding-type yarn: "
                                          "mscale (default: cos/sin times 0.1 ln(factor) + 1)")
    yarn_mscale_all_dim: Optional[float] = option(
        None, help="with --position-embedding-type yarn: mscale_all_dim (with --yarn-mscale)")
    yarn_correction_range_round_to_int: bool = option(
        True, help="with --position-embedding-type yarn: round the correction range to "
        "integers (HF truncate; gpt-oss: false)")
    final_logit_softcapping: Optional[float] = option(
        None, help="logits become cap * tanh(logits / cap)")

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "rotary_base",
                     "norm_epsilon", "init_method_std", "make_vocab_size_divisible_by",
                     "rope_scaling_factor", "rope_scaling_low_freq_factor",
                     "rope_scaling_original_max_position"):
            _positive(name, getattr(self, name))
        for name in ("ffn_hidden_size", "kv_channels", "rotary_seq_len_interpolation_factor"):
            _positive(name, getattr(self, name), allow_none=True)
        if self.rope_scaling_high_freq_factor <= self.rope_scaling_low_freq_factor:
            raise ValueError(f"rope_scaling_high_freq_factor: {self.rope_scaling_high_freq_factor}"
                             f" must exceed rope_scaling_low_freq_factor "
                             f"{self.rope_scaling_low_freq_factor}")
        if self.use_rope_scaling and self.rotary_seq_len_interpolation_factor:
            raise ValueError("rotary_seq_len_interpolation_factor: give either it (linear "
                             "scaling) or --use-rope-scaling (Llama 3.1 scaling), not both")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        self._derive_sizes()
        groups = self.num_query_groups
        if groups <= 0 or self.num_attention_heads % groups:
            raise ValueError(f"num_query_groups: {groups} must divide num_attention_heads "
                             f"{self.num_attention_heads}")
        self._check_recompute()
        self._check_moe_routing()
        self._check_moe()
        self._check_attention()
        self._check_block()

    def _check_moe(self) -> None:
        """MoE fields: experts > 1, 1 <= top-k <= experts, the choices; none given without
        --num-experts (a silently ignored flag would train a dense model)."""
        for name, choices in (("moe_router_load_balancing_type", MOE_LOAD_BALANCING),
                              ("moe_router_score_function", MOE_SCORE_FUNCTIONS),
                              ("moe_token_dispatcher_type", MOE_DISPATCHERS)):
            check_choice(name, getattr(self, name), choices)
        if self.moe_aux_loss_coeff < 0:
            raise ValueError(f"moe_aux_loss_coeff: must be >= 0, got {self.moe_aux_loss_coeff}")
        if self.num_experts is None:
            defaults = {f.name: f.default for f in fields(self) if f.name.startswith("moe_")}
            changed = [n for n, d in defaults.items() if getattr(self, n) != d]
            if changed:
                raise ValueError(f"{changed[0]}: --{changed[0].replace('_', '-')} needs "
                                 "--num-experts N (a Mixture-of-Experts model); add it or drop "
                                 "the flag")
            return
        if self.num_experts < 2:
            raise ValueError(f"num_experts: {self.num_experts} must be at least 2 (leave "
                             "--num-experts out for a dense model)")
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ValueError(f"moe_router_topk: {self.moe_router_topk} must be between 1 and "
                             f"--num-experts {self.num_experts}")
        _positive("moe_ffn_hidden_size", self.moe_ffn_hidden_size, allow_none=True)
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size

    def moe_settings(self) -> Dict[str, Any]:
        """megatron-core ``TransformerConfig`` fields of the MoE layers (empty when dense); the
        router computes in fp32 whatever the parameters' dtype."""
        if self.num_experts is None:
            return {}
        balancing = self.moe_router_load_balancing_type
        return {"num_moe_experts": self.num_experts, "moe_router_topk": self.moe_router_topk,
                "moe_ffn_hidden_size": self.moe_ffn_hidden_size,
                "moe_router_load_balancing_type": balancing,
                "moe_aux_loss_coeff": self.moe_aux_loss_coeff if balancing != "none" else 0.0,
                "moe_router_score_function": self.moe_router_score_function,
                "moe_router_pre_softmax": self.moe_router_pre_softmax,
                "moe_token_dispatcher_type": self.moe_token_dispatcher_type,
                "moe_router_dtype": "fp32"}

    def _check_attention(self) -> None:
        """Window (two values >= 0, right 0), skip frequency (N >= 1 or a 0/1 list of
        --num-layers), softmax type, MLA sizes; no MLA / YaRN field given without its switch."""
        check_choice("softmax_type", self.softmax_type, SOFTMAX_TYPES)
        check_choice("rope_type", self.rope_type, MLA_ROPE_TYPES)
        self._check_window()
        defaults = {f.name: f.default for f in fields(self)}
        if not self.multi_latent_attention:
            changed = [n for n in MLA_FIELDS + YARN_FIELDS if getattr(self, n) != defaults[n]]
            if changed:
                raise ValueError(f"{changed[0]}: --{changed[0].replace('_', '-')} needs "
                                 "--multi-latent-attention; add it or drop the flag")
            return
        if self.rope_type != "yarn":
            changed = [n for n in YARN_FIELDS if getattr(self, n) != defaults[n]]
            if changed:
                raise ValueError(f"{changed[0]}: --{changed[0].replace('_', '-')} needs "
                                 "--rope-type yarn; add it or drop the flag")
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
                     "rotary_scaling_factor", "original_max_position_embeddings"):
            _positive(name, getattr(self, name))
        _positive("q_lora_rank", self.q_lora_rank, allow_none=True)
        if self.qk_pos_emb_head_dim % 2:
            raise ValueError(f"qk_pos_emb_head_dim: {self.qk_pos_emb_head_dim} must be even "
                             "(RoPE rotates pairs)")
        if self.rotary_seq_len_interpolation_factor or self.use_rope_scaling:
            raise ValueError("multi_latent_attention: MLA has its own RoPE (--rope-type rope or "
                             "yarn); drop --use-rope-scaling / --rotary-seq-len-interpolation-"
                             "factor")
        if self.num_query_groups != self.num_attention_heads or self.add_qkv_bias:
            raise ValueError("multi_latent_attention: MLA gives every head its own key and value "
                             "(from the shared latent) and has no linear_qkv; drop "
                             "--num-query-groups / --add-qkv-bias")

    def _check_window(self) -> None:
        window, freq = self.window_size, self.window_attn_skip_freq
        if window is None:
            if freq is not None:
                raise ValueError("window_attn_skip_freq: --window-attn-skip-freq needs "
                                 "--window-size LEFT 0; add it or drop the flag")
            return
        if len(window) != 2 or window[0] < 0 or window[1] != 0:
            raise ValueError(f"window_size: {list(window)} must be LEFT 0 with LEFT >= 0 (a "
                             "causal window: a query sees itself and LEFT tokens before it; "
                             "HF sliding_window W is --window-size W-1 0)")
        if freq is None:
            return
        if len(freq) == 1 and freq[0] < 1:
            raise ValueError(f"window_attn_skip_freq: {freq[0]} must be >= 1 (every N-th layer "
                             "full), or give one 0/1 value per layer")
        if len(freq) > 1 and (len(freq) != self.num_layers or set(freq) - {0, 1}):
            raise ValueError(f"window_attn_skip_freq: {freq} must be one 0/1 value per layer "
                             f"({self.num_layers} for --num-layers {self.num_layers}; 1 = "
                             "windowed), or one value N (every N-th layer full)")

    def attention_settings(self) -> Dict[str, Any]:
        """megatron-core ``TransformerConfig`` (``MLATransformerConfig`` with MLA) fields of the
        attention variants: ``window_size`` (tuple), ``window_attn_skip_freq`` (int or list),
        ``softmax_type``, and with MLA ``multi_latent_attention`` and its sizes / RoPE."""
        settings: Dict[str, Any] = {"softmax_type": self.softmax_type}
        if self.window_size is not None:
            freq = self.window_attn_skip_freq
            settings["window_size"] = tuple(self.window_size)
            settings["window_attn_skip_freq"] = (None if freq is None else
                                                 freq[0] if len(freq) == 1 else list(freq))
        if self.multi_latent_attention:
            settings.update({name: getattr(self, name) for name in
                             ("multi_latent_attention",) + MLA_FIELDS + YARN_FIELDS})
            settings["rotary_base"] = self.rotary_base
        return settings
    def _check_moe_routing(self) -> None:
        """The routing fields of the 2026 families: ``moe_layer_freq`` parsed (a command-line
        string) and normalized (a pattern of all 1s is 1, so that checkpoints keep the stacked
        layer keys); each refused without the flag it needs, with a value megatron-core would
        assert on or route wrongly with (group routing needs ``topk >= group_topk``: it ranks
        groups by their top ``topk // group_topk`` scores)."""
        self.moe_layer_freq = _moe_layer_freq(self.moe_layer_freq, self.num_layers)
        if self.num_experts is None:
            return  # _check_moe refuses any moe_* flag given without --num-experts
        _positive("moe_shared_expert_intermediate_size",
                  self.moe_shared_expert_intermediate_size, allow_none=True)
        _positive("moe_router_topk_scaling_factor", self.moe_router_topk_scaling_factor,
                  allow_none=True)
        if self.moe_shared_expert_gate and not self.moe_shared_expert_intermediate_size:
            raise ValueError("moe_shared_expert_gate: gates the shared expert; add "
                             "--moe-shared-expert-intermediate-size S or drop the flag")
        if self.add_bias_linear and self.moe_shared_expert_intermediate_size:
            raise ValueError("moe_shared_expert_intermediate_size: megatron-core 0.16.1's shared "
                             "expert has no biases; drop --add-bias-linear or the shared expert")
        if self.moe_router_pre_softmax and self.moe_router_score_function == "sigmoid":
            raise ValueError("moe_router_pre_softmax: applies to softmax scores; sigmoid scores "
                             "are always taken per expert: drop the flag")
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ValueError("moe_router_enable_expert_bias: the expert bias corrects sigmoid "
                             "scores; add --moe-router-score-function sigmoid or drop the flag")
        rate = self.moe_router_bias_update_rate
        if rate < 0 or (rate > 0 and not self.moe_router_enable_expert_bias):
            raise ValueError(f"moe_router_bias_update_rate: {rate} must be >= 0 and needs "
                             "--moe-router-enable-expert-bias (the bias it updates)")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            raise ValueError("moe_router_group_topk: group-limited routing needs both "
                             "--moe-router-num-groups and --moe-router-group-topk")
        if groups is not None:
            if groups < 1 or self.num_experts % groups:
                raise ValueError(f"moe_router_num_groups: {groups} must divide --num-experts "
                                 f"{self.num_experts}")
            if not 1 <= group_topk <= min(groups, self.moe_router_topk):
                raise ValueError(
                    f"moe_router_group_topk: {group_topk} must be between 1 and the smaller of "
                    f"--moe-router-num-groups {groups} and --moe-router-topk "
                    f"{self.moe_router_topk} (groups are ranked by their top topk / group-topk "
                    "scores)")
            if self.moe_router_topk > group_topk * (self.num_experts // groups):
                raise ValueError(
                    f"moe_router_topk: {self.moe_router_topk} experts cannot be chosen from "
                    f"{group_topk} groups of {self.num_experts // groups}; raise "
                    "--moe-router-group-topk")

    def moe_routing_settings(self) -> Dict[str, Any]:
        """megatron-core ``TransformerConfig`` fields of ``_check_moe_routing``'s flags:
        ``add_bias_linear`` always; on a MoE model also the shared expert, expert bias, group
        routing, scaling factor and ``moe_layer_freq`` (int or 0/1 list)."""
        if self.num_experts is None:
            return {"add_bias_linear": self.add_bias_linear}
        return {"add_bias_linear": self.add_bias_linear,
                "moe_shared_expert_intermediate_size": self.moe_shared_expert_intermediate_size,
                "moe_shared_expert_gate": self.moe_shared_expert_gate,
                "moe_router_enable_expert_bias": self.moe_router_enable_expert_bias,
                "moe_router_bias_update_rate": self.moe_router_bias_update_rate,
                "moe_router_num_groups": self.moe_router_num_groups,
                "moe_router_group_topk": self.moe_router_group_topk,
                "moe_router_topk_scaling_factor": self.moe_router_topk_scaling_factor,
                "moe_layer_freq": self.moe_layer_freq}

    def moe_layer_pattern(self) -> Optional[List[int]]:
        """1 (MoE) or 0 (dense MLP) per layer when the layers differ; None when every layer is
        alike (a dense model, or MoE in every layer)."""
        freq = self.moe_layer_freq
        if self.num_experts is None or freq == 1:
            return None
        if isinstance(freq, int):
            return [int(i % freq == 0) for i in range(self.num_layers)]
        return list(freq)
    def _check_block(self) -> None:
        """Block-feature fields: positive sizes, one gate activation, the clamp / offset only with
        --quick-geglu, an even rotated part, YaRN's fields with yarn only (and its own)."""
        for name in ("softmax_scale", "rotary_base_local", "activation_func_clamp_value",
                     "final_logit_softcapping", "yarn_rotary_scaling_factor",
                     "yarn_original_max_position_embeddings"):
            _positive(name, getattr(self, name), allow_none=True)
        check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
        if self.openai_gelu and self.quick_geglu:
            raise ValueError("quick_geglu: --quick-geglu and --openai-gelu are two gate "
                             "activations; pick one")
        for name, default in (("glu_linear_offset", 0.0), ("activation_func_clamp_value", None)):
            if getattr(self, name) != default and not self.quick_geglu:
                raise ValueError(f"{name}: --{name.replace('_', '-')} applies to --quick-geglu "
                                 "(gpt-oss's activation) only; add --quick-geglu or drop it")
        rotated = self.kv_channels * self.rotary_percent
        if not 0 < self.rotary_percent <= 1 or rotated != int(rotated) or int(rotated) % 2:
            raise ValueError(f"rotary_percent: {self.rotary_percent} must be in (0, 1] and rotate "
                             f"an even number of the {self.kv_channels} head dimensions")
        yarn_names = [f.name for f in fields(self) if f.name.startswith("yarn_")]
        if self.position_embedding_type != "yarn":
            changed = [n for n in yarn_names
                       if getattr(self, n) != self.__dataclass_fields__[n].default]
            if changed:
                raise ValueError(f"{changed[0]}: --{changed[0].replace('_', '-')} needs "
                                 "--position-embedding-type yarn; add it or drop the flag")
            return
        self._check_yarn()

    def _check_yarn(self) -> None:
        """YaRN: its two sizes given, no other RoPE scaling; --yarn-mscale and
        --yarn-mscale-all-dim both or neither (HF uses them only when both are non-zero,
        megatron-core whenever both are set: with one of them the two would differ)."""
        given = [n for n in ("yarn_mscale", "yarn_mscale_all_dim") if getattr(self, n)]
        if len(given) == 1:
            raise ValueError(f"{given[0]}: --yarn-mscale and --yarn-mscale-all-dim go together "
                             "(HF: mscale and mscale_all_dim, both non-zero); give both or "
                             "neither (neither: cos/sin times 0.1 ln(factor) + 1)")
        for name in ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings"):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: needed by --position-embedding-type yarn (HF "
                                 "rope_parameters: factor and original_max_position_embeddings; "
                                 "gpt-oss: 32 and 4096)")
        others = {"use_rope_scaling": self.use_rope_scaling,
                  "rotary_seq_len_interpolation_factor": self.rotary_seq_len_interpolation_factor,
                  "rotary_base_local": self.rotary_base_local,
                  "rotary_percent": self.rotary_percent != 1.0}
        for name, given in others.items():
            if given:
                raise ValueError(f"{name}: --{name.replace('_', '-')} does not combine with "
                                 "--position-embedding-type yarn (megatron-core's YaRN "
                                 "embedding scales the whole head with one base); drop one")

    def block_settings(self, te: bool) -> Dict[str, Any]:
        """megatron-core ``TransformerConfig`` fields of the block features: norm gamma, gate
        activation (SiLU, tanh GELU or quick GELU with offset and clamp), softmax scale, and the
        kernel fusions that fit them on the Transformer Engine path (``te``): megatron-core
        0.16.1's dense MLP fuses only SwiGLU and GeGLU-by-``F.gelu`` (tanh when fused, exact
        unfused) and refuses quick GELU, and its fused THD RoPE drops YaRN's cos/sin factor, so
        these run unfused (same formulas on both paths); MLA with plain RoPE has no fused
        kernel."""
        import torch.nn.functional as F
        from megatron.core.fusions.fused_bias_geglu import quick_gelu

        from mt_dialog.training.block import gelu_tanh

        activation = gelu_tanh if self.openai_gelu else quick_gelu if self.quick_geglu else F.silu
        return {"layernorm_zero_centered_gamma": self.apply_layernorm_1p,
                "activation_func": activation,
                "bias_activation_fusion": te and activation is F.silu,
                # megatron-core fuses MLA's RoPE for MLA's YaRN only
                "apply_rope_fusion": te and self.position_embedding_type != "yarn" and (
                    not self.multi_latent_attention or self.rope_type == "yarn"),
                "glu_linear_offset": self.glu_linear_offset,
                "activation_func_clamp_value": self.activation_func_clamp_value,
                "softmax_scale": self.softmax_scale}

    def _derive_sizes(self) -> None:
        """Fill the sizes left None: the Llama rule for the SwiGLU inner size (8/3 x hidden,
        rounded up to a multiple of 64), one key/value group per head, hidden / heads."""
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = -(-int(8 * self.hidden_size / 3) // 64) * 64
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads

    def _check_recompute(self) -> None:
        _positive("recompute_num_layers", self.recompute_num_layers, allow_none=True)
        for name, choices in (("recompute_granularity", RECOMPUTE_GRANULARITIES),
                              ("recompute_method", RECOMPUTE_METHODS)):
            if getattr(self, name) is not None:
                check_choice(name, getattr(self, name), choices)
        if self.recompute_activations and self.recompute_granularity == "full":
            raise ValueError("recompute_activations: --recompute-activations means "
                             "--recompute-granularity selective; drop one of the two")
        if self.recompute_granularity != "full":
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: --{name.replace('_', '-')} applies to "
                                     "--recompute-granularity full only; add it or drop the flag")

    def recompute_settings(self) -> Dict[str, Any]:
        """megatron-core ``TransformerConfig`` fields of activation recompute:
        ``recompute_granularity`` (None, "selective" or "full"), ``recompute_method`` and
        ``recompute_num_layers`` (full only: default uniform, 1 layer at a time)."""
        if self.recompute_granularity == "full":
            return {"recompute_granularity": "full",
                    "recompute_method": self.recompute_method or "uniform",
                    "recompute_num_layers": self.recompute_num_layers or 1}
        selective = self.recompute_activations or self.recompute_granularity == "selective"
        return {"recompute_granularity": "selective" if selective else None}


def _moe_layer_freq(value: Any, num_layers: int) -> Union[int, List[int]]:
    """--moe-layer-freq as megatron-core takes it: an int N >= 1, or a list of ``num_layers``
    0/1 entries (at least one 1); a string is parsed as Megatron-LM's flag is (an int, or a
    Python list expression of ints, ``*`` and ``+``, evaluated without ``eval``). A list of
    all 1s gives 1."""
    if isinstance(value, str):
        value = _int_list_expression(value)
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise ValueError(f"moe_layer_freq: {value!r} is neither an int nor a 0/1 list")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"moe_layer_freq: must be >= 1, got {value}")
        return value
    pattern = list(value)
    if len(pattern) != num_layers or any(v not in (0, 1) for v in pattern) or 1 not in pattern:
        raise ValueError(f"moe_layer_freq: {pattern} must have one 0 (dense) or 1 (MoE) per "
                         f"layer, --num-layers {num_layers} entries, at least one 1")
    return 1 if all(pattern) else [int(v) for v in pattern]


def _int_list_expression(text: str) -> Union[int, List[int]]:
    """'2', '[0,1,1]' or '([0]*3+[1]*58)' -> 2, [0, 1, 1], [0, 0, 0, 1, ...]: ints, lists of
    ints, ``*`` and ``+`` only."""
    import ast

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError
    try:
        result = value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        result = None
    if not isinstance(result, (int, list)) or (isinstance(result, list) and not all(
            type(v) is int for v in result)):
        raise ValueError(f"moe_layer_freq: {text!r} is not an int or a list expression such as "
                         "'([0]*3+[1]*58)' (one 0 or 1 per layer)")
    return result


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes."""

    tensor_model_parallel_size: int = option(1, help="tensor-parallel size (TP)")
    pipeline_model_parallel_size: int = option(1, help="pipeline-parallel size (PP)")
    virtual_pipeline_model_parallel_size: Optional[int] = option(
        None, help="model chunks per pipeline rank (interleaved schedule)")
    sequence_parallel: bool = option(False, help="sequence parallelism with TP (needs the "
                                     "Transformer Engine layers)")
    context_parallel_size: int = option(1, help="context parallelism (CP): every packed "
                                        "sequence split over CP ranks (each conversation padded "
                                        "to a multiple of 2 x CP (x TP with --sequence-parallel) "
                                        "and cut in 2 x CP chunks, causal load balance); "
                                        "data-parallel size = world / (TP x PP x CP); on CPU a "
                                        "slow all-gather stand-in")
    cp_comm_type: str = option("p2p", choices=("p2p", "a2a", "all_gather", "a2a+p2p"),
                               help="Transformer Engine's context-parallel attention "
                               "exchange for packed sequences: p2p, or a2a (required with "
                               "--window-size; MLA requires p2p; all_gather and a2a+p2p take no "
                               "packed input and are refused); on CPU the local attention "
                               "all-gathers keys and values whatever the type")
    expert_model_parallel_size: int = option(1, help="expert parallelism (EP): the experts of "
                                             "each MoE layer are split over EP data-parallel "
                                             "ranks (needs --num-experts divisible by it)")
    use_distributed_optimizer: bool = option(False, help="shard optimizer state over data "
                                             "parallel ranks")
    overlap_grad_reduce: bool = option(False, help="reduce each gradient bucket over data "
                                       "parallel as soon as the last micro-batch's backward "
                                       "filled it, overlapping the backward (megatron-core DDP)")
    overlap_param_gather: bool = option(False, help="gather the distributed optimizer's "
                                        "updated parameter shards bucket by bucket during the "
                                        "next forward instead of at the end of the step (needs "
                                        "--use-distributed-optimizer and --overlap-grad-reduce)")
    ddp_bucket_size: Optional[int] = option(None, help="parameters per gradient bucket "
                                            "(default: megatron-core's, max(40M, 1M x DP) with "
                                            "--overlap-grad-reduce, else one bucket)")
    # --- tensor-parallel communication overlap (checked by _check_tp_comm_overlap here and by
    # training/fp8.py's check for the machine) ---
    tp_comm_overlap: bool = option(False, help="overlap tensor-parallel all-gathers / "
                                   "reduce-scatters with the GEMMs (Transformer Engine's "
                                   "userbuffers; needs CUDA, --tensor-model-parallel-size > 1, "
                                   "--sequence-parallel and CUDA_DEVICE_MAX_CONNECTIONS=1; "
                                   "--micro-batch-size 1 when validating; not with "
                                   "--context-parallel-size > 1)")

    def __post_init__(self) -> None:
        _positive("ddp_bucket_size", self.ddp_bucket_size, allow_none=True)
        self._check_tp_comm_overlap()
        self._check_overlap()
        _positive("tensor_model_parallel_size", self.tensor_model_parallel_size)
        _positive("pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        _positive("expert_model_parallel_size", self.expert_model_parallel_size)
        _positive("virtual_pipeline_model_parallel_size",
                  self.virtual_pipeline_model_parallel_size, allow_none=True)
        _positive("context_parallel_size", self.context_parallel_size)
        if self.virtual_pipeline_model_parallel_size and self.pipeline_model_parallel_size < 2:
            raise ValueError("virtual_pipeline_model_parallel_size: needs "
                             "--pipeline-model-parallel-size 2 or more")

    def _check_tp_comm_overlap(self) -> None:
        """--tp-comm-overlap overlaps the sequence-parallel all-gathers / reduce-scatters of
        tensor parallelism (Megatron-LM's rule): it needs both."""
        if not self.tp_comm_overlap:
            return
        if self.tensor_model_parallel_size < 2 or not self.sequence_parallel:
            raise ValueError(
                f"tp_comm_overlap: --tp-comm-overlap overlaps the communication of tensor "
                f"parallelism with sequence parallelism, but --tensor-model-parallel-size is "
                f"{self.tensor_model_parallel_size} and --sequence-parallel is "
                f"{'on' if self.sequence_parallel else 'off'}; add --tensor-model-parallel-size "
                "2 (or more) --sequence-parallel, or drop --tp-comm-overlap")
        if self.context_parallel_size > 1:
            raise ValueError(
                f"tp_comm_overlap: Transformer Engine's overlap buffers have one fixed shape, but "
                f"with --context-parallel-size {self.context_parallel_size} each step's length "
                "varies (every conversation padded to a multiple of 2 x CP when it is read); "
                "drop --tp-comm-overlap or use --context-parallel-size 1")

    def _check_overlap(self) -> None:
        """--overlap-param-gather needs what Megatron-LM requires: the distributed optimizer (the
        gather is of its shards) and --overlap-grad-reduce."""
        if self.overlap_param_gather and not (self.use_distributed_optimizer
                                              and self.overlap_grad_reduce):
            missing = [flag for flag, on in (("--use-distributed-optimizer",
                                              self.use_distributed_optimizer),
                                             ("--overlap-grad-reduce", self.overlap_grad_reduce))
                       if not on]
            raise ValueError(f"overlap_param_gather: needs {' and '.join(missing)} (it overlaps "
                             "the distributed optimizer's parameter all-gather, as Megatron-LM "
                             "does); add them, or drop --overlap-param-gather")


@dataclass
class DataConfig:
    """Which packed datasets are read, and how they are batched."""

    data_path: List[str] = option(help="packed dataset prefix(es) from tools/preprocess_dialog.py;"
                                  " with weights to blend: 0.7 A 0.3 B", metavar="PATH")
    valid_data_path: List[str] = option([], help="validation dataset prefix(es) (default: the "
                                        "'valid' split of --data-path)", metavar="PATH")
    seq_length: Optional[int] = option(None, help="tokens per pack (default: the datasets'; "
                                       "must match them)")
    micro_batch_size: int = option(1, help="packs per micro-batch on one data-parallel rank")
    global_batch_size: Optional[int] = option(None, help="packs per step over all data-parallel "
                                              "ranks (default: micro-batch size x DP); "
                                              "micro-batches per step = GBS / (MBS x DP)")
    loss_normalization: str = option("turn", choices=NORMALIZATIONS,
                                     help="turn: every assistant turn in the global batch counts "
                                     "equally; token: global token mean; conversation: mean of "
                                     "conversations' token means; power: between token and turn "
                                     "(--loss-turn-exponent)")
    # -- the 'power' loss normalization (issue 24) ----------------------------------------------
    loss_turn_exponent: Optional[float] = option(
        None, help="with --loss-normalization power: the exponent p (0 <= p <= 1) of the global "
        "loss sum_t l_t / L_t^p / sum_turns L^(1-p), L a turn's loss tokens: 0 = token, 1 = turn "
        "(default 0.5: each token weighs 1/sqrt(L), xtuner's 'square' reduction)")

    def __post_init__(self) -> None:
        self.blend()  # validates --data-path
        _positive("micro_batch_size", self.micro_batch_size)
        _positive("global_batch_size", self.global_batch_size, allow_none=True)
        _positive("seq_length", self.seq_length, allow_none=True)
        check_choice("loss_normalization", self.loss_normalization, NORMALIZATIONS)
        self._check_power()

    def _check_power(self) -> None:
        p = self.loss_turn_exponent
        if p is not None and self.loss_normalization != "power":
            raise ValueError(f"loss_turn_exponent: {p} is only used by --loss-normalization "
                             f"power, not {self.loss_normalization}; add --loss-normalization "
                             "power or drop --loss-turn-exponent")
        if p is not None and not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"loss_turn_exponent: {p} is not between 0 and 1 (0 = token, 1 = "
                             "turn, 0.5 = 1/sqrt(turn length)); give a value in [0, 1]")

    def turn_exponent(self) -> Optional[float]:
        """The 'power' normalization's exponent p (default 0.5); None for another one."""
        if self.loss_normalization != "power":
            return None
        return 0.5 if self.loss_turn_exponent is None else float(self.loss_turn_exponent)

    def blend(self) -> Tuple[List[str], List[float]]:
        """(prefixes, weights) of --data-path: ``A B`` (equal weights) or ``0.7 A 0.3 B``."""
        items = list(self.data_path)
        if not items:
            raise ValueError("data_path: at least one dataset prefix is needed")
        try:
            float(items[0])
        except ValueError:
            return items, [1.0] * len(items)
        if len(items) % 2:
            raise ValueError(f"data_path: weighted form needs WEIGHT PREFIX pairs, got {items}")
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            raise ValueError(f"data_path: weighted form needs WEIGHT PREFIX pairs, got {items}") from None
        if min(weights) <= 0:
            raise ValueError(f"data_path: weights must be positive, got {weights}")
        return items[1::2], weights


@dataclass
class OptimConfig:
    """Adam(W), learning-rate schedule, gradient clipping."""

    lr: float = option(3e-4, help="peak learning rate")
    min_lr: float = option(0.0, help="learning rate at the end of the decay")
    lr_warmup_iters: int = option(0, help="linear warmup iterations")
    lr_decay_style: str = option("cosine", choices=("cosine", "linear", "constant"),
                                 help="decay after warmup")
    lr_decay_iters: Optional[int] = option(None, help="iterations of warmup + decay (default: "
                                           "--train-iters)")
    weight_decay: float = option(0.01, help="decoupled weight decay (AdamW)")
    adam_beta1: float = option(0.9, help="Adam beta1")
    adam_beta2: float = option(0.95, help="Adam beta2")
    adam_eps: float = option(1e-8, help="Adam epsilon")
    clip_grad: float = option(1.0, help="clip the global gradient norm to this (0: off)")
    lr_warmup_init: float = option(0.0, help="learning rate the linear warmup starts from "
                                   "(iteration 1 trains at lr_warmup_init + (lr - "
                                   "lr_warmup_init) / --lr-warmup-iters)")
    bf16: bool = option(False, help="bf16 mixed precision: bf16 parameters and activations, fp32 "
                        "main parameters, gradients reduced in fp32 (GPU and CPU alike)")
    fp16: bool = option(False, help="fp16 mixed precision with loss scaling (dynamic unless "
                        "--loss-scale)")
    loss_scale: Optional[float] = option(None, help="with --fp16: a constant loss scale "
                                         "(default: dynamic)")
    initial_loss_scale: float = option(2.0 ** 16, help="with --fp16: the first dynamic loss "
                                       "scale (Megatron-LM starts at 2^32; mt_dialog's loss is "
                                       "a sum over the micro-batch's turns, divided once per "
                                       "step, so its gradients are larger and 2^32 would skip "
                                       "the first ~30 iterations)")
    min_loss_scale: float = option(1.0, help="with --fp16: the dynamic loss scale never goes "
                                   "below this")
    loss_scale_window: int = option(1000, help="with --fp16: iterations without overflow "
                                    "before the dynamic loss scale doubles")
    hysteresis: int = option(2, help="with --fp16: overflows tolerated before the dynamic loss "
                             "scale halves")
    # --- FP8 (Transformer Engine's FP8 GEMMs; checked by _check_fp8 here and by training/fp8.py's
    # check for the machine, the layers and the GEMM sizes) ---
    fp8_format: Optional[str] = option(
        None, choices=("e4m3", "hybrid"), help="FP8 GEMMs in Transformer Engine's layers (with "
        "--bf16, on GPUs of compute capability 8.9+): e4m3 everywhere, or hybrid (e4m3 forward, "
        "e5m2 gradients); the loss stays fp32 (default: off)")
    fp8_recipe: str = option("delayed", choices=("delayed", "tensorwise", "mxfp8", "blockwise"),
                             help="with --fp8-format: scaling recipe (delayed: amax history; "
                             "tensorwise: current per-tensor scales; blockwise: per-block "
                             "scales, Hopper; mxfp8: Blackwell)")
    fp8_margin: int = option(0, help="with --fp8-format (delayed): scale margin (scales are "
                             "divided by 2^margin)")
    fp8_amax_history_len: int = option(1, help="with --fp8-format (delayed): amax values kept "
                                       "per tensor")
    fp8_amax_compute_algo: str = option("most_recent", choices=("most_recent", "max"),
                                        help="with --fp8-format (delayed): the amax of the "
                                        "history a scale is computed from")

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if self.bf16 and self.fp16:
            raise ValueError("fp16: --fp16 and --bf16 exclude each other; pick one (--bf16 is "
                             "the usual choice on GPUs that have it)")
        for name in ("initial_loss_scale", "min_loss_scale", "loss_scale_window",
                     "hysteresis"):
            _positive(name, getattr(self, name))
        _positive("loss_scale", self.loss_scale, allow_none=True)
        if not 0 <= self.lr_warmup_init <= self.lr:
            raise ValueError(f"lr_warmup_init: must be in [0, lr={self.lr}], got "
                             f"{self.lr_warmup_init}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("lr_warmup_iters", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        _positive("lr_decay_iters", self.lr_decay_iters, allow_none=True)
        self._check_fp8()

    def _check_fp8(self) -> None:
        """FP8 fields: the choices, a margin >= 0 and a history >= 1; none given without
        --fp8-format; FP8 only with --bf16 (TE's FP8 GEMMs take bf16 parameters and
        activations, as in Megatron-LM)."""
        from mt_dialog.training.fp8 import FP8_AMAX_ALGOS, FP8_FORMATS, FP8_RECIPES

        check_choice("fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        check_choice("fp8_amax_compute_algo", self.fp8_amax_compute_algo, FP8_AMAX_ALGOS)
        if self.fp8_margin < 0:
            raise ValueError(f"fp8_margin: must be >= 0, got {self.fp8_margin}")
        _positive("fp8_amax_history_len", self.fp8_amax_history_len)
        if self.fp8_format is None:
            defaults = {f.name: f.default for f in fields(self) if f.name.startswith("fp8_")}
            changed = [n for n, d in defaults.items() if getattr(self, n) != d]
            if changed:
                raise ValueError(f"{changed[0]}: --{changed[0].replace('_', '-')} needs "
                                 "--fp8-format e4m3|hybrid; add it or drop the flag")
            return
        check_choice("fp8_format", self.fp8_format, FP8_FORMATS)
        if self.fp8_recipe != "delayed":  # megatron-core passes these to DelayedScaling only
            for name, default in (("fp8_margin", 0), ("fp8_amax_history_len", 1),
                                  ("fp8_amax_compute_algo", "most_recent")):
                if getattr(self, name) != default:
                    raise ValueError(f"{name}: --{name.replace('_', '-')} applies to "
                                     f"--fp8-recipe delayed only (this run: {self.fp8_recipe}, "
                                     "which computes its scales from the current tensors); "
                                     "drop the flag")
        if not self.bf16:
            raise ValueError(
                f"fp8_format: --fp8-format {self.fp8_format} needs --bf16 (FP8 GEMMs keep bf16 "
                f"parameters and activations, as Megatron-LM runs them), but the run is "
                f"{'--fp16' if self.fp16 else 'fp32'}; use --bf16"
                + (" instead of --fp16" if self.fp16 else ""))

    @property
    def params_dtype(self) -> "torch.dtype":
        """dtype of the model's parameters and activations: bf16 / fp16 with --bf16 / --fp16,
        else fp32. Main parameters, gradient reduction and the loss stay fp32."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass
class TrainConfig:
    """Length of the run, evaluation, logging and checkpoints."""

    train_iters: Optional[int] = option(None, help="optimizer steps to run")
    train_epochs: Optional[float] = option(None, help="or: passes over the training packs "
                                           "(converted to steps)")
    seed: int = option(1234, help="seed of weights, data order and dropout")
    log_interval: int = option(10, help="iterations between log lines")
    eval_interval: Optional[int] = option(None, help="iterations between validation runs")
    eval_iters: Optional[int] = option(None, help="validation steps (global batches) per run "
                                       "(default: the whole validation set); without "
                                       "--eval-interval: one validation at the end of the run; "
                                       "0: no validation (as in Megatron-LM)")
    eval_reply_length_buckets: List[int] = option(
        list(REPLY_LENGTH_EDGES), metavar="TOKENS",
        help="validation reports loss and accuracy by reply length: the upper edges of the "
        "length buckets in tokens (end-of-turn included), increasing; 4 16 gives 1-4, 5-16, 17+")
    save: Optional[str] = option(None, help="checkpoint folder to save to")
    save_interval: Optional[int] = option(None, help="iterations between checkpoints (a final "
                                          "one is always saved with --save)")
    load: Optional[str] = option(None, help="checkpoint folder to resume from (model, "
                                 "optimizer, scheduler, data position, RNG)")
    finetune: bool = option(False, help="with --load: take the weights only, start at iteration 0")
    pretrained_checkpoint: Optional[str] = option(
        None, help="a checkpoint whose weights start the run while --load holds no checkpoint "
        "(Megatron-LM's flag): --pretrained-checkpoint BASE --load DIR --save DIR is one "
        "fine-tuning command to relaunch as often as needed")
    use_checkpoint_args: bool = option(False, help="with --load / --pretrained-checkpoint: take "
                                       "the model flags "
                                       "(layers, sizes, heads, RoPE, norm) from the checkpoint")
    exit_interval: Optional[int] = option(None, help="stop after the first iteration that is "
                                          "a multiple of this (Megatron-LM's rule), saving a "
                                          "checkpoint with --save; rerun with --load to continue")
    exit_duration_in_mins: Optional[float] = option(
        None, help="stop after the first iteration that ends this many minutes after the start "
        "(inside a job's time limit), saving a checkpoint with --save")
    exit_signal_handler: bool = option(False, help="on SIGTERM (sent by SLURM and Kubernetes "
                                       "before they kill a job; torchrun forwards it) finish the "
                                       "iteration, save a checkpoint with --save and exit 0")
    tensorboard_dir: Optional[str] = option(None, help="write TensorBoard scalars here")
    wandb_project: Optional[str] = option(None, help="log the TensorBoard scalars to this "
                                          "Weights & Biases project too (pip install -e "
                                          "'.[wandb]'; WANDB_MODE=offline runs without network)")
    wandb_exp_name: Optional[str] = option(None, help="with --wandb-project: the W&B run name")
    wandb_save_dir: Optional[str] = option(None, help="with --wandb-project: W&B writes its "
                                           "run files into DIR/wandb/ (default DIR: --save, else "
                                           "the current folder)")

    def __post_init__(self) -> None:
        if self.eval_iters == 0:  # Megatron-LM's way of turning validation off
            self.eval_iters = self.eval_interval = None
        if (self.train_iters is None) == (self.train_epochs is None):
            raise ValueError("train_iters: give exactly one of --train-iters and --train-epochs")
        _positive("train_iters", self.train_iters, allow_none=True)
        _positive("train_epochs", self.train_epochs, allow_none=True)
        _positive("log_interval", self.log_interval)
        for name in ("eval_interval", "eval_iters", "save_interval", "exit_interval",
                     "exit_duration_in_mins"):
            _positive(name, getattr(self, name), allow_none=True)
        edges = list(self.eval_reply_length_buckets)
        if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"eval_reply_length_buckets: {edges} must be increasing positive "
                             "token counts (the upper edge of each bucket), e.g. 4 16 64 256")
        for name in ("wandb_exp_name", "wandb_save_dir"):
            if getattr(self, name) and not self.wandb_project:
                raise ValueError(f"{name}: --{name.replace('_', '-')} needs --wandb-project "
                                 "NAME (W&B logging is on only with a project)")
        if self.finetune and not self.load:
            raise ValueError("finetune: --finetune needs --load CHECKPOINT")
        if self.finetune and self.pretrained_checkpoint:
            raise ValueError("pretrained_checkpoint: give either --load BASE --finetune or "
                             "--pretrained-checkpoint BASE (with --load DIR --save DIR to make "
                             "the fine-tune relaunchable), not both")
        if self.use_checkpoint_args and not (self.load or self.pretrained_checkpoint):
            raise ValueError("use_checkpoint_args: --use-checkpoint-args needs --load CHECKPOINT "
                             "or --pretrained-checkpoint CHECKPOINT")


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoraConfig:
    """LoRA: train low-rank adapters on a frozen base model (off unless --lora-rank is given).

    The base (usually --load BASE --finetune or --pretrained-checkpoint BASE) is frozen; each
    targeted megatron-core layer gets ``W x + (alpha / rank) B A x`` (``training.lora``)."""

    lora_rank: Optional[int] = option(None, help="rank of the adapters; enables LoRA")
    lora_alpha: Optional[float] = option(None, help="scaling numerator: the update is alpha / "
                                         "rank x B A (default: the rank, scaling 1)")
    lora_dropout: float = option(0.0, help="dropout on the adapters' input")
    lora_target: List[str] = option(["all"], choices=LORA_TARGETS + ("all",), metavar="MODULE",
                                    help="megatron-core layers to adapt in every transformer "
                                    "layer: linear_qkv, linear_proj, linear_fc1, linear_fc2, "
                                    "or all")

    def __post_init__(self) -> None:
        _positive("lora_rank", self.lora_rank, allow_none=True)
        if self.lora_rank is not None and int(self.lora_rank) != self.lora_rank:
            raise ValueError(f"lora_rank: must be a whole number, got {self.lora_rank}")
        _positive("lora_alpha", self.lora_alpha, allow_none=True)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout: {self.lora_dropout} must be in [0, 1)")
        targets = list(self.lora_target)
        if not targets:
            raise ValueError("lora_target: name at least one module (or all)")
        for target in targets:
            check_choice("lora_target", target, LORA_TARGETS + ("all",))
        if self.lora_rank is None:
            given = [f"--{name.replace('_', '-')}" for name, default in (
                ("lora_alpha", None), ("lora_dropout", 0.0)) if getattr(self, name) != default]
            if targets != ["all"]:
                given.append("--lora-target")
            if given:
                raise ValueError(f"lora_rank: {', '.join(given)} needs --lora-rank R (LoRA is "
                                 "off without it)")

    @property
    def enabled(self) -> bool:
        return self.lora_rank is not None

    @property
    def alpha(self) -> float:
        """The scaling numerator (``lora_alpha``, default the rank)."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def targets(self) -> Tuple[str, ...]:
        """The targeted layer names in megatron-core order, ``all`` expanded."""
        chosen = set(self.lora_target)
        return tuple(t for t in LORA_TARGETS if "all" in chosen or t in chosen)

    def fit_model(self, model: "ModelConfig") -> None:
        """On a Mixture-of-Experts model (``model.num_experts``) the MLP is the experts, which
        get no adapters: ``all`` becomes ``linear_qkv linear_proj`` (the attention layers).

        Raises:
            ValueError: an explicit ``linear_fc1``/``linear_fc2`` on a MoE model, ``linear_qkv``
            on multi-latent attention.
        """
        if self.enabled and model.multi_latent_attention:
            self._fit_multi_latent_attention(model)
        if not self.enabled or model.num_experts is None:
            return
        mlp = [t for t in self.lora_target if t in ("linear_fc1", "linear_fc2")]
        if mlp:
            raise ValueError(
                f"lora_target: {' '.join(mlp)} is the MLP, which on this Mixture-of-Experts "
                f"model (--num-experts {model.num_experts}) is the experts; LoRA on experts is "
                "not supported: use --lora-target linear_qkv linear_proj (what all means here)")
        if "all" in self.lora_target:
            self.lora_target = ["linear_qkv", "linear_proj"]

    def _fit_multi_latent_attention(self, model: "ModelConfig") -> None:
        """MLA has no ``linear_qkv`` (its projections are ``linear_q_proj`` / ``linear_q_down_proj``
        / ``linear_q_up_proj`` / ``linear_kv_down_proj`` / ``linear_kv_up_proj``, which get no
        adapters yet): ``all`` means ``linear_proj`` and the dense MLP's layers."""
        if "linear_qkv" in self.lora_target:
            raise ValueError("lora_target: linear_qkv does not exist with --multi-latent-"
                             "attention (LoRA on MLA's query/key/value projections is not "
                             "supported); use --lora-target linear_proj (and linear_fc1 "
                             "linear_fc2 on a dense MLP)")
        if "all" in self.lora_target:
            mlp = [] if model.num_experts is not None else ["linear_fc1", "linear_fc2"]
            self.lora_target = ["linear_proj", *mlp]


# --tokenizer-type values: mt_dialog's and Megatron-LM's names of the two supported back-ends
TOKENIZER_TYPES = {"sentencepiece": "sentencepiece", "SentencePieceTokenizer": "sentencepiece",
                   "GPTSentencePieceTokenizer": "sentencepiece",
                   "Llama2Tokenizer": "sentencepiece", "huggingface": "huggingface",
                   "HuggingFaceTokenizer": "huggingface"}


@dataclass
class TokenizerConfig:
    """Optional: the tokenizer the datasets must have been built with (checked by sha256).

    Training takes the tokenizer from the datasets' metadata; these Megatron-LM flags, when
    given, are compared with every dataset's before any model is built."""

    tokenizer_type: Optional[str] = option(
        None, help="sentencepiece (Megatron-LM: SentencePieceTokenizer, GPTSentencePieceTokenizer,"
        " Llama2Tokenizer) or huggingface (HuggingFaceTokenizer)")
    tokenizer_model: Optional[str] = option(
        None, help="the SentencePiece .model file the datasets were built with (a Hugging Face "
        "folder is accepted too, as in Megatron-LM)")
    tokenizer_path: Optional[str] = option(
        None, help="the Hugging Face tokenizer folder the datasets were built with")

    def __post_init__(self) -> None:
        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(
                f"tokenizer_type: {self.tokenizer_type!r} is not supported: datasets are "
                "tokenized at preprocessing with a SentencePiece or Hugging Face tokenizer; use "
                f"one of {', '.join(TOKENIZER_TYPES)} or drop --tokenizer-type (training reads "
                "the tokenizer from the dataset)")
        if self.tokenizer_model and self.tokenizer_path:
            raise ValueError("tokenizer_path: give --tokenizer-model FILE.model (SentencePiece) "
                             "or --tokenizer-path DIR (Hugging Face), not both")

    @property
    def kind(self) -> Optional[str]:
        """The back-end named by --tokenizer-type: "sentencepiece", "huggingface" or None."""
        return TOKENIZER_TYPES.get(self.tokenizer_type) if self.tokenizer_type else None


@dataclass
class DialogTrainingConfig:
    """Everything one training run needs."""

    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        self.lora.fit_model(self.model)
        self._check_fp8()
        self._check_context_parallel()
        if (self.model.num_experts and self.parallel.tensor_model_parallel_size > 1
                and not self.parallel.sequence_parallel):
            raise ValueError(
                f"tensor_model_parallel_size: --tensor-model-parallel-size "
                f"{self.parallel.tensor_model_parallel_size} with --num-experts "
                f"{self.model.num_experts} needs --sequence-parallel (megatron-core refuses MoE "
                "training with tensor parallelism without it; sequence parallelism needs the "
                "Transformer Engine layers, so on CPU split the experts with "
                "--expert-model-parallel-size instead)")

    def _check_context_parallel(self) -> None:
        """--cp-comm-type against what Transformer Engine's context-parallel attention runs
        for packed (THD) sequences and this model (TE 2.x ``attn_forward_func_with_cp``):
        all_gather and a2a+p2p take no THD input; a sliding window needs a2a; multi-latent
        attention (key size != value size) needs p2p. Checked on every machine, so that a
        layout tested on CPU (whose stand-in all-gathers whatever the type) runs on GPUs."""
        par, model = self.parallel, self.model
        if par.context_parallel_size == 1:
            return
        comm = par.cp_comm_type
        fix = None
        if comm in ("all_gather", "a2a+p2p"):
            fix = (f"Transformer Engine's {comm} context parallelism takes no packed (THD) "
                   "sequences; use --cp-comm-type p2p (or a2a)")
        elif model.window_size is not None and comm != "a2a":
            fix = ("Transformer Engine runs sliding-window attention (--window-size) under "
                   "context parallelism only with all-to-all; use --cp-comm-type a2a")
        elif model.multi_latent_attention and comm != "p2p":
            fix = ("Transformer Engine runs multi-latent attention (key and value head sizes "
                   "differ) under context parallelism only with p2p; use --cp-comm-type p2p")
        elif comm == "a2a":
            fix = self._a2a_heads_problem()
        if fix:
            raise ValueError(f"cp_comm_type: {comm} with --context-parallel-size "
                             f"{par.context_parallel_size}: {fix}")

    def _a2a_heads_problem(self) -> Optional[str]:
        """All-to-all context parallelism scatters the heads of each tensor-parallel rank over
        the CP ranks (TE's ``flash_attn_a2a_communicate``): both the attention heads and the
        query groups per TP rank must divide by CP; None when they do."""
        par, model = self.parallel, self.model
        tp, cp = par.tensor_model_parallel_size, par.context_parallel_size
        heads, groups = model.num_attention_heads // tp, max(1, model.num_query_groups // tp)
        if heads % cp or groups % cp:
            return (f"all-to-all context parallelism splits each tensor-parallel rank's "
                    f"{heads} heads and {groups} query groups over {cp} ranks; both must "
                    f"divide by --context-parallel-size {cp}: use --cp-comm-type p2p")
        return None

    def _check_fp8(self) -> None:
        """--fp8-format / --tp-comm-overlap against this machine, the layers and the sizes
        (``training.fp8.check``; --seq-length when given, the datasets' before the model is
        built)."""
        from mt_dialog.training.fp8 import check

        check(self, self.data.seq_length)


def validate_world(config: DialogTrainingConfig, world_size: int) -> int:
    """Check the parallel layout against ``world_size``; returns the data-parallel size."""
    par, data, model = config.parallel, config.data, config.model
    model_parallel = model_parallel_size(par)
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
            f"{par.tensor_model_parallel_size} x {par.pipeline_model_parallel_size} x "
            f"{par.context_parallel_size}; launch a multiple of {model_parallel} processes or "
            "change the parallel sizes")
    dp = world_size // model_parallel
    gbs = data.global_batch_size or data.micro_batch_size * dp
    if gbs % (data.micro_batch_size * dp):
        raise ValueError(
            f"global_batch_size: {gbs} is not divisible by micro-batch size x data-parallel size "
            f"= {data.micro_batch_size} x {dp}; use a multiple of {data.micro_batch_size * dp}")
    if model.num_attention_heads % par.tensor_model_parallel_size or (
            model.num_query_groups % par.tensor_model_parallel_size
            and par.tensor_model_parallel_size % model.num_query_groups):
        raise ValueError(
            f"tensor_model_parallel_size: {par.tensor_model_parallel_size} must divide the "
            f"{model.num_attention_heads} attention heads and the {model.num_query_groups} "
            "query groups")
    layers_per_stage = par.pipeline_model_parallel_size * (par.virtual_pipeline_model_parallel_size or 1)
    if model.num_layers % layers_per_stage:
        raise ValueError(
            f"num_layers: {model.num_layers} layers cannot be split evenly over "
            f"{layers_per_stage} pipeline chunks (pipeline-parallel size x virtual stages); use "
            f"a --num-layers that is a multiple of {layers_per_stage}, or fewer stages")
    _check_recompute_layers(model, model.num_layers // layers_per_stage)
    _check_expert_parallel(model, par, dp)
    return dp


def model_parallel_size(par: ParallelConfig) -> int:
    """Ranks one data-parallel replica spans: TP x PP x CP."""
    return (par.tensor_model_parallel_size * par.pipeline_model_parallel_size
            * par.context_parallel_size)


def _check_expert_parallel(model: ModelConfig, par: ParallelConfig, dp: int) -> None:
    """EP splits each MoE layer's experts over data-parallel ranks: it needs experts, must
    divide their number and the data-parallel size."""
    ep = par.expert_model_parallel_size
    if ep == 1:
        return
    if model.num_experts is None:
        raise ValueError(f"expert_model_parallel_size: {ep} needs a Mixture-of-Experts model "
                         "(--num-experts N); use 1 for a dense model")
    if model.num_experts % ep:
        raise ValueError(f"expert_model_parallel_size: {ep} must divide --num-experts "
                         f"{model.num_experts}")
    if dp % ep:
        raise ValueError(f"expert_model_parallel_size: {ep} must divide the data-parallel size "
                         f"{dp} (world size / (tensor x pipeline x context parallel)); launch a "
                         f"multiple of {ep * model_parallel_size(par)} processes or lower "
                         "--expert-model-parallel-size")


def _check_recompute_layers(model: ModelConfig, chunk_layers: int) -> None:
    """Full recompute works on each pipeline chunk's ``chunk_layers`` layers: uniform needs
    --recompute-num-layers to divide them, block to be at most that many."""
    settings = model.recompute_settings()
    if settings["recompute_granularity"] != "full":
        return
    method, count = settings["recompute_method"], settings["recompute_num_layers"]
    if count > chunk_layers or (method == "uniform" and chunk_layers % count):
        need = "a divisor of" if method == "uniform" else "at most"
        raise ValueError(
            f"recompute_num_layers: {count} with --recompute-method {method} must be {need} "
            f"the {chunk_layers} layers of each pipeline chunk (--num-layers / (pipeline x "
            f"virtual pipeline size)); use --recompute-num-layers 1")


def validate_schedule(config: DialogTrainingConfig, dp_size: int, seq_length: int,
                      valid_packs: int) -> None:
    """Checks that need the datasets' sequence length and validation size, before any model is
    built (megatron-core would fail mid-run): sequence parallelism splits every micro-batch's
    tokens over TP; the interleaved schedule (megatron-core 0.16.1
    ``forward_backward_pipelining_with_interleaving``) needs the micro-batches of a step to be a
    multiple of PP (at least PP, and no remainder group smaller than PP). Validation runs one pack
    per micro-batch, data-parallel rank r taking packs r, r + DP, ... (see ``loop.evaluate``).

    Raises:
        ValueError: naming the flag, the numbers and the fix.
    """
    par, data = config.parallel, config.data
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if par.sequence_parallel:
        tokens = data.micro_batch_size * seq_length
        for what, count in (("a training micro-batch (micro-batch size x seq length)", tokens),
                            ("a validation micro-batch (one pack)", seq_length)):
            if count % tp:
                raise ValueError(
                    f"sequence_parallel: {what} has {count} tokens, not divisible by the "
                    f"tensor-parallel size {tp}; rebuild the dataset with a --seq-length that is "
                    f"a multiple of {tp}, or run without --sequence-parallel")
    if not par.virtual_pipeline_model_parallel_size:
        return
    gbs = data.global_batch_size or data.micro_batch_size * dp_size
    micro = gbs // (data.micro_batch_size * dp_size)
    if micro % pp:
        step = data.micro_batch_size * dp_size * pp
        raise ValueError(
            f"global_batch_size: the interleaved pipeline schedule needs the micro-batches per "
            f"step (global batch {gbs} / (micro-batch size {data.micro_batch_size} x data "
            f"parallel {dp_size}) = {micro}) to be a multiple of the pipeline-parallel size {pp}; "
            f"use a --global-batch-size that is a multiple of {step}")
    _validate_interleaved_validation(config, dp_size, gbs, valid_packs)


def _validate_interleaved_validation(config: DialogTrainingConfig, dp_size: int, gbs: int,
                                     valid_packs: int) -> None:
    """Validation under the interleaved schedule: every data-parallel rank's pack count (one
    pack per micro-batch) must be a multiple of PP."""
    pp = config.parallel.pipeline_model_parallel_size
    train = config.train
    if not (train.eval_interval or train.eval_iters) or not valid_packs:
        return
    packs = min(valid_packs, train.eval_iters * gbs) if train.eval_iters else valid_packs
    counts = {len(range(rank, packs, dp_size)) for rank in range(dp_size)}
    if all(count % pp == 0 for count in counts):
        return
    fits = valid_packs // gbs
    fix = (f"pass --eval-iters {fits} (validation then reads {fits} x global batch {gbs} = "
           f"{fits * gbs} packs)" if fits else
           f"give the validation set at least one global batch ({gbs} packs): a larger valid "
           "share in preprocessing (--split) or --valid-data-path")
    raise ValueError(
        f"eval_iters: the interleaved pipeline schedule needs each data-parallel rank's "
        f"validation micro-batches (one pack each) to be a multiple of the pipeline-parallel "
        f"size {pp}, but {packs} validation packs over {dp_size} data-parallel ranks give "
        f"{sorted(counts)}; {fix}")
