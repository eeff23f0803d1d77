"""Loading a compressed state dict into a fresh model: structural edits first, then states.

A fresh model has no compression state, so the keys ``...q_proj.ppq_state.mask_bits`` of a
compressed checkpoint would be unexpected, and its layers may have other shapes (removed blocks
and channels, shared-basis factors, kept LoRA adapters). :func:`enable_state_loading` registers
a load pre-hook that, for every module the state dict carries a ``ppq_state`` for (parents
before children), replays the structural edits its history records (``edits.registry``) and
attaches an empty :class:`~ppq_lightning.compressed.state.CompressionState`; the normal loading
then fills them. A state dict written during ``fit`` while a stage of it was unfinished (a
training stage training, a stage not fired yet, a ramp ramping) carries a fit record: a fresh
model completes a training stage as the model computed at that step, and warns with what the
checkpoint holds and which stages had not fired or finished (``edits.training``); a model
resuming the fit pops the record and loads the state as it is. :func:`require_state_loading`
makes a model without that hook refuse such a state dict with an error that says so, instead
of a list of unexpected keys.

A loaded state is checked before it is trusted: a non-finite parameter is refused before any
tensor is copied, and every loaded compressed layer is checked against its recorded mask and
grid (``compressed.invariants``) once the load (and a completion) is done, so a corrupt or edited
checkpoint (a bit flip: a weight at 1e37 on a 4-bit grid, a pruned weight non-zero) is refused
naming the layer instead of evaluated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ppq_lightning.compressed.history import FIT_RECORD, HistoryEntry
from ppq_lightning.compressed.invariants import check_invariants
from ppq_lightning.compressed.state import STATE_NAME, ensure_state, get_state
from ppq_lightning.edits.lora import check_adapter_records
from ppq_lightning.edits.registry import replay_entry
from ppq_lightning.edits.training import PendingCompletion, finish_completion, start_completion
from ppq_lightning.errors import CorruptStateError, InvariantError, PPQConfigError
from ppq_lightning.modules.attention import install_projection_views
from ppq_lightning.modules.tree import find_module

_LOADING_HOOK_FLAG = "_ppq_state_loading_enabled"


def replay_history(model: nn.Module, owner: str, history: list[HistoryEntry]) -> None:
    """Replay on ``model`` the structural edits of ``history`` (recorded on the module
    ``owner``) that the module does not carry already (a run resumed in the same process)."""
    target = find_module(model, owner)
    state = get_state(target) if target is not None else None
    done = set(state.stages) if state is not None else set()
    for entry in history:
        if entry["stage"] not in done:
            replay_entry(model, owner, entry, exists=target is not None)


def state_path(owner: str) -> str:
    """The state-dict path of the compression state of the module ``owner`` (``""``: the root)."""
    return f"{owner}.{STATE_NAME}" if owner else STATE_NAME


def state_owners(state_dict: dict, prefix: str = "") -> list[str]:
    """The modules a state dict carries a compression state for, parents before children
    (``""`` is the root module itself)."""
    marker, owners = f".{STATE_NAME}.", set()
    for key in state_dict:
        if not key.startswith(prefix):
            continue
        relative = key[len(prefix) :]
        if relative.startswith(STATE_NAME + "."):
            owners.add("")
        elif marker in relative:
            owners.add(relative.split(marker)[0])
    return sorted(owners)  # a parent's edits (removed blocks) before its children's


def check_finite_parameters(model: nn.Module, state_dict: dict, prefix: str = "") -> None:
    """Refuse a state dict holding a NaN or infinite value in a floating tensor that is not a
    buffer of ``model`` (a parameter, a compression state's scale, a replayed layer's factor: a
    corrupt file), before anything is replayed or copied. ``model``'s buffers may hold
    infinities by design (attention masks) and are not checked.

    Raises:
        PPQConfigError: naming the first such tensor and how many of its values are not finite.
    """
    buffers = {prefix + name for name, _ in model.named_buffers()}
    for key, value in state_dict.items():
        if not key.startswith(prefix) or key in buffers:
            continue
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if value.element_size() == 1:  # float8: isfinite is not implemented for every kind
                value = value.to(torch.float16)
            broken = int((~torch.isfinite(value)).sum())
            if broken:
                raise PPQConfigError(
                    f"the state dict holds {broken} NaN or infinite value(s) in {key} (of "
                    f"{value.numel()}): the checkpoint is corrupt (or its fit diverged), and "
                    "nothing was loaded. Load an earlier checkpoint."
                )


def load_module_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Load into ``module`` (a block of a model) a state dict of it written after a stage that
    may have changed its shapes: the structural edits its compression records name are
    replayed first (owners relative to ``module``, parents before children), empty compression
    states attached, then ``module.load_state_dict(state, strict=True)`` copies the tensors
    (a ``calibration.progress.BlockLoader`` for the stages that edit structure).

    Raises:
        PPQConfigError: for an edit kind this version cannot replay.
        RuntimeError: from ``load_state_dict`` when the state does not fit ``module``.
    """
    for owner in state_owners(state):
        extra = state.get(f"{state_path(owner)}._extra_state")
        if isinstance(extra, dict):
            replay_history(module, owner, extra.get("history", []))
        target = find_module(module, owner)
        if target is not None:
            ensure_state(target)
    module.load_state_dict(state, strict=True)


def enable_state_loading(model: nn.Module) -> None:
    """Let ``model.load_state_dict`` create the ``ppq_state`` children its input needs.

    Registers (once) a pre-hook on ``model`` that replays the recorded structural edits
    (removed blocks and channels, shared-basis factors, kept LoRA adapters) and attaches an
    empty :class:`~ppq_lightning.compressed.state.CompressionState` wherever the state dict has
    one. Every compression callback calls it in ``setup``, before Lightning restores a
    checkpoint. A state dict written during ``fit`` while a stage of it was unfinished (its fit
    record, see ``edits.training``) has the record removed before the load; unless ``model``
    is resuming that fit (it trains the stage itself, or a running fit of it restores the
    record), a training stage is completed after the load (a post-hook) as the model computed
    at that step, and a ``MidFitCheckpointWarning`` says what the state dict holds and which
    stages had not fired or finished their ramp.

    The loaded state is checked: a NaN or infinite parameter is refused before anything is
    replayed or copied (:func:`check_finite_parameters`), and after the load every layer the
    state dict carried a compression state for is checked against its mask and grid
    (``compressed.invariants.check_invariants``; a layer still training in a resumed fit is
    checked when its stage ends).

    Raises:
        PPQConfigError: (at load time) for LoRA adapters without a LoRAFineTune record, an
            edit kind this version cannot replay, a fit record this version cannot
            complete, or a non-finite parameter (nothing copied).
        CorruptStateError: (an ``InvariantError`` and a ``PPQConfigError``; at load time,
            after the tensors were copied: discard the model) a loaded layer whose weights are
            off its recorded mask or grid, naming it.
    """
    if getattr(model, _LOADING_HOOK_FLAG, False):
        return
    completing: list[PendingCompletion] = []  # from the pre-hook to the post-hook of one load
    loaded: list[str] = []  # the layers the state dict carries states for, to check after

    def attach_states(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        check_finite_parameters(module, state_dict, prefix)
        install_projection_views(module)  # states and adapters of ...self_attn.q_proj
        completing.clear()
        record = state_dict.pop(prefix + FIT_RECORD, None)  # torch hands hooks a copy
        if record is not None:
            pending = start_completion(module, record)  # re-injects adapters, attaches children
            if pending is not None:
                completing.append(pending)
        check_adapter_records(module, state_dict, prefix)
        loaded.clear()
        for owner in state_owners(state_dict, prefix):
            extra = state_dict.get(f"{prefix}{state_path(owner)}._extra_state")
            if isinstance(extra, dict):
                replay_history(module, owner, extra.get("history", []))
            target = find_module(module, owner)  # a replayed edit may have replaced it
            if target is not None:  # else reported by load_state_dict as unexpected keys
                ensure_state(target)
                loaded.append(owner)

    def complete(module: nn.Module, incompatible_keys: Any) -> None:
        while completing:
            finish_completion(module, completing.pop())
        try:
            check_invariants(module, loaded)
        except InvariantError as error:
            raise CorruptStateError(
                f"the state dict loaded into this {type(module).__name__} is not a consistent "
                f"compressed state: {error} The file is corrupt or was edited after it was "
                "written; do not use this model (load an earlier checkpoint, or compress again)."
            ) from error
        finally:
            loaded.clear()

    model.register_load_state_dict_pre_hook(attach_states)
    model.register_load_state_dict_post_hook(complete)
    setattr(model, _LOADING_HOOK_FLAG, True)


def require_state_loading(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` of a compressed state dict, before
    :func:`enable_state_loading` was called on ``model``, fail with an error that says so.

    Registers a pre-hook (call it before :func:`enable_state_loading`, e.g. in the model's
    constructor) that, unless the state loading is enabled by the time of the load, refuses a
    state dict carrying a compression state for a module that has none, before any tensor is
    copied. Also with ``strict=False``: the pre-hook cannot tell (torch passes its modules
    ``strict=True`` and sorts the keys out afterwards), and dropping the states would lose
    the masks and grids silently. A state dict written during ``fit`` while a stage of it was
    unfinished (it carries a fit record) is refused the same way: its training stage must be
    completed, and what it holds said.

    Raises:
        PPQConfigError: (at load time) naming the first such layer and
            ``enable_state_loading``.
    """

    def refuse(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        if getattr(module, _LOADING_HOOK_FLAG, False):
            return
        lacking = [
            owner
            for owner in state_owners(state_dict, prefix)
            if (target := find_module(module, owner)) is None or get_state(target) is None
        ]
        if lacking:
            what = (
                f"the compression state of {len(lacking)} layer(s) (e.g. "
                f"{prefix}{state_path(lacking[0])}) that this fresh {type(module).__name__} has "
                "no place for: it is a compressed checkpoint"
            )
        elif prefix + FIT_RECORD in state_dict:
            what = (
                f"a fit record ({prefix}{FIT_RECORD}): it was written during fit before every "
                "stage had finished (a training stage training, a stage not fired yet, a ramp "
                "ramping), and loading it must complete the training stage and say what it "
                "holds"
            )
        else:
            return
        raise PPQConfigError(
            f"the state dict holds {what}. Call ppq_lightning.edits.enable_state_loading(model) "
            "before load_state_dict (it replays the recorded structural edits and attaches the "
            "states), or load a Lightning checkpoint with load_from_checkpoint or "
            "ppq_lightning.export.checkpoint.load_lightning_checkpoint."
        )

    model.register_load_state_dict_pre_hook(refuse)
