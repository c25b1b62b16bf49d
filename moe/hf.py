"""transformers MoE blocks ↔ moe-a2a weights and routing.

Supported blocks (transformers 5.x layout, with fallbacks for the 4.x per-expert layout):

* ``DeepseekV3MoE`` (``model_type`` ``deepseek_v3``): ``gate`` is ``DeepseekV3TopkRouter``
  (``weight [E, H]`` float32, buffer ``e_score_correction_bias [E]``, sigmoid scoring,
  ``n_group``/``topk_group`` grouped top-k, ``norm_topk_prob``, ``routed_scaling_factor``);
  ``experts`` fused (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``);
  ``shared_experts`` a ``DeepseekV3MLP`` with ``Is = n_shared_experts * moe_intermediate_size``.
* ``Qwen3MoeSparseMoeBlock`` (``qwen3_moe``): ``gate`` ``Qwen3MoeTopKRouter`` (softmax,
  top-k, optional ``norm_topk_prob``); fused experts as above; no shared expert.
* ``MixtralSparseMoeBlock`` (``mixtral``): ``gate`` ``MixtralTopKRouter`` (softmax, top-k,
  always renormalised); fused experts as above.

Nothing here downloads anything: configs come from a local JSON file or a dict.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Type, Union, cast

import torch

from moe_a2a.errors import MoeA2AError
from moe_a2a.routing import RouterConfig
from moe_a2a.weights import MoEWeights, SharedExpertWeights

HF_MODEL_TYPES = ("deepseek_v3", "qwen3_moe", "mixtral")

#: The tiny example configs shipped with the package (``moe/hf_configs/<model_type>_tiny.json``).
HF_CONFIG_DIR = Path(__file__).resolve().parent / "hf_configs"

_BLOCK_CLASSES = {
    "DeepseekV3MoE": "deepseek_v3",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "MixtralSparseMoeBlock": "mixtral",
}


def example_hf_config(model_type: str) -> Path:
    """Path of the shipped tiny config for ``model_type`` (one of ``HF_MODEL_TYPES``)."""
    if model_type not in HF_MODEL_TYPES:
        raise MoeA2AError(f"model_type {model_type!r} is not supported: use one of {', '.join(HF_MODEL_TYPES)}")
    return HF_CONFIG_DIR / f"{model_type}_tiny.json"


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a test dependency
        raise MoeA2AError(
            f"transformers is not importable ({exc}): install it with `pip install 'moe-a2a[hf]'`"
        ) from exc
    return transformers


def load_hf_config(path_or_dict: Union[str, Path, Mapping[str, Any], Any]):
    """A transformers ``PretrainedConfig`` from a config JSON file, a model directory holding
    ``config.json``, a dict, or an existing config (returned as is after checking its type).

    Raises ``MoeA2AError`` naming the file and the supported ``model_type`` values.
    """
    transformers = _transformers()
    supported = ", ".join(HF_MODEL_TYPES)
    if isinstance(path_or_dict, transformers.PretrainedConfig):
        _check_model_type(getattr(path_or_dict, "model_type", None), "the given config")
        _check_int_sizes({key: getattr(path_or_dict, key) for key, _ in
                          _INT_SIZES[path_or_dict.model_type] if hasattr(path_or_dict, key)},
                         path_or_dict.model_type, "the given config")
        return path_or_dict
    if isinstance(path_or_dict, Mapping):
        data: Dict[str, Any] = dict(path_or_dict)
        where = "the given dict"
    elif isinstance(path_or_dict, (str, Path)):
        path = Path(path_or_dict)
        if path.is_dir():
            path = path / "config.json"
        where = str(path)
        if not path.is_file():
            raise MoeA2AError(
                f"config file {where} does not exist: pass a transformers config JSON "
                f"(model_type one of {supported}; examples in {HF_CONFIG_DIR})"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MoeA2AError(f"config file {where} is not readable JSON ({exc}): pass a transformers config JSON") from exc
        if not isinstance(data, dict):
            raise MoeA2AError(f"config file {where} holds a {type(data).__name__}, not a JSON object")
    else:
        raise MoeA2AError(
            f"cannot load a config from a {type(path_or_dict).__name__}: pass a path, a dict or a PretrainedConfig"
        )
    model_type = data.pop("model_type", None)
    _check_model_type(model_type, where)
    _check_int_sizes(data, model_type, where)
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # transformers' validation errors have no common base class
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:280] + "..."
        raise MoeA2AError(f"{where}: transformers rejected the {model_type} config "
                          f"({type(exc).__name__}: {detail}); fix: edit the config") from None


#: Integer sizes per model type, checked before transformers sees them (``8.0``, ``"eight"`` or
#: ``true`` is not an expert count): (config key, smallest valid value).
_INT_SIZES = {
    "deepseek_v3": (("hidden_size", 1), ("n_routed_experts", 1), ("moe_intermediate_size", 1),
                    ("num_experts_per_tok", 1), ("n_group", 1), ("topk_group", 1),
                    ("n_shared_experts", 0)),
    "qwen3_moe": (("hidden_size", 1), ("num_experts", 1), ("moe_intermediate_size", 1),
                  ("num_experts_per_tok", 1)),
    "mixtral": (("hidden_size", 1), ("num_local_experts", 1), ("intermediate_size", 1),
                ("num_experts_per_tok", 1)),
}


_JSON_TYPES = {str: "string", float: "number with a fraction", bool: "boolean", list: "array",
               dict: "object"}


def _check_int_sizes(data: Mapping[str, Any], model_type: str, where: str) -> None:
    for key, minimum in _INT_SIZES[model_type]:
        if key not in data or data[key] is None:
            continue
        value = data[key]
        text = json.dumps(value, default=repr)  # as written in the JSON file
        shown = text if len(text) <= 60 else text[:50] + "..."
        if isinstance(value, bool) or not isinstance(value, int):
            raise MoeA2AError(f"{where}: {key}={shown} is a JSON {_JSON_TYPES.get(type(value), type(value).__name__)}, "
                              f"not a whole number; fix: write it as a JSON integer, e.g. \"{key}\": 8")
        if value < minimum:
            raise MoeA2AError(f"{where}: {key}={value} is invalid: it must be >= {minimum}; "
                              f"fix: edit the config")


#: Config attribute names of (routed experts, per-expert intermediate size) per model type.
_MOE_SIZE_ATTRS = {
    "deepseek_v3": ("n_routed_experts", "moe_intermediate_size"),
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "mixtral": ("num_local_experts", "intermediate_size"),
}


def moe_sizes(config) -> Tuple[int, int]:
    """``(num_experts, intermediate_size)`` of the config's MoE block, without building it."""
    config = load_hf_config(config)
    experts_attr, inter_attr = _MOE_SIZE_ATTRS[config.model_type]
    return int(getattr(config, experts_attr)), int(getattr(config, inter_attr))


def moe_shape(config) -> Dict[str, int]:
    """The block's sizes, without building it: ``num_experts``, ``top_k``, ``hidden_size``,
    ``intermediate_size`` (per expert) and ``shared_intermediate_size`` (0: none)."""
    config = load_hf_config(config)
    num_experts, inter = moe_sizes(config)
    shared = 0
    if config.model_type == "deepseek_v3":
        shared = int(getattr(config, "n_shared_experts", 0) or 0) * inter
    return {"num_experts": num_experts, "top_k": int(config.num_experts_per_tok),
            "hidden_size": int(config.hidden_size), "intermediate_size": inter,
            "shared_intermediate_size": shared}


def _check_model_type(model_type: Optional[str], where: str) -> None:
    if model_type not in HF_MODEL_TYPES:
        raise MoeA2AError(
            f"{where} has model_type={model_type!r}; supported model_type values: "
            f"{', '.join(HF_MODEL_TYPES)}"
        )


def build_hf_block(config, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model's MoE block with seeded random weights, in eval mode, on CPU.

    ``DeepseekV3MoE`` / ``Qwen3MoeSparseMoeBlock`` / ``MixtralSparseMoeBlock`` is built
    directly (so it is always an MoE layer, whatever ``first_k_dense_replace`` or
    ``mlp_only_layers`` say). The experts use transformers' eager implementation. Weights are
    ``N(0, 1/fan_in)``, DeepSeek-V3's correction bias ``N(0, 0.1^2)`` (non-zero, so it matters);
    DeepSeek-V3's router weight and bias stay float32 as transformers keeps them.
    """
    config = load_hf_config(config)
    config = copy.deepcopy(config)
    model_type = config.model_type
    try:
        config._experts_implementation = "eager"
    except (AttributeError, ValueError, KeyError):  # older transformers: eager is the only path
        pass
    _check_swiglu(getattr(config, "hidden_act", "silu"), model_type)
    cls: Type[torch.nn.Module]
    if model_type == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as cls
    elif model_type == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as cls
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as cls
    try:
        block = cls(config)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise MoeA2AError(f"cannot build the {model_type} MoE block from this config ({exc})") from exc
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, param in sorted(block.named_parameters(), key=lambda kv: kv[0]):
            fan_in = param.shape[-1]
            param.copy_(torch.randn(param.shape, generator=gen) * fan_in ** -0.5)
        for name, buf in sorted(block.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
    for name, child in block.named_children():
        if not (model_type == "deepseek_v3" and name == "gate"):
            child.to(dtype)
    return block.eval()


def _check_swiglu(act: Any, model_type: str) -> None:
    if act not in ("silu", "swish"):
        raise MoeA2AError(
            f"{model_type} config has hidden_act={act!r}; the experts here are SwiGLU with silu: "
            f"use hidden_act='silu'"
        )


def _block_kind(block: torch.nn.Module) -> str:
    for klass in type(block).__mro__:
        if klass.__name__ in _BLOCK_CLASSES:
            return _BLOCK_CLASSES[klass.__name__]
    raise MoeA2AError(
        f"{type(block).__name__} is not a supported MoE block: use one of {', '.join(_BLOCK_CLASSES)}"
    )


def _experts_tensors(experts: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_gate [E, I, H], w_up [E, I, H], w_down [E, H, I])`` from fused or per-expert layouts."""
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    _check_swiglu(act, type(experts).__name__)
    if hasattr(experts, "gate_up_proj"):
        gate_up = cast(torch.Tensor, experts.gate_up_proj).detach()  # nn.Parameter
        down = cast(torch.Tensor, experts.down_proj).detach()
        if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
            raise MoeA2AError(f"{type(experts).__name__} has biases or no gate: only bias-free SwiGLU experts are supported")
        if getattr(experts, "is_transposed", False):  # [E, H, 2I] / [E, I, H]
            gate_up = gate_up.transpose(1, 2)
            down = down.transpose(1, 2)
        if getattr(experts, "is_concatenated", True):
            w_gate, w_up = gate_up.chunk(2, dim=1)
        else:  # interleaved rows gate0, up0, gate1, up1, ...
            w_gate, w_up = gate_up[:, 0::2], gate_up[:, 1::2]
        return w_gate.contiguous(), w_up.contiguous(), down.contiguous()
    if isinstance(experts, torch.nn.ModuleList):
        names = ("gate_proj", "up_proj", "down_proj") if hasattr(experts[0], "gate_proj") else ("w1", "w3", "w2")
        stacked = [torch.stack([getattr(m, n).weight.detach() for m in experts]) for n in names]
        return stacked[0], stacked[1], stacked[2]
    raise MoeA2AError(f"unrecognised experts module {type(experts).__name__}: expected fused gate_up_proj/down_proj or a ModuleList")


def extract_moe(block: torch.nn.Module) -> Tuple[MoEWeights, RouterConfig]:
    """Global ``MoEWeights`` (same dtype as the block's experts; router in float32) and the
    ``RouterConfig`` reproducing the block's gate."""
    kind = _block_kind(block)
    gate: Any = block.gate  # transformers' router: its class and attributes vary by model
    w_gate, w_up, w_down = _experts_tensors(cast(torch.nn.Module, block.experts))
    num_experts = int(w_gate.shape[0])
    top_k = int(getattr(gate, "top_k", getattr(block, "top_k", 0)))
    router_weight = gate.weight.detach().float()
    bias = None
    shared = None
    if kind == "deepseek_v3":
        bias = gate.e_score_correction_bias.detach().float()
        router = RouterConfig(
            num_experts=num_experts, top_k=top_k, scoring="sigmoid",
            n_group=int(gate.num_group if hasattr(gate, "num_group") else gate.n_group),
            topk_group=int(gate.topk_group), renormalize=bool(gate.norm_topk_prob),
            routed_scaling_factor=float(gate.routed_scaling_factor), has_correction_bias=True,
        )
        mlp = getattr(block, "shared_experts", None)
        if mlp is not None:
            shared = SharedExpertWeights(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                                         mlp.down_proj.weight.detach())
    elif kind == "qwen3_moe":
        norm = getattr(gate, "norm_topk_prob", getattr(block, "norm_topk_prob", False))
        router = RouterConfig(num_experts=num_experts, top_k=top_k, scoring="softmax", renormalize=bool(norm))
    else:
        router = RouterConfig(num_experts=num_experts, top_k=top_k, scoring="softmax", renormalize=True)
    weights = MoEWeights(gate=router_weight.clone(), correction_bias=None if bias is None else bias.clone(),
                         w_gate=w_gate.clone(), w_up=w_up.clone(), w_down=w_down.clone(), shared=shared)
    return weights, router


def hf_forward(block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """transformers' own forward of ``block`` on ``[T, H]`` tokens → ``[T, H]``.

    The input is cast to the block's expert dtype and given the ``[1, T, H]`` shape the blocks
    expect; tuple outputs (4.x Mixtral/Qwen3 return ``(hidden, router_logits)``) keep the
    first item. Runs under ``torch.no_grad()``. ``T == 0`` returns an empty ``[0, H]``.
    """
    _block_kind(block)
    if hidden.dim() != 2:
        raise MoeA2AError(f"hidden has shape {tuple(hidden.shape)}; expected [T, H]")
    experts: Any = block.experts  # fused experts module or a ModuleList (duck-typed)
    dtype = experts.gate_up_proj.dtype if hasattr(experts, "gate_up_proj") else next(experts.parameters()).dtype
    if hidden.shape[0] == 0:
        return hidden.new_zeros((0, hidden.shape[1]), dtype=dtype)
    with torch.no_grad():
        out = block(hidden.to(dtype).unsqueeze(0))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.reshape(hidden.shape[0], hidden.shape[1])


__all__ = ["HF_CONFIG_DIR", "HF_MODEL_TYPES", "build_hf_block", "example_hf_config", "extract_moe",
           "hf_forward", "load_hf_config"]
