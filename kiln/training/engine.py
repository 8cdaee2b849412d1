"""DeepSpeed engine: config translation, LR schedule, process-group setup.

`kiln.training.config` is DeepSpeed-agnostic; this module is the one place that knows the
DeepSpeed config format. Import DeepSpeed through `import_deepspeed()`: DeepSpeed picks its
accelerator when first imported, so ``DS_ACCELERATOR=cpu`` must be in the environment before
that on machines without CUDA (otherwise it probes for GPUs and may pick a wrong one).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kiln.console import say
from kiln.training.config import OptimConfig, TrainConfig
from kiln.training.deepspeed_patches import apply_patches
from kiln.training.gloo_gather import use_broadcast_gather
from kiln.training.optim import AdamW

_SLOW_OP_S = 3.0  # an op load longer than this is a compile: say so

__all__ = [
    "WarmupCosine",
    "adamw_args",
    "align_params",
    "build_ds_config",
    "build_engine",
    "default_extensions_dir",
    "import_deepspeed",
    "init_distributed",
    "op_build_lock",
    "optimizer_factory",
    "param_groups",
    "prebuild_comm_ops",
    "prebuild_cpu_ops",
    "prebuild_offload_ops",
    "restore_cpu_adam_step",
    "set_runtime_env",
    "use_bf16",
]

_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def default_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops are cached: inside the active environment."""
    return str(Path(sys.prefix) / "torch_extensions")


def set_runtime_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Put DS_ACCELERATOR (cpu when no CUDA) and TORCH_EXTENSIONS_DIR into `env` (default
    os.environ) unless already set, and kiln's `ninja` first on its PATH; returns `env`.

    torch compiles DeepSpeed's ops with the first `ninja` on PATH. A machine with its own
    ninja (Debian's 1.11) beside kiln's pinned pip one (1.13) gave launchers one and Ray
    workers the other; the two hash build commands differently, so each rebuilt the op the
    other had just built (minutes per launch, and a stale lock when one was killed)."""
    target: Any = os.environ if env is None else env
    if not torch.cuda.is_available():
        target.setdefault("DS_ACCELERATOR", "cpu")
    target.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    ninja_dir = _ninja_bin_dir()
    if ninja_dir is not None:
        rest = [p for p in target.get("PATH", "").split(os.pathsep) if p and p != ninja_dir]
        target["PATH"] = os.pathsep.join([ninja_dir, *rest])
    return target


def _ninja_bin_dir() -> str | None:
    """The folder of the `ninja` that kiln's dependencies install (PyPI `ninja`), if any."""
    try:
        import ninja
    except ImportError:
        return None
    folder = getattr(ninja, "BIN_DIR", None)
    return str(folder) if folder and os.path.isfile(os.path.join(folder, "ninja")) else None


def import_deepspeed() -> ModuleType:
    """`import deepspeed` after setting the environment it reads at import time."""
    set_runtime_env()
    import deepspeed

    apply_patches(deepspeed)
    return deepspeed


def use_bf16(cfg: TrainConfig, *, cuda: bool | None = None) -> bool:
    """bf16 when asked for, or with precision=auto on a CUDA machine; fp32 otherwise."""
    if cfg.zero.precision == "bf16":
        return True
    on_gpu = torch.cuda.is_available() if cuda is None else cuda
    return cfg.zero.precision == "auto" and on_gpu


def align_params(cfg: TrainConfig, *, cuda: bool | None = None) -> bool:
    """Whether DeepSpeed starts each parameter of its ZeRO 1-2 flat buffers on a 16-byte
    boundary (`zero.align_params`; auto: with bf16 parameters, where an unaligned bias or
    norm weight sends cuBLAS and the layer-norm kernels down slow paths)."""
    z = cfg.zero
    if z.stage not in (1, 2) or z.align_params == "never":
        return False
    return z.align_params == "always" or use_bf16(cfg, cuda=cuda)


def build_ds_config(
    cfg: TrainConfig,
    world_size: int,
    *,
    cuda: bool | None = None,
    aligned: bool | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` on `world_size` ranks (`cuda`: whether the
    ranks train on GPUs; default: whether this machine has one). `aligned`: the parameter
    layout to use instead of `align_params`'s choice (a resume keeps its checkpoint's).

    The config names an optimizer only with ``zero.offload_optimizer: cpu``: DeepSpeed then
    builds its vectorized DeepSpeedCPUAdam (AdamW mode), which steps the offloaded fp32
    master weights in CPU memory; its op is compiled once by `prebuild_ops`. Otherwise kiln
    hands DeepSpeed its own optimizer (`optimizer_factory`)."""
    o, z = cfg.optim, cfg.zero
    if cuda is None:
        cuda = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage in (1, 2) and (align_params(cfg, cuda=cuda) if aligned is None else aligned):
        zero["parameter_alignment"] = True
    if z.stage == 3 and z.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = z.param_persistence_threshold
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {
            "device": z.offload_optimizer,
            "pin_memory": z.offload_pin_memory,
        }
    if z.offload_param != "none":
        zero["offload_param"] = {"device": z.offload_param, "pin_memory": z.offload_pin_memory}
    bf16 = use_bf16(cfg, cuda=cuda)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": cfg.data.batch_size * o.grad_accum * world_size,
        "zero_optimization": zero,
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if z.offload_optimizer != "none":
        # (betas as a list, as DeepSpeed's JSON config has them)
        params = {**adamw_args(o), "betas": list(o.betas)}
        config["optimizer"] = {"type": "AdamW", "params": params}
    return config


def adamw_args(optim: OptimConfig) -> dict[str, Any]:
    """The recipe's AdamW hyperparameters as AdamW's keyword arguments: what every AdamW
    kiln builds (and its benchmarks time) is given."""
    return {
        "lr": optim.lr,
        "betas": optim.betas,
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }


def optimizer_factory(
    cfg: TrainConfig, *, cuda: bool | None = None
) -> Callable[[Any], torch.optim.Optimizer] | None:
    """What builds the optimizer from DeepSpeed's parameter groups: kiln's AdamW
    (`kiln.training.optim`: torch's numbers, stepped in cache-sized slices on CPU), with
    torch's fused kernel on GPU (one launch for all parameters). None with
    ``zero.offload_optimizer``, where the DeepSpeed config names DeepSpeedCPUAdam."""
    if cfg.zero.offload_optimizer != "none":
        return None
    if cuda is None:
        cuda = torch.cuda.is_available()
    args = adamw_args(cfg.optim)
    fused = True if cuda else None

    def build(params: Any) -> torch.optim.Optimizer:
        return AdamW(params, fused=fused, **args)

    return build


class WarmupCosine:
    """LR multiplier: linear warmup to 1 over `warmup_steps`, cosine to `min_ratio` at
    `max_steps` (then flat). A callable object (not a closure) so LambdaLR can pickle it.

    ``factor(s)`` is the multiplier for optimizer step ``s + 1`` (LambdaLR's count starts at 0).
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms, embeddings' scalars and logit_scale
    (every parameter with fewer than 2 dims) are not decayed, as in CLIP."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        # a parameter built under ZeRO-3's zero.Init is an empty shard; ds_shape is its shape
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


_LISTENERS: list[socket.socket] = []  # rank 0's store sockets, alive as long as the process


def _loopback_store() -> dist.TCPStore | None:
    """A rendezvous store that listens on loopback only, when MASTER_ADDR is a loopback
    address (every single-machine run); None otherwise (torch's default store then).

    torch's TCPStore server listens on every interface whatever MASTER_ADDR says; handed
    a socket bound to MASTER_ADDR, it listens there alone. Gloo's own sockets follow
    ``GLOO_SOCKET_IFNAME`` (set to ``lo`` here unless the user set it).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None  # torchrun's agent already serves the store on MASTER_PORT
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(addr))
    except (OSError, ValueError):
        return None
    if not ip.is_loopback:
        return None
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(minutes=30)  # torch's default for process groups
    if rank != 0:
        return dist.TCPStore(str(ip), port, world, False, timeout=timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((str(ip), port))
    sock.listen(128)
    _LISTENERS.append(sock)
    return dist.TCPStore(
        str(ip), port, world, True, timeout=timeout, master_listen_fd=sock.fileno()
    )


def init_distributed() -> bool:
    """Make sure torch.distributed and DeepSpeed's comm layer are up; True if we created the
    process group (then the caller destroys it at the end).

    Reuses a group someone else made (Ray Train does); otherwise reads RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT from the environment (gloo on CPU, nccl on GPU).
    With a loopback MASTER_ADDR nothing listens beyond loopback (`_loopback_store`). On
    gloo, DeepSpeed's large all-gathers go by broadcasts (`kiln.training.gloo_gather`).
    """
    deepspeed = import_deepspeed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device: torch.device | None = None
    if torch.cuda.is_available():
        # modulo: under Ray each worker may see only its own GPU(s) as device 0..
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        # the group's GPU, named: NCCL otherwise guesses it from the rank, and says so
        device = torch.device("cuda", torch.cuda.current_device())
    created = False
    if not dist.is_initialized():
        missing = [k for k in _REQUIRED_ENV if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"torch.distributed is not initialized and {missing} are not set: start "
                "training with kiln.training.train(...) (or `kiln train`), which sets them"
            )
        # Made here rather than by DeepSpeed so a process that trained before (and left
        # DeepSpeed's comm object behind) still gets a fresh group.
        store = _loopback_store()
        if store is None:
            dist.init_process_group(backend=backend, init_method="env://", device_id=device)
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world, device_id=device
            )
        created = True
    # DeepSpeed's comm layer loads its CPU collectives op: loaded here first, under kiln's
    # build lock like every kiln load of it (`op_build_lock`), then cached in-process. Only
    # now, with the group made: rank 0 binds MASTER_PORT above, and waiting for the lock
    # before that left the launcher's free port to whoever took it first (seen in CI).
    prebuild_comm_ops()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if dist.get_backend() == "gloo":
        from deepspeed.comm import comm as ds_comm

        use_broadcast_gather(ds_comm.cdb)  # ZeRO's weight all-gather, 3x faster on gloo
    return created


def build_engine(
    model: nn.Module,
    cfg: TrainConfig,
    world_size: int,
    *,
    load_universal: bool = False,
    aligned: bool | None = None,
) -> Any:
    """`deepspeed.initialize` with kiln's config, parameter groups and LR schedule.

    The schedule is a torch LambdaLR handed to DeepSpeed, so DeepSpeed steps it once per
    optimizer step and saves/loads its state with every checkpoint. `load_universal`: the
    engine will load a universal checkpoint (an elastic resume, `kiln.training.checkpoint`).
    `aligned`: the ZeRO 1-2 parameter layout (`build_ds_config`; None: `align_params`).
    """
    deepspeed = import_deepspeed()
    prebuild_offload_ops(cfg)  # CPU Adam's op under kiln's build lock (`op_build_lock`)
    schedule = WarmupCosine(cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio)

    def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    config = build_ds_config(cfg, world_size, aligned=aligned)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer_factory(cfg),
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=config,
        lr_scheduler=make_scheduler,
        dist_init_required=False,
    )
    return engine


def prebuild_comm_ops() -> None:
    """Build (or load from cache) DeepSpeed's CPU shared-memory comm op once, here.

    Every rank loads it when DeepSpeed's comm layer starts; building it first in the
    launcher means ranks only load the cached library instead of racing to compile it.
    No-op on GPU machines and where the op does not apply.
    """
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    _load_op(builder, "CPU collectives", "about a minute")


@contextlib.contextmanager
def op_build_lock(cache: Path) -> Iterator[None]:
    """Hold kiln's lock on one op's build folder while the op loads (or compiles).

    torch's own build lock is a file that a killed build leaves behind, and every later
    load then waits for it forever. kiln's lock is an `flock`, which the kernel releases
    when its holder dies; whoever holds it is the only kiln process building this op, so a
    torch `lock` file found then is a killed build's leftover: it is removed, saying so.
    That holds only if every kiln process loads kiln's ops under this lock, ranks included
    (torch takes its file lock on every load, not only to compile): a rank that let
    DeepSpeed load the CPU collectives op itself, while another kiln run's launcher held
    this lock, lost its torch lock and crashed (`init_distributed` and `build_engine` load
    theirs here first since). A non-kiln process building the same op at that moment
    would still lose its lock.
    """
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".kiln-build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another kiln process building: wait for it
        try:
            leftover = cache / "lock"
            if leftover.exists():
                say(f"removing {leftover}, left by a build that was killed")
                leftover.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_op(builder: Any, purpose: str, expected: str) -> None:
    """`builder.load()`, saying what it waits for when that takes more than a few seconds
    (it compiles the op, or waits for another process compiling it into the shared cache):
    a silent minute looks like a hang."""
    cache = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / builder.name
    done = threading.Event()
    said = threading.Event()
    # torch's build lock, there before this load started: someone else is compiling
    other = (cache / "lock").exists()

    def announce() -> None:
        if done.wait(_SLOW_OP_S):
            return
        who = "waiting for another process compiling it" if other else "compiling it"
        say(
            f"loading DeepSpeed's {builder.name} op for {purpose}: {who} (once per "
            f"environment, {expected} on 2 cores; cached in {cache})"
        )
        said.set()

    started = time.perf_counter()
    watcher = threading.Thread(target=announce, daemon=True)
    watcher.start()
    try:
        with op_build_lock(cache):
            builder.load(verbose=False)
    finally:
        done.set()
        watcher.join()
    if said.is_set():
        say(f"{builder.name} op ready ({time.perf_counter() - started:.0f}s)")


def prebuild_offload_ops(cfg: TrainConfig) -> None:
    """With ``zero.offload_optimizer`` on, build (or load from cache) DeepSpeed's CPU Adam op
    here, once, before any rank starts.

    DeepSpeedCPUAdam compiles its C++ op on first use (about 2 minutes on 2 cores; cached
    under TORCH_EXTENSIONS_DIR afterwards); compiled here, the ranks only load it. The same
    op serves CPU and GPU machines (it runs on the host either way). No-op without offload.
    """
    if cfg.zero.offload_optimizer != "none":
        _build_cpu_adam()


def _build_cpu_adam() -> None:
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        raise RuntimeError(
            "zero.offload_optimizer=cpu needs DeepSpeed's cpu_adam op, which this DeepSpeed "
            f"install cannot build on this {get_accelerator().device_name()!r} machine (see "
            "`ds_report`): set zero.offload_optimizer: none"
        )
    try:
        _load_op(builder, "zero.offload_optimizer", "about 2 minutes")
    except Exception as e:  # compiler missing or failing: say what to do, not a traceback
        raise RuntimeError(
            f"zero.offload_optimizer=cpu needs DeepSpeed's {builder.name} op, which failed to "
            f"compile ({type(e).__name__}: {e}): install a C++ compiler with OpenMP (g++), "
            "or set zero.offload_optimizer: none"
        ) from e


def prebuild_cpu_ops() -> None:
    """Compile DeepSpeed's host-side ops kiln loads (the CPU shared-memory collectives, and
    CPU Adam for `zero.offload_optimizer`) into TORCH_EXTENSIONS_DIR now, as DeepSpeed's
    `DS_BUILD_OPS` would at install time: `make install` runs it, so a first training run,
    or the test suite in a fresh clone, does not spend minutes compiling. An op that cannot
    build here is said and skipped: training names the fix when a recipe needs it."""
    set_runtime_env()
    for build, what in (
        (prebuild_comm_ops, "CPU collectives"),
        (_build_cpu_adam, "CPU Adam (zero.offload_optimizer)"),
    ):
        try:
            build()
        except Exception as e:  # a missing compiler: the install goes on
            say(f"DeepSpeed's op for {what} was not compiled ({e}); it is compiled on first use")


def restore_cpu_adam_step(engine: Any) -> None:
    """After a checkpoint load, bring DeepSpeedCPUAdam's C++ step state to the loaded step,
    so a resumed ZeRO-Offload run continues bitwise like one that never stopped.

    The compiled op keeps the bias-correction products beta1^t, beta2^t in floats, updated
    by one multiplication per step; a freshly built op at step t+1 computes pow(beta, t+1)
    instead, which rounds differently. Replaying steps 1..t with empty tensors makes it
    take the same multiplications as the uninterrupted run (microseconds per step). No-op
    for any other optimizer or before the first step.
    """
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    opt = getattr(engine, "basic_optimizer", None)
    if not isinstance(opt, DeepSpeedCPUAdam):
        return
    steps = {int(state["step"]) for state in opt.state.values() if "step" in state}
    if not steps:
        return
    if len(steps) != 1:
        raise RuntimeError(f"DeepSpeedCPUAdam state holds different step counts {sorted(steps)}")
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    empty = torch.empty(0, dtype=torch.float32)
    for t in range(1, steps.pop() + 1):
        opt.ds_opt_adam.adam_update(
            opt.opt_id,
            t,
            group["lr"],
            beta1,
            beta2,
            group["eps"],
            group["weight_decay"],
            group["bias_correction"],
            empty,
            empty,
            empty,
            empty,
        )
