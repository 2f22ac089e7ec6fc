"""Loading the policy model, its tokenizer and its frozen reference.

One loader for every model: a hub id or a local directory goes through `from_pretrained`. The embedded
default is first *materialised* as a local directory (a tiny Llama built deterministically from a
transformers config, with a tokenizer trained on the dataset's own texts) and then loaded by the same
path, so no code path is used by the tiny model alone.

With LoRA the reference is the same network with its adapters disabled: no second copy in memory. With
full fine-tuning the reference is a frozen copy.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "unk": "<|unk|>"}
ROLE_TOKENS = ["<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# float64: for checking exactness (impact scores, the loss arithmetic), not for training at scale
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `corpus`, with special tokens and a chat template.

    Byte-level so any text (including what a model generates later) round-trips; trained on the
    dataset's texts so the tiny model sees short sequences.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values()) + ROLE_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(corpus)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        additional_special_tokens=ROLE_TOKENS,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model_dir(build_cfg: Mapping[str, Any], corpus: list[str], cache_dir: str | Path) -> Path:
    """Materialise the tiny Llama and its tokenizer under `cache_dir`, keyed by config and corpus.

    Built in a temporary directory and renamed into place, so an interrupted build leaves no half cache.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    build_cfg = dict(build_cfg)
    key = _hash({"build": build_cfg, "corpus": hashlib.sha256("\n".join(sorted(set(corpus))).encode()).hexdigest()})
    target = Path(cache_dir) / f"tiny-{build_cfg.get('architecture', 'llama')}-{key}"
    if (target / "config.json").is_file():
        return target
    if build_cfg.get("architecture", "llama") != "llama":
        raise ValueError(f"model.build.architecture: only 'llama' can be built locally, got {build_cfg['architecture']!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus, int(build_cfg["vocab_size"]))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(build_cfg["hidden_size"]),
        intermediate_size=int(build_cfg["intermediate_size"]),
        num_hidden_layers=int(build_cfg["num_hidden_layers"]),
        num_attention_heads=int(build_cfg["num_attention_heads"]),
        num_key_value_heads=int(build_cfg.get("num_key_value_heads", build_cfg["num_attention_heads"])),
        max_position_embeddings=int(build_cfg["max_position_embeddings"]),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(build_cfg.get("tie_word_embeddings", True)),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(build_cfg.get("seed", 0)))
        model = LlamaForCausalLM(config)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built tiny model at %s", target)
    return target


def resolve_model_path(model_cfg: Mapping[str, Any], corpus: list[str] | None, cache_dir: str | Path) -> str:
    """The hub id or local path to load: as configured, or the tiny model materialised from `build`."""
    if model_cfg.get("name_or_path"):
        return str(model_cfg["name_or_path"])
    if not model_cfg.get("build"):
        raise ValueError("model: set model.name_or_path (hub id or local path) or a model.build section")
    if not corpus:
        raise ValueError("model.build: building the tiny model needs the dataset's texts for its tokenizer")
    return str(build_tiny_model_dir(model_cfg["build"], corpus, cache_dir))


class ModelNotFoundError(OSError):
    """model.name_or_path names nothing that can be loaded here (not on disk, not downloadable)."""


def _loading_errors() -> tuple[type[BaseException], ...]:
    """What transformers and huggingface_hub raise for a model they cannot find or fetch."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError

        errors += [HfHubHTTPError, HFValidationError]
    except ImportError:  # an older huggingface_hub: its errors are OSErrors
        pass
    return tuple(errors)


def not_found_message(what: str, path: str, revision: str | None, exc: BaseException) -> str:
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}"
    local = Path(path).expanduser()
    if local.is_dir():
        return (f"model.name_or_path={path!r}: the local directory holds no {what} that transformers can load "
                f"({reason}). It must hold a transformers model (config.json and its weights) and its tokenizer.")
    if path.startswith(("/", ".", "~")) or local.exists():
        return (f"model.name_or_path={path!r}: no such local directory. Give the directory of a transformers "
                "model (config.json, weights, tokenizer) with model.name_or_path=/path/to/model, or a hub id.")
    return (f"model.name_or_path={path!r} (model.revision={revision or 'null'}): its {what} could not be found "
            f"locally (in the Hugging Face cache) or downloaded from the hub ({reason}). Give a local directory "
            "with model.name_or_path=/path/to/model, or check the id and model.revision, the network (HF_HUB_OFFLINE "
            "forbids downloads) and, for a gated model, access to it (HF_TOKEN).")


@contextlib.contextmanager
def loading(what: str, path: str, model_cfg: Mapping[str, Any]) -> Iterator[None]:
    """Turn transformers' and huggingface_hub's errors for a model they cannot find into one that names
    model.name_or_path and model.revision and says how to give a local copy."""
    errors = _loading_errors()
    if Path(str(path)).expanduser().is_dir():
        errors += (ValueError,)  # transformers' word for a directory that holds no model
    try:
        yield
    except errors as exc:
        message = not_found_message(what, str(path), model_cfg.get("revision"), exc)
        if model_cfg.get("gguf_file"):
            message += (f" model.gguf_file={model_cfg['gguf_file']!r} names a .gguf file inside that folder or hub "
                        "repository (null: ordinary transformers weights).")
        raise ModelNotFoundError(message) from exc


def gguf_file_at(path: str, model_cfg: Mapping[str, Any]) -> str | None:
    """model.gguf_file when `path` holds it: a hub id, or a local folder with that file.

    A folder without it is one this project wrote (a run's adapter/ or model/, an export): ordinary
    transformers weights, loaded as such.
    """
    name = model_cfg.get("gguf_file")
    if not name:
        return None
    local = Path(str(path)).expanduser()
    if local.is_dir() and not (local / str(name)).is_file():
        return None
    return str(name)


def _source_kwargs(path: str, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What from_pretrained needs to find the files: revision, remote code and, for a GGUF checkpoint, its
    file name inside model.name_or_path (model.gguf_file)."""
    kwargs: dict[str, Any] = {
        "revision": model_cfg.get("revision"),
        "trust_remote_code": bool(model_cfg.get("trust_remote_code", False)),
    }
    gguf = gguf_file_at(path, model_cfg)
    if gguf:
        kwargs["gguf_file"] = gguf
    return kwargs


def load_tokenizer(path: str, model_cfg: Mapping[str, Any]):
    """The tokenizer at `path` (hub id or folder; with model.gguf_file, the one inside that GGUF file)."""
    from transformers import AutoTokenizer

    with loading("tokenizer", path, model_cfg):
        tok = AutoTokenizer.from_pretrained(path, **_source_kwargs(path, model_cfg))
    if tok.pad_token_id is None:
        # Padding is masked everywhere; reusing EOS as PAD is the usual choice for decoder-only models.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _disable_dropout(model: nn.Module) -> None:
    # With dropout the policy differs from the reference at theta_ref, biasing Delta and the impact scores.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def load_causal_lm(path: str, model_cfg: Mapping[str, Any]) -> nn.Module:
    """The model at `path` (hub id or folder) with model.dtype, revision, attention and dropout settings."""
    from transformers import AutoModelForCausalLM

    dtype_name = str(model_cfg.get("dtype", "float32"))
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {dtype_name!r}; expected one of {list(DTYPES)}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype_name], **_source_kwargs(path, model_cfg)}
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    with loading("model", path, model_cfg):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "gguf_file" in kwargs:
        _as_dense_model(model, kwargs["gguf_file"])
    if model_cfg.get("disable_dropout", True):
        _disable_dropout(model)
    return model


def _as_dense_model(model: nn.Module, gguf_file: str) -> None:
    """A GGUF checkpoint unpacked into ordinary float weights, made an ordinary model.

    transformers dequantizes GGUF weights at load time but may leave its GGUF quantizer attached, which
    marks the model untrainable and refuses save_pretrained; the weights themselves are plain tensors.
    """
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ValueError(f"model.gguf_file={gguf_file!r}: transformers kept the weights packed in GGUF blocks, "
                         "which cannot be trained; uninstall the `kernels` package so they load unpacked, or "
                         "give a transformers model folder with model.name_or_path and model.gguf_file=null")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)


def load_for_eval(path: str, model_cfg: Mapping[str, Any]) -> nn.Module:
    """A model to evaluate, frozen: a model folder or hub id, or a LoRA adapter folder on its base model
    (the path its adapter_config.json names)."""
    adapter_cfg = Path(str(path)).expanduser() / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{adapter_cfg}: names no base_model_name_or_path, so the adapter has no model to sit on")
        try:
            base = load_causal_lm(base_path, model_cfg)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"the adapter {path} sits on {base_path}, which cannot be loaded: {exc}") from exc
        model = PeftModel.from_pretrained(base, str(path))
    else:
        model = load_causal_lm(path, model_cfg)
    model.requires_grad_(False)
    return model.eval()


def load_policy(path: str, model_cfg: Mapping[str, Any]) -> tuple[nn.Module, nn.Module | None]:
    """The trainable policy and, for full fine-tuning, a frozen reference copy (None under LoRA)."""
    model = load_causal_lm(path, model_cfg)
    if model_cfg.get("gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Without this, LoRA over checkpointed frozen layers receives no gradient and silently trains nothing.
        model.enable_input_require_grads()
    lora = model_cfg.get("lora") or {}
    if lora.get("enabled", True):
        from peft import LoraConfig, get_peft_model

        targets = lora.get("target_modules", "all-linear")
        peft_cfg = LoraConfig(
            r=int(lora.get("r", 8)),
            lora_alpha=int(lora.get("alpha", 16)),
            lora_dropout=float(lora.get("dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else list(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_cfg), None
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return model, reference


@contextlib.contextmanager
def reference_of(policy: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The frozen reference pi_ref: a separate copy, or the policy with its LoRA adapters disabled."""
    if reference is not None:
        yield reference
        return
    tuner = getattr(policy, "base_model", None)
    if getattr(policy, "active_peft_config", None) is None or policy.active_peft_config.is_prompt_learning \
            or not hasattr(tuner, "disable_adapter_layers"):
        with policy.disable_adapter():  # type: ignore[operator]
            yield policy
        return
    # PeftModel.disable_adapter does the same after a survey of every layer's adapter state, which costs a
    # training step of the tiny model about 5 ms; the policy's adapters are all alike (this package makes them)
    tuner.disable_adapter_layers()
    try:
        yield policy
    finally:
        tuner.enable_adapter_layers()


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole, a collective every rank must join; any other tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def load_trainable(policy: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy whole trainable parameters (a selection's best, or ones gathered from shards) into a policy; a
    name it lacks, or one missing, is an error."""
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise RuntimeError(f"the trainable parameters to load do not match the policy: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def policy_is_reference(policy: nn.Module, reference: nn.Module | None) -> bool:
    """Whether the policy still computes pi_ref bit for bit: plain LoRA adapters whose B factors are all zero
    (their initialisation: each adds exactly 0), or a full copy whose parameters equal the reference's.
    Under FSDP every rank must call it (a sharded factor is gathered to be read)."""
    if reference is None:
        named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
        if not named or not all(".lora_A." in n or ".lora_B." in n for n, _ in named):
            return False  # e.g. DoRA's magnitudes: the adapted output is not the base's exactly
        return all(not bool(whole_tensor(p).detach().any()) for n, p in named if ".lora_B." in n)
    ref = dict(reference.named_parameters())
    return all(n in ref and torch.equal(p.detach(), ref[n].detach()) for n, p in policy.named_parameters())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
