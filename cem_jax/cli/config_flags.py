"""One flag per :class:`~cem_jax.config.RunConfig` field, generated from the dataclass.

The flag kind follows the field's type (``int`` → integer, ``float`` → float, ``bool`` → bool, ``str`` →
string, or enum where :data:`CHOICES` lists the accepted values, ``tuple[T, ...]`` → a comma-separated
list of ``T``); ``X | None`` fields default to ``None`` ("the arch's / defense's default"). The default
shown by ``--help`` is the dataclass default, followed by the values the presets change. The help text
of a field is its ``metadata["help"]`` or, failing that, :data:`HELP` — a test checks every field has one.

Only flags the user set become overrides (:func:`config_overrides`): a flag left at its default never
overrides a preset (``--preset=quick`` keeps its 6 epochs unless ``--epochs`` is given).

>>> from absl import app, flags, logging
>>> fv = flags.FlagValues()
>>> names = define_config_flags(fv)
>>> _ = fv(["prog", "--sigma=0.2", "--attacks=decoder"])
>>> config_overrides(fv, names)
{'sigma': 0.2, 'attacks': ('decoder',)}
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging

from cem_jax import config as config_lib
from cem_jax import defenses, errors, xla_cpu
from cem_jax.models import ARCHS

# str fields whose flag is an enum (absl rejects other values before anything runs). `dataset` and
# `defense` stay plain strings: config validation suggests the closest name, and a folder dataset may
# carry any name.
CHOICES: dict[str, Sequence[str]] = {
    "arch": ARCHS,
    "cem_mode": config_lib.CEM_MODES,
    "lambda_schedule": config_lib.LAMBDA_SCHEDULES,
    "lr_schedule": config_lib.LR_SCHEDULES,
    "topk_scope": defenses.TOPK_SCOPES,
    "threat_model": config_lib.THREAT_MODELS,
}

# Help of every RunConfig field without metadata["help"] (tests/test_cli.py checks the coverage).
HELP: dict[str, str] = {
    # data
    "dataset": "Dataset: " + ", ".join(config_lib.DATASETS) + ", or tfds:NAME for a TensorFlow "
    "Datasets image classification set prepared under --data_dir or $TFDS_DATA_DIR (a folder dataset "
    "of another kind is named after its folder; see docs/data.md).",
    "data_dir": "Where the data are: a folder or zip with train/<class>/* + test/<class>/*, Tiny "
    "ImageNet's folder or zip, or a prepared cifar10.npz / official CIFAR archive (or its folder). "
    "Default: $CEM_DATA_DIR; unset: CIFAR is downloaded once into $CEM_DOWNLOAD_DIR.",
    "train_subset": "Train on a class-balanced subset of N images (default: all).",
    "test_subset": "Evaluate on a random subset of N test images (default: all).",
    # split model
    "arch": "Split architecture.",
    "cut_layer": "Cut layer (default: 4 for VGG, 5 for ResNet20).",
    "bottleneck_channels": "Channels of the client's bottleneck conv (0: none).",
    # defense
    "defense": "Defense preset, cem_X = noise(sigma) + X + CEM; the presets and their defaults: {presets}. "
    "Every value can be overridden by its flag.",
    "sigma": "Noise standard deviation (default: the defense's, 0.1 for the noise variants).",
    "lambd": "Weight of the CEM loss L_C (default: the defense's).",
    "dropout_ratio": "Ratio of zeroed features in the dropout defenses (default: the defense's).",
    "dropout_rescale": "Rescale kept features by 1/(1-r) (default off, as the reference).",
    "topk_ratio": "Fraction of features zeroed by the top-k defenses (default: the defense's).",
    "topk_scope": "Top-k per sample (default, what a deployed client can do) or over the whole "
    "batch (the reference).",
    "nopeek_alpha": "Weight of the NoPeek distance-correlation loss (default: the defense's).",
    "adversarial_alpha": "Weight of the adversarial defense's SSIM penalty (default: the defense's).",
    "ssim_threshold": "SSIM above which the adversarial defense penalises (default: the defense's).",
    "cem_mode": (
        "reference: the official code's hinge loss (the default, chosen by the frontier study: "
        "docs/default_cem_loss.md); gmm: the paper's Gaussian-mixture bound."
    ),
    "lambda_schedule": (
        "constant: lambd throughout; inverse_lr: lambd * lr0 / lr(t) (x5 at every lr decay), the "
        "official code's 0.001/lr scaling (its lambda_ref = lambd * lr0 / 0.001; the default)."
    ),
    "clusters_per_class": "k-means clusters per class (default: 5 for VGG, 15 for ResNet).",
    "kmeans_iterations": "Lloyd iterations of each per-epoch k-means refresh.",
    # optimisation
    "epochs": "Training epochs.",
    "batch_size": "Global training batch size.",
    "lr": "Base learning rate of SGD (decayed at --lr_milestones).",
    "momentum": "SGD momentum.",
    "weight_decay": "SGD weight decay.",
    "lr_milestones": "Fractions of the run at which the learning rate is multiplied by --lr_decay.",
    "lr_decay": "Learning-rate factor at each milestone.",
    "lr_schedule": "multistep: x --lr_decay at --lr_milestones (the reference); onecycle: linear "
    "warm-up from 0 to --lr (the peak) over --warmup_fraction of the steps, then linear decay to 0 at the end "
    "(under --lambda_schedule=inverse_lr, lambd then grows with the decay, at most x25).",
    "warmup_fraction": "Fraction of the steps over which --lr_schedule=onecycle warms up to --lr "
    "(read by onecycle only).",
    "augment_padding": "Training augmentation: zero padding (pixels) before the random crop, with a "
    "random horizontal flip (4: the reference; 0: flips only).",
    "nesterov": "Nesterov momentum (PyTorch's form; off in the reference).",
    "label_smoothing": "Label smoothing eps of the cross-entropy: targets (1 - eps) * one_hot + "
    "eps / num_classes (0: none, as the reference).",
    "seed": "Random seed of training (the reference's 125).",
    "eval_batch_size": "Batch size of the test-set evaluations.",
    # attacks
    "attacks": "Attacks after training, any of: "
    + ", ".join(config_lib.ATTACKS)
    + " (empty: none).",
    "attack_settings": "Attack settings: train_time (decoder trained on the training set) and/or "
    "inference_time (trained on 90% of the test set).",
    "attack_steps": "Most optimizer steps of the decoder attack (it stops earlier on a validation "
    "plateau).",
    "attack_batch_size": "Batch size of the attacks.",
    "attack_eval_every": "Validate the attacker every N steps (the plateau rule's unit).",
    "attack_patience": "Validations without a real gain before the attack's lr decays / it stops.",
    "attack_min_improvement": "Relative drop of the validation MSE that counts as a real gain.",
    "attack_lr_decays": "x0.2 learning-rate decays of the attack before a plateau stops it.",
    "attack_val_fraction": "Fraction of the attacker's images held out for its validation.",
    "attack_train_subset": "Train the train-time decoder on N images only (default: all).",
    "gan_steps": "Most critic steps of the GAN attack (one generator step per 10).",
    "gan_train_subset": "Train the GAN attack on the first N attacker images (default: all).",
    "whitebox_steps": "Most optimisation steps of the white-box attack per image batch.",
    "whitebox_images": "Evaluation images the white-box attack inverts (the first N of each setting).",
    "whitebox_tv_weight": "Weight of the white-box attack's total-variation prior.",
    "threat_model": "server_view: the attacker sees every obfuscation; noise_only: the reference's "
    "attacker, who simulates the noise only.",
    "attack_seed": "Random seed of the attacks.",
}


def config_fields() -> dict[str, dataclasses.Field]:
    """The fields of :class:`RunConfig`, by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(config_lib.RunConfig)}


def help_of(name: str) -> str | None:
    """The help text of a config field (``metadata["help"]`` first, then :data:`HELP`)."""
    field = config_fields()[name]
    text = field.metadata.get("help") or HELP.get(name)
    if text and "{presets}" in text:
        text = text.replace("{presets}", defenses.describe_presets())
    return text


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(config_lib.RunConfig)


def flag_kind(name: str) -> tuple[type, bool]:
    """``(base type, optional)`` of a field: ``int | None`` → ``(int, True)``; tuples as ``tuple[T, ...]``."""
    hint = _type_hints()[name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"RunConfig.{name}: {hint} has no flag kind (one type or None, please)")
        hint = args[0]
    return hint, optional


class TupleParser(flags.ArgumentParser):
    """Comma-separated values of one type, as a tuple (``""`` → ``()``); a bad element is a clear error."""

    syntactic_help = "a comma-separated list"

    def __init__(self, element: Callable[[str], Any], element_name: str):
        self.element = element
        self.element_name = element_name
        self.syntactic_help = f"a comma-separated list of {element_name.split(' ', 1)[1]}s"

    def parse(self, argument: Any) -> tuple:
        if isinstance(argument, list | tuple):
            return tuple(argument)
        items = [s.strip() for s in str(argument).split(",") if s.strip()]
        out = []
        for s in items:
            try:
                out.append(self.element(s))
            except ValueError:
                raise ValueError(f"{s!r} is not {self.element_name}") from None
        return tuple(out)

    def flag_type(self) -> str:
        return f"list of {self.element_name}"


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(s)
    return v


_ELEMENT = {
    str: (str, "a string"),
    int: (int, "an integer"),
    float: (_finite_float, "a number"),
}


def define_tuple_flag(
    name: str,
    default: Sequence[Any] | None,
    help: str,
    element: type,
    *,
    flag_values: flags.FlagValues = flags.FLAGS,
) -> flags.FlagHolder:
    """A comma-separated list flag whose elements are parsed as ``element`` (str, int or float)."""
    fn, element_name = _ELEMENT[element]
    return flags.DEFINE(
        TupleParser(fn, element_name),
        name,
        None if default is None else tuple(default),
        help,
        flag_values=flag_values,
        serializer=flags.CsvListSerializer(","),
    )


def _flag_text(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def _preset_note(name: str) -> str:
    notes = [f"{p}: {_flag_text(v[name])}" for p, v in config_lib.PRESETS.items() if name in v]
    return f" [preset {'; '.join(notes)}]" if notes else ""


def define_config_flags(
    flag_values: flags.FlagValues = flags.FLAGS,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    unset_note: str | None = None,
) -> list[str]:
    """Defines one flag per :class:`RunConfig` field (``only`` those, minus ``exclude``); their names.

    With ``unset_note`` (e.g. ``"default: the run's"``) every flag defaults to ``None`` and its help
    ends with the note instead of the dataclass default and the presets' values.

    Raises ``TypeError`` for a field type with no flag kind, so a new field cannot silently lack a flag.
    """
    fields = config_fields()
    wanted = list(fields) if only is None else [n for n in fields if n in set(only)]
    names = [n for n in wanted if n not in set(exclude)]
    for name in names:
        field = fields[name]
        default = field.default if field.default is not dataclasses.MISSING else None
        base, _ = flag_kind(name)
        help_text = help_of(name) or name
        if unset_note is None:
            help_text += _preset_note(name)
        else:
            default = None
            help_text += f" [{unset_note}]"
        kw = {"flag_values": flag_values}
        if typing.get_origin(base) is tuple:
            args = typing.get_args(base)
            if len(args) != 2 or args[1] is not Ellipsis or args[0] not in _ELEMENT:
                raise TypeError(f"RunConfig.{name}: {base} has no flag kind (tuple[T, ...] please)")
            define_tuple_flag(name, default, help_text, args[0], **kw)
        elif base is bool:
            flags.DEFINE_bool(name, default, help_text, **kw)
        elif base is int:
            flags.DEFINE_integer(name, default, help_text, **kw)
        elif base is float:
            flags.DEFINE_float(name, default, help_text, **kw)
        elif base is str and name in CHOICES:
            flags.DEFINE_enum(name, default, list(CHOICES[name]), help_text, **kw)
        elif base is str:
            flags.DEFINE_string(name, default, help_text, **kw)
        else:
            raise TypeError(f"RunConfig.{name}: type {base} has no flag kind")
    return names


def config_overrides(flag_values: flags.FlagValues, names: Iterable[str]) -> dict[str, Any]:
    """``{field: value}`` of the config flags the user set (a flag left at its default is absent)."""
    return {
        name: flag_values[name].value for name in names if not flag_values[name].using_default_value
    }


DISTRIBUTED_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id")


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """``--distributed`` and the coordinator flags of a multi-process run (DESIGN §5); their names.

    Not RunConfig fields: how many hosts run a job does not change what it computes.
    """
    kw = {"flag_values": flag_values}
    flags.DEFINE_enum(
        "distributed",
        "auto",
        ["auto", "true", "false"],
        "Join JAX's distributed runtime (jax.distributed.initialize) to run on several processes "
        "or hosts. auto: when --coordinator_address / $JAX_COORDINATOR_ADDRESS is given or JAX "
        "detects a multi-process cluster job (SLURM, Open MPI, Cloud TPU pod slice, Kubernetes); "
        "true: always (JAX auto-detects what is not given); false: never.",
        **kw,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0's coordinator (default $JAX_COORDINATOR_ADDRESS, or detected).",
        **kw,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "Processes in the job (default $JAX_NUM_PROCESSES, or detected).",
        **kw,
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index (default $JAX_PROCESS_ID, or detected).", **kw
    )
    return list(DISTRIBUTED_FLAGS)


def define_device_flags(
    flag_values: flags.FlagValues = flags.FLAGS, *, num_devices: bool = True
) -> list[str]:
    """``--device_index`` (and ``--num_devices``): which devices a run's mesh uses; their names.

    Not RunConfig fields: the devices a run is placed on do not change what it computes.
    """
    kw = {"flag_values": flag_values}
    names = ["device_index"]
    if num_devices:
        flags.DEFINE_integer(
            "num_devices",
            None,
            "Devices in the data mesh (default: all; one when --device_index is given).",
            **kw,
        )
        names.append("num_devices")
    flags.DEFINE_integer(
        "device_index",
        None,
        "Pin the run to the devices from this index on (jax.devices()[K:K+num_devices]), e.g. one "
        "sweep shard per GPU of a machine (with XLA_PYTHON_CLIENT_PREALLOCATE=false; or give each "
        "shard its own CUDA_VISIBLE_DEVICES instead). Single-process runs only.",
        **kw,
    )
    return names


def initialize_distributed_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """:func:`cem_jax.parallel.initialize_distributed` with the flags of
    :func:`define_distributed_flags` (call before anything touches a JAX device).

    A bad value (of a flag or ``$JAX_NUM_PROCESSES`` / ``$JAX_PROCESS_ID``) is a
    :class:`cem_jax.errors.UsageError`; a runtime that cannot be joined (an unreachable coordinator,
    an incomplete cluster description) a :class:`cem_jax.errors.CemError`.
    """
    from cem_jax import parallel

    try:
        return parallel.initialize_distributed(
            flag_values.distributed,
            coordinator_address=flag_values.coordinator_address or None,
            num_processes=flag_values.num_processes,
            process_id=flag_values.process_id,
        )
    except ValueError as e:
        raise errors.UsageError(f"--distributed: {e}") from e
    except RuntimeError as e:  # jax.distributed.initialize's, e.g. a coordinator not reached
        raise errors.CemError(
            f"--distributed: joining the distributed runtime failed ({e}). Check "
            "--coordinator_address, --num_processes and --process_id (or --distributed=false)."
        ) from e


def register_key_flags(names: Iterable[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Lists ``names`` in ``--help`` of the program being run (its flags live in this package, not in
    the ``__main__`` script that absl's short help looks at)."""
    for name in names:
        flag_values.register_key_flag_for_module(sys.argv[0], flag_values[name])


# ------------------------------------------------------------------------------- failures
# Every program ends an expected failure (cem_jax.errors.CemError, a flag absl refuses) with one line
# "error: <message>" on stderr and a non-zero exit code (2: a usage error), without a traceback;
# anything else is a bug and keeps its traceback.


def fail(message: str, exit_code: int = 1, *, at: str | None = None) -> NoReturn:
    """Ends the program: ``error: <message>`` (``error at <at>: ...``) on one line of stderr (a
    library's multi-line text inside the message is joined), exit code ``exit_code``."""
    one_line = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"error{f' at {at}' if at else ''}: {one_line}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def run_main(fn: Callable[[list[str]], Any], argv: list[str]) -> None:
    """``fn(argv)``, ending an expected failure (:class:`cem_jax.errors.CemError`) with :func:`fail`
    (its message, its exit code). Any other exception propagates with its traceback.

    >>> def main(argv):
    ...     raise errors.UsageError("sigma=-1: accepted values are > 0.")
    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     try:
    ...         run_main(main, ["prog"])
    ...     except SystemExit as e:
    ...         print(e.code, err.getvalue().strip())
    2 error: sigma=-1: accepted values are > 0.
    """
    # gcsfs logs each exhausted retry with its traceback before raising; the raise ends below
    import logging as std_logging

    std_logging.getLogger("gcsfs").setLevel(std_logging.CRITICAL)
    try:
        fn(argv)
    except errors.CemError as e:
        fail(str(e), e.exit_code)
    except OSError as e:
        # a remote store (gs://) that cannot be reached: raised inside the network stack, not a bug
        if not errors.raised_by(e, *NETWORK_MODULES):
            raise
        fail(
            f"cannot reach the remote storage ({type(e).__name__}: {e}). Check the network and the "
            "bucket's name and credentials, or use a local --workdir / --root."
        )


#: Packages whose ``OSError`` means an unreachable remote store (:func:`run_main`).
NETWORK_MODULES = ("aiohttp", "gcsfs", "fsspec", "google", "requests", "urllib3", "socket", "ssl")


def usage_errors(what: Callable[[], Any]) -> Any:
    """``what()``, a :class:`ValueError` of config validation (naming the bad value and the accepted
    ones) raised again as a :class:`cem_jax.errors.UsageError`."""
    try:
        return what()
    except errors.CemError:
        raise
    except ValueError as e:
        raise errors.UsageError(str(e)) from None


def check_no_arguments(argv: Sequence[str]) -> None:
    """Refuses positional arguments (every setting is a flag) with a :class:`~cem_jax.errors.UsageError`."""
    if len(argv) > 1:
        raise errors.UsageError(
            f"unexpected arguments {list(argv[1:])}: every setting is a flag, --name=value "
            "(--helpshort lists them)."
        )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run``'s ``flags_parser``); a flag it refuses (unknown, a bad value,
    a required one missing) ends the program with :func:`fail` and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (--helpshort lists the flags, --helpfull all of them)", 2)


def start(doc: str | None, names: Iterable[str], fn: Callable[[list[str]], None]) -> None:
    """``absl.app.run(fn)`` with ``--help`` showing ``doc`` and the flags ``names`` (every entry point);
    flag errors and expected failures end in one ``error:`` line (:func:`parse_flags`, :func:`run_main`)."""
    main_module = sys.modules.get("__main__")
    if main_module is not None and not getattr(main_module, "__doc__", None):
        main_module.__doc__ = doc
    register_key_flags(names, flags.FLAGS)
    logging.set_verbosity(logging.WARNING)
    xla_cpu.tune_malloc()  # before XLA starts its threads (cem_jax.xla_cpu says why)
    app.run(functools.partial(run_main, fn), flags_parser=parse_flags)
