"""The command line: ``python -m suite +variant=preln[,postln,...] [sweep=quick] [key=value ...]``.

Every invocation is a Hydra multirun over the selected sweep preset's grid, after a preflight
(suite.launch.preflight) has validated every cell. Each Hydra job is one cell: it skips the cell if
the store already has its finished record, else trains it and writes the record. With
``train.pack_lr=true`` each job is one pack instead: the cells of all the sweep's learning rates
for one point of the other axes, trained together (suite.run.packed), each member kept as it
finishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from suite.config import CellConfig, ConfigError, identity_hash
from suite.launch.cell import cell_from_config, config_dir, register_path_resolver
from suite.launch.claims import Claim, claim_cell, describe
from suite.launch.devices import (
    GPUS_ENV,
    DeviceSlot,
    detect_gpus,
    gpu_slot,
    pins_gpus,
    register_resolver,
)
from suite.launch.launchers import Launcher, launcher
from suite.launch.preflight import (
    launcher_choice,
    preflight,
    register_configs,
    root_setting,
    swept_overrides,
)
from suite.liveness import process_stamp
from suite.plan import (
    CELL_POINTER,
    CLAIMED_MARKER,
    PLAN_ENV,
    PLANS_ENV,
    SKIPPED_MARKER,
    PlanError,
    SweepPlan,
    job_plan,
    mark_ended,
)
from suite.run.runner import run_cell, run_pack
from suite.store import finished_record, write_cell, write_partial_curve, write_started

log = logging.getLogger("suite")
# Also in the launcher's worker processes, which import this module.
register_resolver()
register_path_resolver()

PARALLEL_ENV = "SUITE_PARALLEL_SWEEPS"  # set by python -m suite.frontier: sweeps beside this one
SWEEP_SIZE_ENV = "SUITE_SWEEP_SIZE"  # the main process's own, for the gpus launcher's resolver
_watching = False  # whether this worker process already watches the sweep's main process
_interrupted = threading.Event()  # Ctrl-C reached the sweep's main process
# Hydra flags that print or inspect instead of running: no preflight for those.
_INSPECT_FLAGS = (
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
)
# Hydra flags that would run the jobs on another config than the one preflight composes.
_OTHER_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp")


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def run_job(cfg: DictConfig) -> str:
    # Only module functions here, no module objects: launchers pickle this function by value
    # (the name run_job holds Hydra's wrapper), and a lock or an event cannot be pickled.
    _refuse_after_ctrl_c()
    try:
        cell = cell_from_config(cfg)
        plan = job_plan(cell.store)
    except (ConfigError, PlanError) as error:
        # Not what preflight checked (a value that resolved otherwise in the job, a plan changed
        # since): nothing is trained, the sweep goes on, and its summary counts the job as
        # having left nothing (exit 1).
        number = f"{HydraConfig.get().job.num + 1}"
        log.error("job %s trains nothing: %s", number, str(error).splitlines()[0])
        return "error"
    _stop_when_the_sweep_is_gone(plan)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    number = f"{HydraConfig.get().job.num + 1}/{plan.size}"
    cell_id = cell.cell_id()
    pin = pins_gpus(_launcher(plan).local_workers, cell.train.device)
    if cell_id in plan.packs:
        members = [replace(cell, optim=replace(cell.optim, lr=lr)) for lr in plan.packs[cell_id]]
        _refuse_unplanned(plan, members)
        if _planned_earlier(plan, cell_id):
            log.info(
                "pack %s: an earlier job's pack too (its recipe adds nothing); skipped", number
            )
            return "skipped"
        return _run_packed_job(members, plan, job_dir, f"pack {number}", pin)
    _refuse_unplanned(plan, [cell])
    label = f"cell {number}"
    (job_dir / CELL_POINTER).write_text(cell_id)
    if _planned_earlier(plan, cell_id):
        log.info(
            "%s: %s is an earlier job's cell too (its recipe adds nothing); skipped", label, cell_id
        )
        return "skipped"
    if plan.resume and finished(cell):
        (job_dir / SKIPPED_MARKER).touch()
        log.info("%s: %s is already in the store; skipped", label, cell_id)
        return "skipped"
    # The GPU slot before the claim: a cell waiting for a GPU is queued, not running (and left
    # to take for another sweep sharing the store).
    with gpu_slot(pin, cell.train.cells_per_gpu, plan.in_main_process()) as slot:
        claim = claim_cell(cell.store, cell_id)
        if not isinstance(claim, Claim):
            _left_to_another(job_dir, label, [cell_id], claim)
            return "claimed"
        try:
            # Another sweep may have finished it between the look above and the claim.
            if plan.resume and finished(cell):
                (job_dir / SKIPPED_MARKER).touch()
                log.info("%s: %s was finished meanwhile by another sweep; skipped", label, cell_id)
                return "skipped"
            log.info("%s: %s", label, cell_id)
            record, curve = run_cell(
                cell,
                on_start=lambda marker: _write_held(
                    claim, write_started, cell.store, cell_id, {**marker, **process_stamp()}
                ),
                on_progress=lambda partial: _write_held(
                    claim, write_partial_curve, cell.store, cell_id, partial
                ),
            )
            return _keep(cell, record, curve, label, slot, claim, plan)
        finally:
            claim.release()


def finished_run(cell: CellConfig) -> dict[str, Any] | None:
    """The store's finished record of this cell, trained as the cell says, or None: a record
    whose config trains differently (a packed run stored under an unpacked cell's id by suite
    0.3) is not this cell's, and the cell is trained (and its folder replaced)."""
    record = finished_record(cell.store, cell.cell_id())
    if record is None:
        return None
    if identity_hash(record.get("config") or {}) != cell.config_hash():
        log.warning(
            "%s: its stored record was trained differently; it is trained again", cell.cell_id()
        )
        return None
    return record


def finished(cell: CellConfig) -> bool:
    """Whether the store holds this cell's finished result (:func:`finished_run`)."""
    return finished_run(cell) is not None


def _planned_earlier(plan: SweepPlan, cell_id: str) -> bool:
    """Whether an earlier job of the sweep trains this cell (a recipe sweep over a variant whose
    recipe adds nothing names its cell once per arm). Only when the plan's job of this number is
    this cell's: otherwise the job trains as any other (claims keep it from training twice)."""
    num = HydraConfig.get().job.num
    if num >= len(plan.jobs) or cell_id not in plan.jobs[num]:
        return False
    return any(cell_id in job for job in plan.jobs[:num])


def _refuse_unplanned(plan: SweepPlan, cells: list[CellConfig]) -> None:
    """A job trains only cells its sweep's preflight checked (the plan lists them)."""
    planned = set(plan.cells)
    for cell in cells:
        if cell.cell_id() not in planned:
            raise PlanError(
                f"cell {cell.cell_id()} is not in the sweep plan {plan.name}: preflight did not "
                "check it, so it is not trained"
            )


def _write_held(claim: Claim, write: Any, *args: Any, stop: bool = True) -> None:
    """Write something of a claimed cell (its running marker, its partial curve), only while
    the claim is still this process's; once it is not, raise ClaimLost to stop training (or,
    with ``stop=False``, for one member of a pack whose others train on, write nothing). A
    failed write (a full disk) is logged and training goes on: these files only show progress;
    the record is written at the end."""
    if not stop and not claim.held():
        return
    claim.check()
    try:
        write(*args)
    except OSError as error:
        log.warning("cannot write the progress of %s (%s)", args[1], error.strerror or error)


def _left_to_another(
    job_dir: Path, label: str, cell_ids: list[str], holder: dict[str, Any]
) -> None:
    """Cells another live process is training: skipped, marked for this sweep's summary."""
    (job_dir / CLAIMED_MARKER).write_text("\n".join(cell_ids))
    for cell_id in cell_ids:
        log.info("%s: %s is being trained by %s; left to it", label, cell_id, describe(holder))


def _run_packed_job(
    members: list[CellConfig], plan: SweepPlan, job_dir: Path, label: str, pin: bool
) -> str:
    """One Hydra job trains the cells of all the pack's learning rates together
    (suite/run/packed.py)."""
    (job_dir / CELL_POINTER).write_text("\n".join(member.cell_id() for member in members))
    count = len(members)
    if plan.resume:
        members = [m for m in members if not finished(m)]
    skipped = count - len(members)
    if skipped:
        (job_dir / SKIPPED_MARKER).write_text(str(skipped))
        log.info("%s: %d learning rate(s) already in the store; skipped", label, skipped)
    if not members:
        return "skipped"
    with gpu_slot(pin, members[0].train.cells_per_gpu, plan.in_main_process()) as slot:
        return _claim_and_train_pack(members, job_dir, label, slot, plan)


def _claim_and_train_pack(
    members: list[CellConfig],
    job_dir: Path,
    label: str,
    slot: DeviceSlot | None,
    plan: SweepPlan,
) -> str:
    claims, held_elsewhere = {}, {}
    for member in members:
        claim = claim_cell(member.store, member.cell_id())
        if isinstance(claim, Claim):
            claims[member.cell_id()] = claim
        else:
            held_elsewhere[member.cell_id()] = claim
    if held_elsewhere:
        holder = next(iter(held_elsewhere.values()))
        _left_to_another(job_dir, label, list(held_elsewhere), holder)
    if plan.resume:  # another sweep may have finished some between the look and the claims
        done = [m for m in members if m.cell_id() in claims and finished(m)]
        for member in done:
            claims.pop(member.cell_id()).release()
            log.info(
                "%s: %s was finished meanwhile by another sweep; skipped", label, member.cell_id()
            )
        if done:
            marker = job_dir / SKIPPED_MARKER
            before = int(marker.read_text() or 0) if marker.exists() else 0
            marker.write_text(str(before + len(done)))
    members = [m for m in members if m.cell_id() in claims]
    if not members:
        return "claimed" if held_elsewhere else "skipped"
    held = [claims[m.cell_id()] for m in members]
    log.info("%s: %s", label, ", ".join(member.cell_id() for member in members))
    statuses = []
    try:
        run_pack(
            members,
            on_start=lambda member, marker: _write_held(
                held[member],
                write_started,
                members[member].store,
                members[member].cell_id(),
                {**marker, **process_stamp()},
            ),
            on_progress=lambda member, partial: _write_held(
                held[member],
                write_partial_curve,
                members[member].store,
                members[member].cell_id(),
                partial,
                stop=False,  # the pack's other members train on
            ),
            on_done=lambda member, record, curve: statuses.append(
                _keep(members[member], record, curve, label, slot, held[member], plan)
            ),
        )
    finally:
        for claim in claims.values():
            claim.release()
    return "ok" if all(status == "ok" for status in statuses) else "error"


def _keep(
    cell: CellConfig,
    record: dict[str, Any],
    curve: list[dict],
    label: str,
    slot: DeviceSlot | None,
    claim: Claim,
    plan: SweepPlan,
) -> str:
    """Write a finished cell's record and curve to the store and log one line about it; returns
    its status. Nothing is written once the claim was taken over: the taker's result stands."""
    if not claim.held():
        log.error(
            "%s: %s was taken over by another process; this run's result is dropped",
            label,
            record["cell_id"],
        )
        return "claimed"
    record["parallel_cells"] = max(
        _launcher(plan).parallel_cells(HydraConfig.get().launcher, plan.size),
        int(os.environ.get(PARALLEL_ENV) or 1),  # one-cell sweeps run side by side (frontier)
    )
    # At most: a pinned worker shares its GPU with up to cells_per_gpu - 1 others (and no more
    # than the launcher runs at once); otherwise every cell the launcher runs at once shares the
    # one device (the CPU, or the one GPU).
    record["cells_per_device"] = (
        min(cell.train.cells_per_gpu, record["parallel_cells"])
        if slot is not None
        else record["parallel_cells"]
    )
    record["shared_device"] = record["cells_per_device"] > 1
    if slot is not None:
        record["pinned_gpu"] = slot.gpu
    try:
        folder = write_cell(cell.store, record, curve)
    except OSError as error:  # a full disk, a store gone read-only: say so in one line
        log.error(
            "%s: cannot write %s into the store (%s); re-running the same command trains it again",
            label,
            record["cell_id"],
            error.strerror or error,
        )
        return "error"
    if record["status"] == "ok":
        escape = record.get("escape_step")
        log.info(
            "%s done: %s  %s (%s)  final loss %.4f  val %.4f  %.0f tok/s  -> %s",
            label,
            record["cell_id"],
            record["verdict"],
            "never left the plateau" if escape is None else f"left the plateau at step {escape}",
            record["final_loss"],
            record["val_loss"],
            record["tokens_per_s"],
            folder,
        )
    else:
        log.error("%s: %s errored (traceback in %s/record.json)", label, record["cell_id"], folder)
    return str(record["status"])


def _stop_when_the_sweep_is_gone(plan: SweepPlan) -> None:
    """In a worker process of a local parallel launcher (joblib, submitit local): exit as soon as
    the sweep's main process is gone. Otherwise a killed sweep (``kill PID``) leaves its workers
    training their queued cells for minutes, unseen. Ctrl-C in a terminal reaches every process
    of the sweep anyway. The cell in flight is left as a killed run is: its partial curve and
    running marker, never a half-written record (store writes are atomic). Cluster launchers'
    jobs are left alone: they belong to the cluster, not to the process that submitted them."""
    global _watching
    main_pid = plan.pid
    if _watching or plan.in_main_process() or main_pid <= 0:
        return
    if not _launcher(plan).local_workers:
        return
    _watching = True

    def stop() -> None:
        log.error("the sweep's main process is gone: this worker stops (finished cells are kept)")
        logging.shutdown()
        os._exit(1)

    def watch() -> None:
        while _descends_from(main_pid):
            time.sleep(1)
        stop()

    if not _descends_from(main_pid):
        stop()  # killed while this worker was starting up
    threading.Thread(target=watch, name="sweep-watchdog", daemon=True).start()


def _launcher(plan: SweepPlan) -> Launcher:
    """The launcher this job runs under (suite/launch/launchers.py), as its sweep's plan names "
    "it."""
    return launcher(plan.launcher, str(HydraConfig.get().launcher.get("_target_", "")))


def _descends_from(pid: int) -> bool:
    """Whether ``pid`` is this process's parent or, on Linux (/proc), any ancestor. When a process
    dies its children are re-parented, so a dead (even unreaped) ancestor drops out of the chain."""
    current = os.getppid()
    while current > 1 and current != pid:
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except OSError:
            return False
        current = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: ppid
    return current == pid and pid > 1


def pack_learning_rates(
    args: list[str], cells: list[CellConfig]
) -> tuple[list[str], dict[str, list[float]], list[list[str]]]:
    """The command line with the learning-rate axis folded into each job: every job trains all
    of the sweep's learning rates as one packed run. The job composes the pack's first member
    (the first LR); the plan maps that member's id to the pack's LRs. Returns the new arguments,
    the packs and the jobs (each pack's member ids)."""
    lrs = list(dict.fromkeys(cell.optim.lr for cell in cells))
    kept = [arg for arg in args if arg.split("=")[0].lstrip("+~") != "optim.lr"]
    by_id = {cell.cell_id(): cell for cell in cells}
    packs, jobs = {}, []
    for cell in cells:
        if cell.optim.lr != lrs[0]:
            continue
        members = [replace(cell, optim=replace(cell.optim, lr=lr)).cell_id() for lr in lrs]
        missing = [member for member in members if member not in by_id]
        if missing:  # a grid whose LRs differ between its points cannot be packed this way
            raise ConfigError(
                f"train.pack_lr: every point of the grid must have the same learning rates; "
                f"{missing[0]} is not in the sweep"
            )
        packs[members[0]] = lrs
        jobs.append(members)
    return [f"optim.lr={lrs[0]!r}", *kept], packs, jobs


def sweepable(args: list[str]) -> list[str]:
    """The command line as Hydra can sweep it, once preflight has checked every cell.

    Hydra composes the config before splitting a sweep: once to read the mode (every run here
    is a multirun, so it is said up front) and once for the sweeper, with the swept choices left
    out. A variant's own setting beside several variants (``+variant=dyt,derf
    variant.alpha_init=4``) has no ``variant`` to land on in that compose and would fail, so it
    goes in as ``++`` (set, or add): each job still composes its variant first and the setting
    on top, as preflight checked. ``+variant.KEY`` (add) is taken the same way: every variant
    setting already has a default, so Hydra's add would fail where preflight accepted it.
    The overrides go before the flags: Hydra's argument parser takes no override after a flag
    (``--config-dir DIR a=b``), where preflight took them all.
    """
    overrides, flags = [], ["--multirun"]
    rest = iter(args)
    for arg in rest:
        if not arg.startswith("-"):
            overrides.append(
                "++" + arg.lstrip("+") if arg.lstrip("+").startswith("variant.") else arg
            )
        elif arg not in ("-m", "--multirun"):
            flags.append(arg)
            if arg in ("--config-dir", "-cd"):
                flags.append(next(rest, ""))
    return [*overrides, *flags]


def preflight_overrides(args: list[str]) -> list[str]:
    """The overrides of the command line, and a user's ``--config-dir DIR`` (presets or configs
    of their own beside the suite's) as the search path preflight composes with, as Hydra will.
    """
    overrides, config_dirs = [], []
    rest = iter(args)
    for arg in rest:
        flag, has_value, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            config_dirs.append(value if has_value else next(rest, ""))
        elif not arg.startswith("-"):
            overrides.append(arg)
    if not config_dirs:
        return overrides
    if any(arg.lstrip("+").startswith("hydra.searchpath") for arg in overrides):
        raise ConfigError("hydra.searchpath: give either it or --config-dir, not both")
    for folder in config_dirs:
        if not folder or not Path(folder).is_dir():  # "" would be the working directory
            raise ConfigError(f"--config-dir: {folder!r} is not a directory")
    paths = ",".join(f"'file://{Path(folder).resolve()}'" for folder in config_dirs)
    return [*overrides, f"hydra.searchpath=[{paths}]"]


def _write_plans(plan: SweepPlan, cells: list[CellConfig]) -> list[Path]:
    """The sweep's plan in each store it writes to (only that store's cells in each)."""
    by_store: dict[str, set[str]] = {}
    for cell in cells:
        by_store.setdefault(cell.store, set()).add(cell.cell_id())
    return [plan.write(store, ids) for store, ids in by_store.items()]


def stop_in_turn(
    sweeps: list[subprocess.Popen], steps: Sequence[tuple[signal.Signals | None, float]]
) -> None:
    """Stop sweeps a parent runs (each a ``python -m suite`` process), a step at a time: each
    step sends its signal (None: none, only wait) to those still running and waits up to its
    grace in seconds for them to end. A sweep stops on SIGINT or SIGTERM keeping every finished
    cell, so the steps are how long to let it, and how hard to ask."""
    for stop, grace in steps:
        running = [sweep for sweep in sweeps if sweep.poll() is None]
        for sweep in running if stop is not None else ():
            with contextlib.suppress(ProcessLookupError):
                sweep.send_signal(stop)
        deadline = time.monotonic() + grace
        for sweep in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                sweep.wait(timeout=max(0.0, deadline - time.monotonic()))


def _on_ctrl_c(signum: int, frame: object) -> None:
    """SIGINT (or SIGTERM) in the sweep's main process. Python's own handler raises
    KeyboardInterrupt wherever the main thread is; if that is inside a weakref callback or a
    ``__del__`` (the garbage collector runs them anywhere), Python prints "Exception ignored" and
    carries on, and the sweep would train every remaining cell. So the interrupt is also
    remembered: the next job refuses to start and the sweep ends with 130."""
    _interrupted.set()
    raise KeyboardInterrupt


def _refuse_after_ctrl_c() -> None:
    if _interrupted.is_set():
        raise KeyboardInterrupt  # a Ctrl-C that Python swallowed (see _on_ctrl_c)


def _interrupted_exit() -> None:
    # Every finished cell's record is already on disk; only the cell in flight is lost.
    print(
        "\ninterrupted: finished cells are kept in the store; "
        "`python -m suite.collect` summarizes them",
        file=sys.stderr,
    )
    raise SystemExit(130) from None


def main() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if ignored
        signal.signal(signal.SIGINT, _on_ctrl_c)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        # `kill PID` (and the reference run passing on its own SIGTERM) stops the sweep as
        # Ctrl-C does: the cell in flight is marked interrupted and the plan ended. Also for a
        # sweep started in the background, where SIGINT is ignored.
        signal.signal(signal.SIGTERM, _on_ctrl_c)
    register_configs()  # also when preflight is skipped (--help, --cfg job)
    # Decided once, here: a worker must not start CUDA before it is pinned to its GPU.
    os.environ.setdefault(GPUS_ENV, ",".join(detect_gpus()))
    args = sys.argv[1:]
    flags = {arg.split("=")[0] for arg in args if arg.startswith("-")}
    if flags & {"--cfg", "-c", "--info", "-i"} and (swept := swept_overrides(args)):
        # Hydra prints one job's config and cannot take a sweep there (its own error is an
        # "ambiguous value" traceback).
        print(
            f"config error: --cfg/--info show one job's config, but {' '.join(swept)} sweeps "
            "several values; give one value each (e.g. +variant=preln)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if other := flags & set(_OTHER_CONFIG_FLAGS):
        print(
            f"config error: {sorted(other)[0]}: the suite runs its own config (conf/); put "
            "presets of your own in a folder and give it as --config-dir DIR",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if not flags & set(_INSPECT_FLAGS):
        try:
            overrides = preflight_overrides(args)
            cells = [cell for _, cell in preflight(overrides)]
            plan = SweepPlan(
                command=args,
                resume=bool(root_setting(overrides, "resume")),
                launcher=launcher_choice(overrides),
                jobs=[[cell.cell_id()] for cell in cells],
            )
            if any(cell.train.pack_lr for cell in cells):
                if not all(cell.train.pack_lr for cell in cells):
                    raise ConfigError(
                        "train.pack_lr: a sweep packs all its cells or none; run the packed and "
                        "the unpacked cells as two sweeps"
                    )
                args, plan.packs, plan.jobs = pack_learning_rates(args, cells)
        except ConfigError as error:
            print(f"config error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        os.environ[PLANS_ENV] = os.pathsep.join(map(str, _write_plans(plan, cells)))
        # The jobs learn the plan's name only; hydra.job.env_set.SUITE_* is refused from users.
        # First: argparse takes no further overrides after a flag such as --config-dir DIR.
        args = [f"++hydra.job.env_set.{PLAN_ENV}={plan.job_env}", *args]
        sys.argv[1:] = sweepable(args)
        os.environ[SWEEP_SIZE_ENV] = str(plan.size)
    try:
        run_job()
    except KeyboardInterrupt:
        _interrupted_exit()
    finally:
        for plan in filter(None, os.environ.get(PLANS_ENV, "").split(os.pathsep)):
            mark_ended(Path(plan))
    if _interrupted.is_set():  # swallowed during the last job: no job was left to refuse
        _interrupted_exit()
