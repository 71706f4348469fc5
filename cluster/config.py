"""The job config: one pydantic model composed of each package's section, loaded from YAML plus
`a.b=value` overrides. Unknown keys and bad values fail with a message naming the key and what is allowed."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from actors.config import RolloutConfig
from buffer_service.config import BufferConfig
from common.config import StrictConfig
from data.config import DataConfig
from learner.config import LearnerConfig
from policy.config import ModelConfig, ProcessorConfig
from reward_workers.config import RewardConfig


class PipelineConfig(StrictConfig):

    steps: int = Field(20, ge=0, description="learner steps in this stage")
    prompts_per_step: int = Field(4, ge=1, description="fresh groups per training batch")
    replay_per_group: int = Field(4, ge=0, description="G_off: replayed samples per fresh group (0 = plain GRPO)")
    max_staleness: int = Field(0, ge=0, description="policy versions between generation and training (0 = sync)")
    max_prompts_in_flight: int = Field(8, ge=1)
    eval_items: int = Field(16, ge=0, description="held-out prompts evaluated before and after the stage (0 = none); "
                            "the synthetic eval split's size")
    eval_every: int = Field(0, ge=0, description="also evaluate the held-out prompts every this many learner "
                            "steps (the history row's heldout_accuracy; 0 = before and after the stage only)")
    checkpoint_every: int = Field(10, ge=1)
    worker_wait_s: float = Field(600.0, gt=0, description="a rollout worker whose process or node died is waited "
                                 "for while the others take its tasks; with no worker answering, the job stops "
                                 "(exit 3, resumable) after this many seconds")
    max_scoring_retries: int = Field(3, ge=0, description="a group whose scoring failed (its scorer names the error) "
                                     "is generated and scored again this many times, then left for the next resume")
    max_weight_load_failures: int = Field(3, ge=0, description="a rollout worker may fail to load the published "
                                          "weights this many times in a row (it generates with the weights it has "
                                          "meanwhile); one more stops the job")
    metrics_port: int = Field(0, ge=0, description="Port of the driver's /metrics (0 = a free one); the components' endpoints always take free ones")


# Ray's own resource names: asked for with num_cpus / num_gpus, never as custom resources.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class RoleResources(StrictConfig):
    """What one actor of a role asks Ray for; its placement-group bundle holds exactly this."""

    num_cpus: float = Field(0, ge=0, description="logical CPUs per actor (Ray's num_cpus)")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor; null = as without a placement section "
                                   "(on a cluster with GPUs: rollout tensor_parallel_size, learner 1, judge "
                                   "max(reward.judge.num_gpus, 1); reward 0; none on a cluster without GPUs)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources per actor, e.g. "
                                        "{rollout_node: 1}: only nodes started with them (ray start --resources) "
                                        "take the actor")

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, qty in value.items():
            if name in RAY_BUILTIN_RESOURCES:
                raise ValueError(f"{name!r} is Ray's own resource, not a custom one: use num_cpus / num_gpus")
            if qty <= 0:
                raise ValueError(f"{name}: {qty} must be > 0 (leave the resource out to ask for none)")
            if qty > 1 and not float(qty).is_integer():
                raise ValueError(f"{name}: {qty}: Ray takes fractional quantities only below 1")
        return value

    @model_validator(mode="after")
    def _asks_for_something(self) -> RoleResources:
        # an empty bundle is refused by Ray; a role that needs nothing is simply left out of the section
        if not self.num_cpus and not self.num_gpus and not self.resources:
            raise ValueError("asks for no resources: give num_cpus, num_gpus or resources, or leave the role out")
        return self


class PlacementConfig(StrictConfig):
    """Where each role's actors run on a cluster of several nodes. Empty (the default): on a cluster with GPUs one
    GPU bundle per rollout engine, learner rank and local judge, nothing reserved without GPUs. A role given here
    gets one bundle per actor (rollout: rollout.num_workers, reward: reward.num_workers, judge: 1 when a local
    judge runs, learner: learner.num_ranks) in one placement group, so the job starts whole or not at all."""

    strategy: Literal["PACK", "SPREAD"] = Field("PACK", description="PACK: as few nodes as the bundles' resources "
                                                "allow; SPREAD: over as many nodes as possible")
    timeout_s: float = Field(600.0, gt=0, description="how long to wait for the cluster to place every bundle")
    rollout: RoleResources | None = None
    reward: RoleResources | None = None
    judge: RoleResources | None = None
    learner: RoleResources | None = None

    def roles(self) -> dict[str, RoleResources]:
        """The configured roles."""
        return {role: res for role in ("rollout", "reward", "judge", "learner")
                if (res := getattr(self, role)) is not None}


class StorageConfig(StrictConfig):
    """How the folders the job reads (the model, the prompt data) reach the nodes (common/node_files.py)."""

    shared_paths: list[str] = Field(
        default_factory=list, description="folders every node has at the same path (a shared filesystem, or copied "
        "there before the job): read where they are. Any other folder a component reads is shipped through Ray's "
        "object store, once per node, when the cluster has more than one node")
    max_ship_mb: float = Field(2048, gt=0, description="largest folder shipped through the object store; a larger "
                               "one is refused at start, naming it")

    @field_validator("shared_paths")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        for p in paths:
            if not os.path.isabs(p):
                raise ValueError(f"{p!r} is not an absolute path (a shared path is the same on every node)")
        return paths


class JobConfig(StrictConfig):

    name: str = "avatar"
    stage: Literal[0, 1, 2, 3] = 1
    seed: int = 0
    run_dir: str = "runs"
    init_from: str | None = Field(None, description="checkpoint folder this stage starts from")
    model: ModelConfig = Field(default_factory=ModelConfig)
    processor: ProcessorConfig = Field(default_factory=ProcessorConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _audio_in_video_has_a_track(self) -> JobConfig:
        """processor.use_audio_in_video interleaves only a video's own audio track: refused where the synthetic
        data would give it none (every item a silent video plus a separate wav)."""
        if (self.processor.use_audio_in_video and self.data.manifest is None
                and self.data.synth.separate_audio_fraction >= 1.0):
            raise ValueError(
                "processor.use_audio_in_video is true but data.synth.separate_audio_fraction is 1: every synthetic "
                "video is silent with its audio in a separate wav, which stays a separate item, so nothing would be "
                "interleaved. Lower data.synth.separate_audio_fraction or set processor.use_audio_in_video: false")
        return self

    @model_validator(mode="after")
    def _broadcast_has_a_receiver(self) -> JobConfig:
        if self.learner.transport in ("gloo", "nccl") and self.rollout.engine != "vllm":
            raise ValueError(f"learner.transport {self.learner.transport} is received by vLLM's weight-transfer "
                             "engine: it needs rollout.engine vllm (or learner.transport object_store)")
        return self

    @model_validator(mode="after")
    def _judge_is_configured(self) -> JobConfig:
        """An RL stage whose reward weights the LLM judge (reward.weights, else the stage's defaults) must
        name a judge: refused here, at load, rather than scored by a random model or not at all."""
        from reward_workers.config import STAGE_WEIGHTS

        weights = self.reward.weights
        if weights is None:
            weights = STAGE_WEIGHTS.get(self.stage, {})
        if self.stage == 0 or not weights.get("judge"):
            return self
        jc = self.reward.judge
        why = f"stage {self.stage} weights the LLM judge (judge weight {weights['judge']}) but"
        if jc.backend == "openai" and not jc.endpoint:
            raise ValueError(
                f"{why} reward.judge.backend is openai and reward.judge.endpoint is not set: set "
                "reward.judge.endpoint (the base URL of an OpenAI-compatible server), or use "
                "reward.judge.backend: local with reward.judge.model_path"
            )
        if jc.backend == "local" and not jc.model_path and not jc.allow_tiny:
            raise ValueError(
                f"{why} no judge model is configured: set reward.judge.model_path (a local judge model "
                "folder, e.g. a Qwen2.5-Omni checkpoint) or reward.judge.backend: openai with reward.judge.endpoint; "
                "tests and demos may set reward.judge.allow_tiny: true to judge with a tiny random model"
            )
        return self


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what is allowed."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """'learner.lr=1e-6' -> (['learner', 'lr'], 1e-6). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
    return parts, value


def apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` inside `model` (for 'unknown key' messages)."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = _unwrap_model(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _unwrap_model(annotation: Any) -> Any:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] = JobConfig) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            lines.append(f"  {key}: unknown key; allowed keys here: {', '.join(allowed)}")
        else:
            got = err.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"  {key}: {err['msg']}{got_text}")
    return "\n".join(lines)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml_tree(path: Path, _seen: tuple = ()) -> dict:
    """A YAML mapping; `base: other.yaml` (relative to this file) is loaded first and overlaid, so a config
    can say only how it differs (the ablations say just that)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return deep_merge(read_yaml_tree(path.parent / base, (*_seen, path.resolve())), tree)


# --- paths named by a config: checked when it loads, so a typo stops here and not deep inside a Ray worker --

MODEL_PATH_KEYS = ("init_from", "model.path", "reward.judge.model_path")  # Hugging Face model folders
FILE_PATH_KEYS = ("data.manifest", "data.eval_manifest")
PATH_KEYS = MODEL_PATH_KEYS + FILE_PATH_KEYS
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def _get(cfg: BaseModel, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def model_folder_problem(path: Path) -> str | None:
    """Why `path` is not a loadable Hugging Face model folder (config.json and weights), or None."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a folder (expected a Hugging Face model folder)"
    if not (path / "config.json").is_file():
        return "has no config.json (expected a Hugging Face model folder: a checkpoint or a run's export/)"
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        return "has no weights (*.safetensors or *.bin)"
    return None


def check_config_paths(cfg: JobConfig, keys: typing.Iterable[str] = PATH_KEYS, source: str = "config") -> None:
    """Every path the config names among `keys` must exist: model folders with config.json and weights,
    manifests as files. Raises ConfigError naming each key at fault and its path. Relative paths are
    relative to the working directory, as everywhere else."""
    problems = []
    for key in keys:
        value = _get(cfg, key)
        if not value:
            continue
        path = Path(value)
        if key in MODEL_PATH_KEYS:
            problem = model_folder_problem(path)
        else:
            problem = None if path.is_file() else ("is not a file" if path.exists() else "does not exist")
        if problem:
            problems.append(f"  {key}: {value} {problem}")
    if problems:
        raise ConfigError(f"invalid config ({source}):\n" + "\n".join(problems))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                unchecked_paths: typing.Collection[str] = ()) -> JobConfig:
    """Load a YAML config (or the defaults when path is None) and apply `a.b=value` overrides. The paths it
    names are checked (check_config_paths) except those in `unchecked_paths`: the curriculum sets a later
    stage's init_from after loading, and run_stage checks it when the stage starts."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        tree = read_yaml_tree(Path(path))
        source = str(path)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        cfg = JobConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    check_config_paths(cfg, [k for k in PATH_KEYS if k not in unchecked_paths], source)
    return cfg


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
