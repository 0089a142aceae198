"""A small, generic Optax training loop with exact resume, metrics and plots.

The loop is functional: a model is ``apply_fn(params, x, *, train=False,
rng=None) -> logits`` plus a float32 ``params`` pytree (the master weights).
Linen modules and nnx modules are adapted with :func:`linen_apply_fn` and
:func:`nnx_apply_fn`. The loop never quantizes anything itself: MX is a
compute format inside ``apply_fn`` (see :mod:`examples.study` for the
recipes), while the optimizer updates the float32 master weights.

Exact resume: batch ``i`` is ``train_batch(i)`` and the dropout key of step
``i`` is ``fold_in(key(seed), i)``, so the only state a run has is params,
optimizer state, the step number and the logged history, all of which go
into each orbax checkpoint. A run interrupted after a checkpoint at step k
and resumed therefore reproduces an uninterrupted run bit for bit. A
checkpoint also records the configuration, including the MX recipe the
model ran with (:func:`mx_recipe_of`); resuming under another one is refused.

Sharded runs: with ``parallel=`` (:class:`examples.parallel.Parallel`) the
same loop runs data parallel over a mesh of every device of every process,
parameters and optimizer state replicated or fully sharded (FSDP). Every
process runs this loop; process 0 alone prints and writes ``metrics.json``,
and all of them write their shards of each orbax checkpoint. The mesh is
not part of the recorded configuration: a checkpoint restores onto another
mesh (other devices, other processes) with the shardings of that run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import linen as nn
from flax import nnx

import jaxmx.flax
from examples.parallel import Parallel, is_main_process

# apply_fn(params, x, *, train=False, rng=None) -> logits
ApplyFn = Callable[..., jax.Array]
# train_batch(step) -> (x, y); a pure function of the step number.
BatchFn = Callable[[int], tuple[Any, Any]]
# eval_batches() -> iterable of (x, y), the same batches on every call.
EvalBatchesFn = Callable[[], Iterable[tuple[Any, Any]]]


def mx_recipe_of(model) -> list | None:
    """The MX rules a model runs with, as JSON data; None for a model as written.

    >>> import flax.linen as nn
    >>> mx_recipe_of(nn.Dense(4)) is None
    True
    >>> mx_recipe_of(jaxmx.flax.quantize_model(nn.Dense(4), [("head", None)]))
    [['head', None]]
    """
    try:
        return jaxmx.flax.substitution_of(model).recipe()
    except ValueError:  # not made by quantize_model
        return None


def linen_apply_fn(model: nn.Module) -> ApplyFn:
    """Adapts a linen module whose ``__call__(x, *, train)`` returns logits.

    Args:
      model: the module (a model substituted by ``jaxmx.flax.quantize_model``
        is one too); dropout (if any) uses the ``'dropout'`` rng stream.

    Returns:
      ``apply_fn(params, x, *, train=False, rng=None)`` where ``params`` is the
      ``"params"`` collection; its ``mx_recipe`` attribute is
      :func:`mx_recipe_of` the model, which :func:`train` records.
    """

    def apply_fn(params, x, *, train: bool = False, rng: jax.Array | None = None):
        rngs = {"dropout": rng} if rng is not None else None
        return model.apply({"params": params}, x, train=train, rngs=rngs)

    apply_fn.mx_recipe = mx_recipe_of(model)
    return apply_fn


def nnx_apply_fn(model: nnx.Module) -> ApplyFn:
    """Adapts an nnx module whose ``__call__(x, *, train, rngs)`` returns logits.

    The module is split once; each call merges the graph definition with the
    given parameters (a pure dict, see :func:`nnx_params`). Non-``Param``
    state (e.g. stored rngs) is treated as constant; models with mutable
    statistics such as BatchNorm are not supported.

    Args:
      model: the module.

    Returns:
      ``apply_fn(params, x, *, train=False, rng=None)``, with ``mx_recipe``
      as :func:`linen_apply_fn`'s.
    """
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(params, x, *, train: bool = False, rng: jax.Array | None = None):
        # Map to fresh Variables so the captured template is never mutated.
        state = jax.tree.map(lambda v: v, param_state)
        nnx.replace_by_pure_dict(state, params)
        module = nnx.merge(graphdef, state, rest)
        rngs = nnx.Rngs(dropout=rng) if rng is not None else None
        return module(x, train=train, rngs=rngs)

    apply_fn.mx_recipe = mx_recipe_of(model)
    return apply_fn


def nnx_params(model: nnx.Module) -> dict[str, Any]:
    """Returns an nnx module's ``Param`` state as a pure dict (the trainable pytree)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def init_linen_params(model: nn.Module, sample_x: Any, seed: int) -> dict[str, Any]:
    """Initialises a linen module and returns its ``"params"`` collection.

    Args:
      model: the module.
      sample_x: an input batch with the training shapes.
      seed: initialisation seed.

    Returns:
      The float32 parameter pytree.
    """
    # Jitted: one compilation instead of dispatching every initializer eagerly.
    return jax.jit(model.init)(jax.random.key(seed), jnp.asarray(sample_x))["params"]


def apply_fn_for(model) -> ApplyFn:
    """Dispatches to :func:`linen_apply_fn` or :func:`nnx_apply_fn`.

    A linen model substituted by ``jaxmx.flax.quantize_model`` is a linen
    module (``jaxmx.flax.MXLinen``) and is adapted the same way.
    """
    if isinstance(model, nn.Module):
        return linen_apply_fn(model)
    if isinstance(model, nnx.Module):
        return nnx_apply_fn(model)
    raise TypeError(f"expected a flax linen or nnx Module, got {type(model).__name__}")


# --- Optimisation ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of :func:`train` (recorded in metrics and checkpoints).

    >>> TrainConfig(steps=100, warmup_steps=10).learning_rate
    0.001
    """

    steps: int  # number of optimizer updates
    learning_rate: float = 1e-3  # peak learning rate after warmup
    warmup_steps: int = 100  # linear warmup from 0, then cosine decay to the end
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 0.1  # decoupled AdamW decay, applied to >=2-D params only
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.99  # Adam second-moment decay
    grad_clip: float = 1.0  # global-norm clipping threshold; 0 disables it
    eval_every: int = 100  # evaluate every this many steps (and at the end)
    log_every: int = 10  # record the mean train loss over this many steps
    checkpoint_every: int = 0  # checkpoint interval; 0 = only at the end
    seed: int = 0  # dropout-key seed (data order is fixed by the batch function)

    def __post_init__(self):
        for name in ("steps", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps must be in [0, steps={self.steps}), "
                f"got {self.warmup_steps}"
            )
        if self.checkpoint_every < 0 or self.grad_clip < 0 or self.learning_rate <= 0:
            raise ValueError(
                "need checkpoint_every >= 0, grad_clip >= 0 and learning_rate > 0, got "
                f"{self.checkpoint_every}, {self.grad_clip}, {self.learning_rate}"
            )


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, cosine decay to ``min_lr_ratio`` of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The default optimizer: global-norm clipping, then AdamW on the schedule.

    Weight decay skips biases and LayerNorm scales (1-D leaves), as in GPT-2.
    """
    adamw = optax.adamw(
        lr_schedule(config),
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params),
    )
    if config.grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over every label (tokens or images), in nats."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()


def _check_master_params(params: Any) -> None:
    bad = {
        jax.tree_util.keystr(path): str(jnp.result_type(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if jnp.result_type(leaf) != jnp.float32
    }
    if bad:
        raise TypeError(f"master params must all be float32; got other dtypes at {bad}")


def _in_mesh(fn, parallel: Parallel | None):
    """``fn`` (jitted) called inside ``jax.set_mesh`` of the run's mesh, which
    the MX dot's FSDP gather reads when the step is traced."""
    if parallel is None:
        return fn

    @functools.wraps(fn)
    def run(*args):
        with jax.set_mesh(parallel.mesh):
            return fn(*args)

    return run


def make_train_step(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    seed: int,
    parallel: Parallel | None = None,
):
    """Returns a jitted ``step(params, opt_state, x, y, step) -> (params, opt_state, loss)``.

    With ``parallel``, the new params and optimizer state keep the layout
    :meth:`Parallel.shardings` gives them, and the step runs in its mesh.
    """
    base_key = jax.random.key(seed)

    def step_fn(params, opt_state, x, y, step):
        def loss_fn(p):
            p = p if parallel is None else parallel.for_model(p)
            logits = apply_fn(p, x, train=True, rng=jax.random.fold_in(base_key, step))
            return cross_entropy(logits, y)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if parallel is not None:
            params, opt_state = parallel.constrain(params), parallel.constrain(opt_state)
        return params, opt_state, loss

    return _in_mesh(jax.jit(step_fn), parallel)


def make_eval_step(apply_fn: ApplyFn, parallel: Parallel | None = None):
    """Returns a jitted ``eval(params, x, y) -> (loss_sum, correct, count)``."""

    def eval_fn(params, x, y):
        params = params if parallel is None else parallel.for_model(params)
        logits = apply_fn(params, x, train=False).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return losses.sum(), (logits.argmax(-1) == y).sum(), y.size

    return _in_mesh(jax.jit(eval_fn), parallel)


@functools.lru_cache(maxsize=8)
def _default_steps(apply_fn: ApplyFn, config: TrainConfig, parallel: Parallel | None = None):
    # Cached so that retraining the same apply_fn with the same config in one
    # process (resuming, repeated studies, tests) reuses the compiled steps.
    optimizer = make_optimizer(config)
    step = make_train_step(apply_fn, optimizer, config.seed, parallel)
    return optimizer, step, make_eval_step(apply_fn, parallel)


def evaluate(
    eval_step, params: Any, eval_batches: EvalBatchesFn, put: Callable[[Any], Any] = jnp.asarray
) -> dict[str, float]:
    """Mean loss and accuracy over every label of every evaluation batch.

    ``put`` turns a host batch into the step's input (a global array cut
    over the mesh for a sharded run).
    """
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in eval_batches():
        s, c, n = eval_step(params, put(x), put(y))
        loss_sum, correct, count = loss_sum + float(s), correct + int(c), count + int(n)
    if count == 0:
        raise ValueError("eval_batches() yielded no batches")
    return {"loss": loss_sum / count, "accuracy": correct / count}


# --- The loop ------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns."""

    params: Any  # final float32 master params
    opt_state: Any  # final optimizer state
    metrics: dict[str, Any]  # the metrics dict also written to metrics.json


def _write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # atomic, so a reader never sees half a file


def _summarise(metrics: dict[str, Any], step_times_ms: list[float]) -> None:
    metrics["step_time_ms_median"] = statistics.median(step_times_ms) if step_times_ms else None
    metrics["steps_timed"] = len(step_times_ms)
    metrics["final_eval"] = metrics["eval"][-1] if metrics["eval"] else None


def _commit(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.device_put(a, a.sharding), jax.tree.map(jnp.asarray, tree))


def _config_diff(saved: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs.append(_config_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return ", ".join(d for d in diffs if d)


def _checkpoint_manager(out_dir: pathlib.Path, keep: int = 2) -> ocp.CheckpointManager:
    out_dir.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True
    )
    return ocp.CheckpointManager(
        out_dir.resolve() / "checkpoints", options=options, item_names=("state", "meta")
    )


def _save(
    manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: dict
) -> None:
    # Orbax writes asynchronously while the loop keeps appending to the lists
    # in meta, so hand it a snapshot (a JSON round trip is an exact deep copy).
    meta = json.loads(json.dumps(meta))
    state = {"params": params, "opt_state": opt_state}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args)


_ITEMS = ("state", "meta")  # what _save writes into each step folder


def _check_step_folder(manager: ocp.CheckpointManager, step: int) -> None:
    # Orbax takes any folder named by a number for a step; one without our
    # items (a stray mkdir, a half-copied run) would fail with a bare KeyError.
    folder = pathlib.Path(str(manager.directory)) / str(step)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    missing = [item for item in _ITEMS if item not in found]
    if missing:
        has = f"it holds {', '.join(found)}" if found else "it is empty"
        lacks = " and ".join(map(repr, missing)) + (" items" if len(missing) > 1 else " item")
        raise ValueError(
            f"checkpoint folder {folder} lacks the {lacks} ({has}), so it is not a "
            "checkpoint written by this training loop; delete that folder (the latest "
            "earlier step is then resumed) or use another output directory"
        )


# DotConfig's ``native`` field became ``implementation``, and fields were added
# since; checkpoints recorded before stay resumable under the current names.
_NATIVE_TO_IMPLEMENTATION = {"auto": None, "never": "xla", "always": "native"}


def _current_mx(mx: Any) -> Any:
    """A recorded ``mx`` recipe in today's DotConfig fields: ``native`` renamed,
    fields added since (whose default is None) filled in with None."""
    if not isinstance(mx, list):
        return mx
    added = [f.name for f in dataclasses.fields(jaxmx.DotConfig) if f.default is None]
    out = []
    for pattern, fields in mx:
        if isinstance(fields, dict):
            fields = dict(fields)
            if "native" in fields and "implementation" not in fields:
                native = fields.pop("native")
                fields["implementation"] = _NATIVE_TO_IMPLEMENTATION.get(native, native)
            fields.update({k: None for k in added if k not in fields})
        out.append([pattern, fields])
    return out


def _recipe_text(config: Mapping[str, Any]) -> str:
    """The MX recipe a run's recorded configuration names, for error messages."""
    if "mx" not in config:
        rules = "MX rules not recorded"
    elif config["mx"] is None:
        rules = "no MX substitution"
    else:
        rules = "; ".join(
            f"{pattern!r} -> "
            + (
                "high precision"
                if fields is None
                else ", ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, "forward"))
            )
            for pattern, fields in config["mx"]
        )
    name = config.get("recipe")
    return f"recipe {name!r} ({rules})" if name is not None else rules


def _restore(
    manager: ocp.CheckpointManager, params: Any, opt_state: Any, full_config: dict[str, Any]
) -> tuple[Any, Any, dict[str, Any]]:
    step = manager.latest_step()
    _check_step_folder(manager, step)
    # Check the recorded configuration before touching the arrays, so another
    # model's checkpoint gives a readable error rather than a tree mismatch.
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    saved = meta.get("metrics", {}).get("config") if isinstance(meta, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(
            f"checkpoint {manager.directory}/{step}: its 'meta' item records no configuration; "
            "it was not written by this training loop"
        )
    saved = {**saved, "mx": _current_mx(saved.get("mx"))} if "mx" in saved else saved
    if any(saved.get(k, None) != full_config.get(k) for k in ("mx", "recipe")):
        raise ValueError(
            f"{manager.directory} holds a checkpoint trained with {_recipe_text(saved)}, but "
            f"this run uses {_recipe_text(full_config)}; use another output directory or "
            "delete it"
        )
    diff = _config_diff(saved, full_config)
    if diff:
        raise ValueError(
            f"{manager.directory} holds a checkpoint of a different configuration "
            f"(saved -> requested: {diff}); use another output directory or delete it"
        )
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        {"params": params, "opt_state": opt_state},
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    state = manager.restore(step, args=args).state
    return state["params"], state["opt_state"], meta


def train(
    apply_fn: ApplyFn,
    params: Any,
    train_batch: BatchFn,
    eval_batches: EvalBatchesFn,
    config: TrainConfig,
    *,
    optimizer: optax.GradientTransformation | None = None,
    out_dir: str | os.PathLike | None = None,
    name: str = "run",
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Trains ``params`` with cross-entropy loss, resuming from ``out_dir`` if possible.

    Args:
      apply_fn: ``apply_fn(params, x, *, train=False, rng=None) -> logits``.
      params: initial float32 master params; not modified (JAX arrays are immutable).
      train_batch: ``train_batch(step) -> (x, y)``, a pure function of ``step``.
      eval_batches: ``eval_batches() -> iterable of (x, y)``.
      config: loop and default-optimizer settings.
      optimizer: any optax transformation; defaults to :func:`make_optimizer`.
        A custom optimizer is not recorded, so resume with the same one.
      out_dir: where ``metrics.json`` and ``checkpoints/`` go; None keeps
        everything in memory and disables checkpointing.
      name: run label for the progress bar, metrics and plots.
      run_info: JSON-serialisable description of the model, data and recipe,
        stored under ``metrics["config"]``; resuming requires it to match.
        ``metrics["config"]["mx"]`` records ``apply_fn.mx_recipe`` (set by
        :func:`apply_fn_for`; None for a function without one), so resuming
        under another MX recipe is refused too.
      progress: show a tqdm progress bar.
      on_step: called as ``on_step(step, loss)`` after each update (``step``
        counts completed updates), e.g. for custom logging or early exits.
      parallel: run data parallel (and FSDP) over this mesh; every process
        of a multi-process run calls ``train`` with the same arguments.
        ``params`` are host values, the same in every process. None: the
        default device, as before.

    Returns:
      A :class:`TrainResult`. ``metrics`` holds ``train`` (``step``, mean
      ``loss`` over the last ``log_every`` steps, ``lr`` of the config's
      schedule, i.e. of the default optimizer), ``eval`` (``step``,
      ``loss``, ``accuracy``, including step 0), ``step_time_ms_median``
      (excluding each invocation's first, compiling, step), ``total_time_s``
      and ``final_eval``.

    Raises:
      TypeError: if a param is not float32.
      ValueError: if a checkpoint in ``out_dir`` was written with another
        config or MX recipe, or its latest step folder is not a complete
        checkpoint of this loop.
    """
    _check_master_params(params)
    schedule = lr_schedule(config)
    full_config = {
        "train": dataclasses.asdict(config),
        "mx": getattr(apply_fn, "mx_recipe", None),
        **dict(run_info or {}),
    }
    json.dumps(full_config)  # fail now, not at the first checkpoint
    if optimizer is None:
        optimizer, step_fn, eval_step = _default_steps(apply_fn, config, parallel)
    else:
        step_fn = make_train_step(apply_fn, optimizer, config.seed, parallel)
        eval_step = make_eval_step(apply_fn, parallel)
    if parallel is None:
        # Commit arrays to their devices up front: jit outputs and restored
        # checkpoints are committed, and jit keys its cache on that, so without
        # this the train step would compile twice (and again after a resume).
        params = _commit(params)
        opt_state = _commit(optimizer.init(params))
        put = jnp.asarray
    else:
        params = parallel.put(params)
        opt_state = parallel.init_state(optimizer, params)
        put = parallel.put_batch
        progress = progress and is_main_process()
    main = is_main_process()
    metrics: dict[str, Any] = {"name": name, "config": full_config, "train": [], "eval": []}
    pending, step_times, start, elapsed = [], [], 0, 0.0
    out = pathlib.Path(out_dir) if out_dir is not None else None
    manager = _checkpoint_manager(out) if out is not None else None
    bar = None
    try:
        if manager is not None and manager.latest_step() is not None:
            params, opt_state, meta = _restore(manager, params, opt_state, full_config)
            metrics, pending, step_times = meta["metrics"], meta["pending"], meta["step_times"]
            start, elapsed = meta["step"], meta["elapsed"]

        bar = tqdm.tqdm(total=config.steps, initial=start, desc=name, disable=not progress)
        t_start = time.perf_counter() - elapsed
        if parallel is not None:
            metrics["parallel"] = parallel.describe()  # this invocation's layout
        if start == 0:
            metrics["eval"].append({"step": 0, **evaluate(eval_step, params, eval_batches, put)})
        for step in range(start, config.steps):
            x, y = train_batch(step)
            t0 = time.perf_counter()
            params, opt_state, loss = step_fn(params, opt_state, put(x), put(y), jnp.int32(step))
            loss = float(loss)  # blocks, so t0..now is the whole step
            if step > start:  # the first step of an invocation includes compilation
                step_times.append((time.perf_counter() - t0) * 1e3)
            pending.append(loss)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                mean = sum(pending) / len(pending)
                metrics["train"].append({"step": done, "loss": mean, "lr": float(schedule(step))})
                pending = []
            if done % config.eval_every == 0 or done == config.steps:
                metrics["eval"].append(
                    {"step": done, **evaluate(eval_step, params, eval_batches, put)}
                )
            if done % config.log_every == 0 or done % config.eval_every == 0:
                train_loss = metrics["train"][-1]["loss"] if metrics["train"] else loss
                bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{metrics['eval'][-1]['loss']:.4f}")
            elapsed = time.perf_counter() - t_start
            metrics["total_time_s"] = elapsed
            _summarise(metrics, step_times)
            if manager is not None and (
                done == config.steps
                or (config.checkpoint_every and done % config.checkpoint_every == 0)
            ):
                snapshot = {"step": done, "elapsed": elapsed, "metrics": metrics}
                snapshot.update(pending=pending, step_times=step_times)
                _save(manager, done, params, opt_state, snapshot)
            if main and out is not None and (done % config.eval_every == 0 or done == config.steps):
                _write_json(out / "metrics.json", metrics)
            bar.update(1)
            if on_step is not None:
                on_step(done, loss)
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.close()  # waits for in-flight asynchronous saves
    _summarise(metrics, step_times)
    if main and out is not None:
        _write_json(out / "metrics.json", metrics)
    return TrainResult(params=params, opt_state=opt_state, metrics=metrics)
