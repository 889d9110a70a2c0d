"""Configuration: one frozen dataclass per stage, and :class:`RunConfig` holding them all.

Defaults live here and nowhere else. A YAML file can say everything the CLI flags can say; the CLI
overlays only the flags the user actually typed. Unknown keys are an error that lists them and the
valid ones. The resolved config (every default written out) goes into every run directory.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

SchedulerKind = Literal["ddim", "ddpm"]
T = TypeVar("T")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name}={value} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class TrainTargetConfig:
    """Training a diffusers ``UNet2DModel`` target for memorization studies."""

    data: str = "digits:100"
    resize: int | None = None
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    attention: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    checkpoint_every: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "checkpoint_every", "num_train_timesteps", "layers_per_block")
        if not self.block_out_channels:
            raise ValueError("block_out_channels=() must name at least one block width")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels={self.block_out_channels} must all be divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Unguided sampling of the synthetic set (SIDE step 1, and the UnCond baseline)."""

    n: int = 1000
    seed: int = 0
    scheduler: SchedulerKind = "ddim"
    steps: int = 50
    eta: float = 0.0
    batch_size: int = 64
    shard_size: int = 512

    def __post_init__(self) -> None:
        _positive(self, "n", "steps", "batch_size", "shard_size")
        if self.eta < 0:
            raise ValueError(f"eta={self.eta} must be >= 0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one audit run needs; written resolved to ``run/config.yaml``."""

    model: str = "demo"
    train: str | None = None
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


# --------------------------------------------------------------------------------------------------
# dict / YAML conversion


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build config dataclass ``cls`` from a (possibly partial) dict, checking keys and types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or cls.__name__!r} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f" in section {where!r}" if where else ""
        raise ValueError(f"unknown config key(s){section}: {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{path}={value!r} is not allowed")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{path}={value!r} must be one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={value!r} must be a list")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{path}={value!r} must be a string")
        return str(value)
    return value  # pragma: no cover - every field type above is handled


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a clear error."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively overlay ``overrides`` on ``base`` (nested dicts merge, other values replace)."""
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
