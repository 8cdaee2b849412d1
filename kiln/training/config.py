"""Typed configuration of a training run, one section per component.

The model section (`kiln.models.config`: a flavor plus overrides) knows nothing of
DeepSpeed; the objective section defaults to the model family's objective; `zero`, `optim` and `precision` are turned
into a DeepSpeed config by `kiln.training.engine`. A train recipe is these sections plus
the job fields that `kiln.platform.recipes` adds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from kiln.contracts import RecipePath, StrictModel
from kiln.models.config import ModelConfig
from kiln.training.host_memory import HostMemory
from kiln.training.objectives.config import OBJECTIVE_ARCHS, ObjectiveConfig

__all__ = [
    "CheckpointConfig",
    "DataBalanceConfig",
    "DataConfig",
    "EvalConfig",
    "Launcher",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "Placement",
    "TrainConfig",
    "ZeroConfig",
]

#: How training ranks are started (`kiln.training.launch`): Ray Train workers, local
#: subprocesses, or one rank per process started by torchrun / srun.
Launcher = Literal["ray", "local", "torchrun"]
#: Where Ray Train places its workers: Ray's placement-group strategies, lower case.
Placement = Literal["pack", "spread", "strict_pack", "strict_spread"]


class DataBalanceConfig(StrictModel):
    """Online MetaCLIP balancing: a new balanced sample of the dataset every epoch."""

    mode: Literal["off", "online"] = Field(
        default="off",
        description="online: epoch e holds a sample when one of its metadata entries' draws "
        "from (seed, e, uid, entry) succeeds with p = min(1, t / count), MetaCLIP 1.2's "
        "online balancing (kiln.training.online_balance); the dataset needs the entry "
        "counts curation writes with a metaclip_balance stage (best: t: null, the matched "
        "set); off: every sample, every epoch",
    )
    t: int | None = Field(
        default=None,
        ge=1,
        description="per-entry count threshold of online balancing (may differ from the "
        "curation's t; at most it when the dataset was balanced offline)",
    )

    @model_validator(mode="after")
    def _check_t(self) -> DataBalanceConfig:
        if self.mode == "online" and self.t is None:
            raise ValueError(
                "data.balance.mode is online but data.balance.t is not set: give the "
                "per-entry threshold, e.g. data.balance: {mode: online, t: 20000}"
            )
        if self.mode == "off" and self.t is not None:
            raise ValueError(
                f"data.balance.t={self.t} is set but data.balance.mode is off: set "
                "mode: online to balance every epoch, or drop t"
            )
        return self


class DataConfig(StrictModel):
    """The WebDataset loader: what it reads and how it orders samples."""

    dataset: RecipePath = Field(
        description="folder holding manifest.json (output of `kiln curate`)",
    )
    batch_size: int = Field(default=32, ge=1, description="samples per rank per micro-step")
    num_workers: int = Field(
        default=1,
        ge=0,
        description="loader workers per rank, each making every num_workers-th batch from "
        "its own share of the rank's samples: the sample order depends on it (0 reads as "
        "one worker in the rank's process, the same batches as 1)",
    )
    worker_processes: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="where the loader workers run: 'always' as processes of their own, "
        "decoding while the rank computes; 'never' in the rank's process, taking turns as "
        "the processes would (the same batches, without the processes and each batch's "
        "hand-over); 'auto' in the rank's process when CPU ranks have a thread on every core "
        "of their node, else as processes (a worker process then only takes turns with "
        "the ranks for their cores: clip-tiny trained 6-16% slower with them at 2 ranks "
        "on 2 cores)",
    )
    shuffle_buffer: int = Field(
        default=256, ge=1, description="samples each loader worker shuffles among (seeded)"
    )
    augment: bool = Field(default=True, description="random resized crop + flip, seeded by uid")
    fast_decode: bool = Field(
        default=False,
        description="decode JPEGs at the smallest DCT scale (1/8..1) the crop still fills at "
        "the model's input size, and resize with torch's vectorized kernel: 1.8-2.8x the "
        "loader's samples per core on photos, but the pixels differ from the full-size "
        "decode evaluation uses (off by default: on the quickstart's small images it cost "
        "zero-shot accuracy and was not faster); a run resumes only with the value it "
        "started with (false: full-size decode + PIL resize, as before the setting existed)",
    )
    balance: DataBalanceConfig = Field(
        default_factory=DataBalanceConfig,
        description="online balancing (default off); a run resumes only with the balance "
        "it started with",
    )
    verify_shards: bool = Field(
        default=True,
        description="hash every shard once before the ranks start and compare with the "
        "sha256 manifest.json records (a damaged shard is one clear error naming it; "
        "milliseconds for the quickstart, one read of the dataset per launch: turn off for "
        "datasets much larger than the page cache)",
    )


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay; clipping and accumulation."""

    lr: float = Field(default=1e-3, gt=0, description="peak learning rate, after warmup")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW's decoupled weight decay")
    betas: tuple[float, float] = Field(default=(0.9, 0.98), description="AdamW's beta1, beta2")
    eps: float = Field(default=1e-6, gt=0, description="AdamW's epsilon")
    warmup_steps: int = Field(default=10, ge=0, description="steps of linear warmup from 0 to lr")
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="the cosine decay ends at lr x this at max_steps"
    )
    grad_clip: float = Field(
        default=1.0, ge=0, description="global gradient norm clip; 0 disables clipping"
    )
    grad_accum: int = Field(
        default=1,
        ge=1,
        description="micro-batches per optimizer step (global batch = ranks x batch_size x this)",
    )


class ZeroConfig(StrictModel):
    """DeepSpeed ZeRO sharding, precision and CPU offload."""

    stage: Literal[0, 1, 2, 3] = Field(
        default=2,
        description="what is sharded across ranks: 0 nothing, 1 optimizer state, 2 also "
        "gradients, 3 also parameters",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 on GPU, fp32 on CPU"
    )
    param_persistence_threshold: int | None = Field(
        default=None,
        ge=0,
        description="ZeRO-3: parameters with fewer elements stay whole on every rank "
        "(DeepSpeed's stage3_param_persistence_threshold); None keeps DeepSpeed's default",
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        default="none",
        description="ZeRO 1-3: keep the fp32 master weights and Adam state in CPU memory and "
        "step them there with DeepSpeed's vectorized CPU Adam (ZeRO-Offload): frees "
        "accelerator memory for a slower optimizer step",
    )
    offload_param: Literal["none", "cpu"] = Field(
        default="none",
        description="ZeRO-3 only: keep the partitioned parameters in CPU memory and bring "
        "each to the accelerator when its layer runs (ZeRO-Infinity)",
    )
    offload_pin_memory: bool = Field(
        default=True,
        description="offloaded tensors live in page-locked memory (faster copies to and from "
        "the GPU; no effect on CPU-only runs)",
    )
    align_params: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="ZeRO 1-2: start every parameter in DeepSpeed's flat parameter buffer on "
        "a 16-byte boundary (DeepSpeed's parameter_alignment). Unaligned, a 1-element "
        "logit_scale shifts every later bias and norm weight off the boundary and cuBLAS and "
        "the layer-norm kernels take slow paths: ViT-B/16 CLIP steps 1.7x slower on an "
        "H200. auto: with bf16 parameters. A resume at the same world size keeps the layout "
        "its checkpoint was written with",
    )

    @model_validator(mode="after")
    def _check_stage_options(self) -> ZeroConfig:
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ValueError(
                f"zero.offload_optimizer={self.offload_optimizer!r} needs ZeRO stage 1, 2 or 3 "
                "(DeepSpeed offloads the optimizer's partition): set zero.stage, or "
                "offload_optimizer: none"
            )
        if self.align_params == "always" and self.stage not in (1, 2):
            raise ValueError(
                f"zero.align_params='always' needs ZeRO stage 1 or 2 (zero.stage is "
                f"{self.stage}): DeepSpeed pads parameters only in those stages' flat "
                "buffers; set align_params: auto, or zero.stage: 2"
            )
        if self.offload_param != "none" and self.stage != 3:
            raise ValueError(
                f"zero.offload_param={self.offload_param!r} needs ZeRO stage 3 (only stage 3 "
                f"partitions the parameters; zero.stage is {self.stage}): set zero.stage: 3, "
                "or offload_param: none (offload_optimizer works with stages 1-3)"
            )
        return self


class CheckpointConfig(StrictModel):
    """When to checkpoint, how many to keep, and whether each holds full weights."""

    every_steps: int = Field(default=20, ge=1, description="save a checkpoint every N steps")
    keep_last: int = Field(
        default=3, ge=1, description="complete checkpoints kept; older ones are deleted"
    )
    model_file: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="also gather the full fp32 weights into model.pt at every save (auto: "
        "for models up to model_file_max_params; larger ones are exported on demand with "
        "`kiln export`, or by `kiln eval`, from DeepSpeed's sharded files)",
    )
    model_file_max_params: int = Field(
        default=200_000_000, ge=0, description="model_file auto: largest model given a model.pt"
    )


class EvalConfig(StrictModel):
    """Evaluation after training (and with `kiln eval`)."""

    zero_shot: RecipePath | None = Field(
        default=None,
        description="folder of a labelled eval set (manifest.json + zero_shot.json)",
    )
    retrieval: RecipePath | None = Field(
        default=None,
        description="dataset folder for image-text retrieval recall@k",
    )
    recall_k: list[int] = Field(
        default_factory=lambda: [1, 5, 10], description="k of each retrieval recall@k reported"
    )
    batch_size: int = Field(default=128, ge=1, description="images or captions per eval batch")


class TrainConfig(StrictModel):
    """Every section of a training run."""

    data: DataConfig = Field(description="the dataset and how the loader reads it")
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="a flavor (named size) and overrides"
    )
    objective: ObjectiveConfig | None = Field(
        default=None, description="loss to train with; default: the model family's (model.arch)"
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    zero: ZeroConfig = Field(
        default_factory=ZeroConfig, description="DeepSpeed ZeRO stage, precision, offload"
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="when to save and what to keep"
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="evaluation when training finishes"
    )
    max_steps: int = Field(default=100, ge=1, description="optimizer steps in the whole run")
    log_every: int = Field(
        default=5,
        ge=1,
        description="print the step line every N steps (at most every 5 s; the first and last "
        "step always); metrics.jsonl records every step",
    )
    seed: int = Field(default=0, description="seed of initial weights, data order and augmentation")
    stop_after_step: int | None = Field(
        default=None,
        ge=1,
        description="end this invocation after this step (a checkpoint is written first); "
        "`kiln resume` continues to max_steps",
    )
    host_memory: HostMemory = Field(
        default="reuse",
        description="reuse: each rank keeps the host memory it frees for its next step "
        "(glibc malloc without mmap or trimming) instead of faulting large blocks in again "
        "every step (ViT-S/32 on CPU, one rank: 9% more samples/s), so its resident memory "
        "stays at its peak, which grows a little (+14% there); release: glibc's defaults, "
        "for runs short of host memory. Values are the same either way",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_objective(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("objective") is not None:
            return data
        model = data.get("model")
        try:
            arch = (
                model.arch
                if isinstance(model, ModelConfig)
                else ModelConfig.model_validate(model or {}).arch
            )
        except ValidationError:
            return data  # the field's own validation reports it, with its location
        return {**data, "objective": {"name": arch}}

    @model_validator(mode="after")
    def _check_objective(self) -> TrainConfig:
        if (
            self.objective is not None
            and self.model.arch not in OBJECTIVE_ARCHS[self.objective.name]
        ):
            raise ValueError(
                f"objective.name={self.objective.name!r} does not train a {self.model.arch!r} "
                f"model (model.flavor={self.model.flavor!r}): use a {self.objective.name}-* "
                f"flavor, or drop the objective section to train the flavor's own objective"
            )
        return self
