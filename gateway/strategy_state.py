"""A Flower strategy's server-side state, saved with each release and restored after a restart.

Most Flower strategies hold nothing between rounds but the model (which the
lineage keeps). These do, and lose it on a restart unless it is saved:

    FedAdam, FedYogi, FedAdagrad (FedOpt)   first and second moments `m_t`, `v_t`
    FedAvgM                                 the server momentum `momentum_vector`
    the adaptive-clipping DP wrappers       the clipping norm they adapt each round
    a DP wrapper's privacy accountant       what the run has spent (`accountant`, gateway/privacy.py)

A user's strategy names its own state in a class attribute,
`starling_state = ("attribute", ...)`. The DP wrappers' inner strategy is
walked too (`strategy.strategy`). What is saved: None, numbers, numpy arrays,
and dicts or lists of arrays, as one `.npz` blob (no pickle); an `accountant`
attribute with `state_dict()` / `load_state_dict()` (Flower's PrivacyAccountant
protocol) as the JSON of its `state_dict()` in the same blob.

When the configured strategy changed since the state was saved, the gateway
restores the accountant alone (`restore(..., privacy_only=True)`): another
strategy's moments mean nothing, but the privacy the lineage spent stays spent.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np

from protocol.logs import event

log = logging.getLogger("starling.gateway.strategy_state")
MAX_DEPTH = 4  # wrappers within wrappers
ACCOUNTANT = "accountant"


def _declared(strategy: Any) -> tuple[str, ...]:
    from flwr.serverapp.strategy import FedAvgM
    from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase
    from flwr.serverapp.strategy.fedopt import FedOpt

    names = tuple(getattr(strategy, "starling_state", ()))
    if isinstance(strategy, FedOpt):
        names += ("m_t", "v_t")
    if isinstance(strategy, FedAvgM):
        names += ("momentum_vector",)
    if isinstance(strategy, DifferentialPrivacyAdaptiveBase):
        names += ("clipping_norm",)
    return names


def _accountant(strategy: Any) -> Any:
    """The strategy's privacy accountant, if it has one that can say and take its state."""
    accountant = getattr(strategy, ACCOUNTANT, None)
    if callable(getattr(accountant, "state_dict", None)) and callable(getattr(accountant, "load_state_dict", None)):
        return accountant
    return None


def _strategies(strategy: Any) -> list[tuple[str, Any]]:
    """(path, strategy) for the strategy and the ones it wraps."""
    out, path = [], ""
    for _ in range(MAX_DEPTH):
        out.append((path, strategy))
        inner = getattr(strategy, "strategy", None)
        if inner is None or inner is strategy:
            break
        path, strategy = f"{path}strategy.", inner
    return out


def _flatten(name: str, value: Any, out: dict[str, np.ndarray]) -> None:
    if value is None:
        out[f"{name}|none"] = np.zeros(0)
    elif isinstance(value, dict):
        out[f"{name}|dict"] = np.array(list(value), dtype=str)
        for i, key in enumerate(value):
            out[f"{name}|dict|{i}"] = np.asarray(value[key])
    elif isinstance(value, (list, tuple)):
        out[f"{name}|list"] = np.array(len(value))
        for i, item in enumerate(value):
            out[f"{name}|list|{i}"] = np.asarray(item)
    elif isinstance(value, (bool, int, float, np.number, np.ndarray)):
        out[f"{name}|array"] = np.asarray(value)
    else:
        raise TypeError(f"strategy state {name} is a {type(value).__name__}; only numbers and arrays are saved")


def capture(strategy: Any) -> bytes | None:
    """The strategy's state as bytes, or None when it keeps none."""
    flat: dict[str, np.ndarray] = {}
    for path, inner in _strategies(strategy):
        for name in _declared(inner):
            _flatten(path + name, getattr(inner, name, None), flat)
        accountant = _accountant(inner)
        if accountant is not None:
            flat[f"{path}{ACCOUNTANT}|json"] = np.array(json.dumps(accountant.state_dict(), sort_keys=True))
    if not flat:
        return None
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    return buffer.getvalue()


def restore(strategy: Any, data: bytes, privacy_only: bool = False) -> list[str]:
    """Put saved state back into the strategy (and the ones it wraps); return the attributes set.

    `privacy_only`: only the privacy accountant's record, none of the strategies' own state (the
    gateway's strategy changed since the state was saved: its moments or momentum mean nothing to
    another strategy, but what the lineage's releases spent of the privacy budget stays spent).
    Raises ValueError when the bytes are not a saved state.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files}
    except Exception as exc:  # noqa: BLE001 (whatever numpy raises for a bad file)
        raise ValueError(f"not a saved strategy state: {exc}") from exc
    restored = [] if privacy_only else _restore_declared(strategy, flat)
    return restored + _restore_accountants(strategy, flat)  # last: a record it cannot take leaves the rest restored


def _restore_declared(strategy: Any, flat: dict[str, np.ndarray]) -> list[str]:
    restored = []
    for path, inner in _strategies(strategy):
        for name in _declared(inner):
            key = path + name
            if f"{key}|none" in flat:
                value: Any = None
            elif f"{key}|dict" in flat:
                value = {str(k): flat[f"{key}|dict|{i}"] for i, k in enumerate(flat[f"{key}|dict"])}
            elif f"{key}|list" in flat:
                value = [flat[f"{key}|list|{i}"] for i in range(int(flat[f"{key}|list"]))]
            elif f"{key}|array" in flat:
                array = flat[f"{key}|array"]
                value = array.item() if array.ndim == 0 else array
            else:
                continue
            setattr(inner, name, value)
            restored.append(key)
    return restored


def _restore_accountants(strategy: Any, flat: dict[str, np.ndarray]) -> list[str]:
    """Each saved accountant record into the accountant at the same place among the wrappers; one record and
    one accountant go together wherever each sits (a [defense] added or removed moves the DP wrapper)."""
    saved = [key for key in flat if key.endswith(f"{ACCOUNTANT}|json")]
    live = [(path, accountant) for path, inner in _strategies(strategy)
            if (accountant := _accountant(inner)) is not None]
    if saved and not live:
        event(log, "privacy.state_not_restored", logging.WARNING,
              reason="the saved state has a privacy accountant, the strategy now has none")
    if len(saved) == 1 and len(live) == 1:
        pairs = [(saved[0], *live[0])]
    else:
        pairs = [(f"{path}{ACCOUNTANT}|json", path, accountant) for path, accountant in live]
    restored = []
    for key, path, accountant in pairs:
        if key not in flat:
            continue
        try:
            accountant.load_state_dict(json.loads(str(flat[key])))
        except (ValueError, TypeError, KeyError) as exc:  # (json.JSONDecodeError is a ValueError)
            event(log, "privacy.state_not_restored", logging.WARNING, reason=str(exc))
            continue
        restored.append(path + ACCOUNTANT)
    return restored
