"""The spec of one MoE layer (docs/design.md#the-spec): validated pydantic models and YAML I/O.

Every rule is checked when a spec is built, so nothing downstream (templates, compiler,
runtime) has to guard against a zero group size or a shape that does not split evenly.
Errors name the field by its dotted path, e.g. ``quant.group_size``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic._internal._model_construction import ModelMetaclass
from pydantic_core import PydanticCustomError

from .formats import DEFAULT_GROUP_SIZE, MODES

__all__ = [
    "LoRASpec",
    "MoESpec",
    "QuantSpec",
    "SpecError",
    "bundled_spec_names",
    "bundled_spec_path",
    "load_spec",
]

SPECS_DIR = Path(__file__).parent / "specs"

# The six LoRA matrices, in the order of every C signature and of ktgen.LoRAWeights.
LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")

# C symbol names are derived from MoESpec.name, hence the identifier pattern.
NAME_PATTERN = r"^[a-z][a-z0-9_]*$"

# hidden_size and intermediate_size slices are tiled in blocks of 32 by every ISA tier.
DIM_ALIGNMENT = 32


class SpecError(ValueError):
    """A spec that cannot be turned into a valid MoESpec: a bad file or name, or a field
    that breaks a rule of docs/design.md#the-spec (one line per problem, each naming the field
    by its dotted path). ``errors()`` gives pydantic's structured errors when validation failed
    (an empty list otherwise)."""

    def __init__(self, message: str, errors: list | None = None):
        super().__init__(message)
        self._errors = list(errors or [])

    def errors(self) -> list:
        return list(self._errors)


def _spec_error(err: ValidationError, source: str | None = None) -> SpecError:
    where = f"spec {source}: " if source else ""
    errors = err.errors()
    return SpecError("\n".join(where + _describe(e) for e in errors), errors)


class _SpecMeta(ModelMetaclass):
    # The constructor raises SpecError. Done in the metaclass, not in __init__: pydantic calls
    # a custom __init__ for nested models too, which would wrap the error a second time.
    def __call__(cls, *args: Any, **kwargs: Any):
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as err:
            raise _spec_error(err) from None


class _SpecModel(BaseModel, metaclass=_SpecMeta):
    # strict: a YAML `true` or "2048" is a mistake in a spec, not a value to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # Building a spec (the constructor, model_validate, replace) raises SpecError naming
    # each bad field, not pydantic's ValidationError.
    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as err:
            raise _spec_error(err) from None

    @classmethod
    def model_validate_json(cls, json_data: Any, *args: Any, **kwargs: Any):
        try:
            return super().model_validate_json(json_data, *args, **kwargs)
        except ValidationError as err:
            raise _spec_error(err) from None


class QuantSpec(_SpecModel):
    """How the frozen base weights are stored (docs/design.md#base-weight-formats)."""

    mode: Literal[MODES] = "bf16"   # one per weight format (ktgen.formats)
    group_size: Annotated[int, Field(ge=1)] | None = Field(default=None, validate_default=True)

    @field_validator("group_size")
    @classmethod
    def _group_size_for_mode(cls, group_size: int | None, info: ValidationInfo) -> int | None:
        mode = info.data.get("mode")
        if mode is None:  # mode itself was invalid and is reported on its own
            return group_size
        if mode not in DEFAULT_GROUP_SIZE:
            if group_size is not None:
                raise ValueError(f"quant mode {mode!r} is not grouped; leave group_size unset")
            return None
        return DEFAULT_GROUP_SIZE[mode] if group_size is None else group_size


class LoRASpec(_SpecModel):
    """The LoRA adapters of every expert's gate, up and down projections."""

    rank: int = Field(default=16, ge=1, le=256)
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, validate_default=True
    )
    use_rslora: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("alpha")
    @classmethod
    def _default_alpha(cls, alpha: float | None, info: ValidationInfo) -> float | None:
        rank = info.data.get("rank")
        if alpha is None and rank is not None:
            return 2.0 * rank
        return alpha

    @property
    def scale(self) -> float:
        """The factor s that multiplies every B(Ax) term (docs/design.md#the-math)."""
        assert self.alpha is not None  # filled in by validation
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank


class MoESpec(_SpecModel):
    """One MoE feed-forward layer: shapes, quantization, LoRA and partitioning."""

    name: str = Field(pattern=NAME_PATTERN)
    expert_num: int = Field(ge=1)
    num_experts_per_tok: int = Field(ge=1)
    hidden_size: int = Field(ge=DIM_ALIGNMENT, multiple_of=DIM_ALIGNMENT)
    intermediate_size: int = Field(ge=DIM_ALIGNMENT, multiple_of=DIM_ALIGNMENT)
    max_len: int = Field(default=4096, ge=1)
    quant: QuantSpec = QuantSpec()
    lora: LoRASpec | None = LoRASpec()
    tp_count: int = Field(default=1, ge=1)
    max_cache_depth: int = Field(default=2, ge=1)
    isa: Literal["auto", "amx", "avx512bf16", "avx512", "avx2", "generic"] = "auto"
    threads: Annotated[int, Field(ge=1)] | None = None
    # The clamped SwiGLU of DeepSeek-V4 (transformers' config.swiglu_limit = L):
    # h = silu(min(g, L)) * clamp(u, -L, L), with g and u the LoRA-adapted pre-activations.
    swiglu_limit: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> MoESpec:
        # Rules that involve several fields run once each field is valid on its own;
        # they are raised as one ValidationError so each keeps its own dotted location.
        problems: list[tuple[tuple[str, ...], Any, str]] = []
        if self.num_experts_per_tok > self.expert_num:
            problems.append((
                ("num_experts_per_tok",),
                self.num_experts_per_tok,
                f"must be at most expert_num ({self.expert_num})",
            ))
        slice_alignment = DIM_ALIGNMENT * self.tp_count
        if self.intermediate_size % slice_alignment:
            problems.append((
                ("intermediate_size",),
                self.intermediate_size,
                f"must be a multiple of {DIM_ALIGNMENT} x tp_count = {slice_alignment} "
                "so that each TP partition gets an aligned, equal slice",
            ))
        group_size = self.quant.group_size
        if group_size is not None:
            dims = [("hidden_size", self.hidden_size)]
            # A slice that does not split evenly is already reported above.
            if self.intermediate_size % self.tp_count == 0:
                dims.append(("intermediate_size / tp_count", self.intermediate_per_partition))
            for dim_name, dim in dims:
                if dim % group_size:
                    problems.append((
                        ("quant", "group_size"),
                        group_size,
                        f"{group_size} does not divide {dim_name} ({dim})",
                    ))
        if problems:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    {
                        "type": PydanticCustomError("spec_rule", message),
                        "loc": loc,
                        "input": value,
                    }
                    for loc, value, message in problems
                ],
            )
        return self

    @property
    def intermediate_per_partition(self) -> int:
        """The slice of intermediate_size that each TP partition holds."""
        return self.intermediate_size // self.tp_count

    def replace(self, **changes: Any) -> MoESpec:
        """A re-validated copy with ``changes`` applied.

        ``quant`` and ``lora`` may be given as dicts; a dict replaces the whole sub-spec
        (unset keys take their defaults), so derived values such as alpha = 2 x rank and
        the mode's group size are recomputed rather than carried over.
        """
        data = self.model_dump()
        data.update(changes)
        return type(self).model_validate(data)

    def to_yaml(self) -> str:
        """The complete spec, every default spelled out, as YAML that from_yaml reads back."""
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> MoESpec:
        """Parse and validate YAML text; ``source`` names it in SpecError messages."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SpecError(f"spec {source}: not valid YAML: {_one_line(err)}") from err
        if not isinstance(data, dict):
            found = "an empty document" if data is None else f"a {type(data).__name__}"
            raise SpecError(f"spec {source}: expected a mapping of spec fields, got {found}")
        try:
            return cls.model_validate(data)
        except SpecError as err:
            raise _spec_error_at(err, source) from None


def _spec_error_at(err: SpecError, source: str) -> SpecError:
    lines = [f"spec {source}: {line}" for line in str(err).splitlines()]
    return SpecError("\n".join(lines), err.errors())


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The spec model that holds the keys at ``loc``, or None outside the spec tree."""
    model: type[BaseModel] = MoESpec
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        nested = next(
            (t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
             if isinstance(t, type) and issubclass(t, BaseModel)),
            None,
        )
        if nested is None:
            return None
        model = nested
    return model


def _describe(error: Any) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = f" (allowed: {', '.join(model.model_fields)})" if model else ""
        return f"unknown key '{path}'{allowed}"
    message = error["msg"]
    value = error.get("input")
    if isinstance(value, (bool, int, float, str)) or value is None:
        message += f" (got {value!r})"
    return f"field '{path}': {message}"


def bundled_spec_names() -> list[str]:
    """Names of the specs shipped in ktgen/specs, e.g. 'qwen3-30b-a3b'."""
    return sorted(path.stem for path in SPECS_DIR.glob("*.yaml"))


def bundled_spec_path(name: str) -> Path:
    """The YAML file of a bundled spec; SpecError lists the bundled names if unknown."""
    names = bundled_spec_names()
    if name not in names:
        raise SpecError(f"unknown spec name {name!r}; bundled specs: {', '.join(names)}")
    return SPECS_DIR / f"{name}.yaml"


def load_spec(path_or_name: str | os.PathLike[str]) -> MoESpec:
    """Load a spec from a .yaml/.yml file or by the name of a bundled spec."""
    text = os.fspath(path_or_name)
    looks_like_path = (
        isinstance(path_or_name, os.PathLike)
        or text.endswith((".yaml", ".yml"))
        or os.sep in text
        or "/" in text
    )
    if looks_like_path:
        path = Path(text)
        try:
            content = path.read_text(encoding="utf-8")
        except OSError as err:
            raise SpecError(f"spec {path}: cannot read: {err.strerror or err}") from err
        except UnicodeDecodeError as err:
            raise SpecError(f"spec {path}: not valid YAML: not UTF-8 text") from err
        return MoESpec.from_yaml(content, source=str(path))
    return MoESpec.from_yaml(
        bundled_spec_path(text).read_text(encoding="utf-8"), source=text
    )
