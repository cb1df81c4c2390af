"""Property-based: any value for any key gives a clean ConfigError naming the key, or a valid
sweep; never a deep traceback from inside torch, never a written store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from suite.config import ConfigError
from suite.launch.preflight import preflight

KEYS = [
    "model.width",
    "model.heads",
    "model.depth",
    "model.mlp_ratio",
    "model.seq_len",
    "model.bias",
    "model.qk_norm",
    "model.value_residual",
    "data.source",
    "data.max_bytes",
    "data.val_fraction",
    "data.vocab_size",
    "optim.lr",
    "optim.beta1",
    "optim.beta2",
    "optim.eps",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.warmup_fraction",
    "optim.schedule",
    "optim.grad_clip",
    "optim.z_loss",
    "train.steps",
    "train.batch_size",
    "train.eval_batches",
    "train.device",
    "train.dtype",
    "train.threads",
    "verdict.blowup_factor",
    "verdict.stall_margin",
    "verdict.final_window",
    "verdict.borderline_margin",
    "verdict.late_escape_fraction",
    "seed",
    "variant.eps",
]


def as_override(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    return str(value)


VALUES = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.sampled_from([0, 1, -1, 3, 2**31, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(alphabet="abcxyz_", min_size=1, max_size=8),
    st.sampled_from(["null", "'{}'", "[1,2]", "cuda:7", "float16"]),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=3))
def test_any_bad_value_is_a_config_error_naming_a_key(overrides):
    args = ["+variant=preln", "sweep=tiny"] + [
        f"{k}={as_override(v)}" for k, v in overrides.items()
    ]
    try:
        preflight(args)
    except ConfigError as error:
        message = str(error)
        assert any(key in message for key in overrides) or "variant" in message, message
        assert "Traceback" not in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.width=1000000", "model: a cell needs"),
        ("model.depth=10000000", "model: a cell needs"),
        ("+hydra.callbacks.evil._target_=os.system", "_target_"),
        ("+model._target_=builtins.exec", "_target_"),
        ("train.device=cuda:7", "train.device: 'cuda:7' is not available here"),
    ],
)
def test_huge_models_and_foreign_targets_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        preflight(["+variant=preln", "sweep=tiny", override])


@pytest.mark.parametrize(
    "override", ["verdict.stall_margin=0.1,0.2", "train.threads=1,2", "seed=0,0"]
)
def test_a_grid_that_names_the_same_cell_twice_is_refused(override):
    """Sweeping a key that does not change training would train each cell twice, at once."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: the grid names cell .* twice|twice"):
        preflight(["+variant=preln", "sweep=tiny", override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("verdict.stall_margin=-0.1", "verdict.stall_margin"),
        ("verdict.final_window=0", "verdict.final_window"),
        ("verdict.borderline_margin=nan", "verdict.borderline_margin"),
        ("verdict.late_escape_fraction=1.0", "verdict.late_escape_fraction"),
    ],
)
def test_verdict_label_knobs_are_range_checked(override, key):
    with pytest.raises(ConfigError, match=key):
        preflight(["+variant=preln", "sweep=tiny", override])


@pytest.mark.parametrize("preset", ["quick", "warmup", "depth", "lr"])
def test_every_cpu_preset_runs_under_the_basic_launcher_too(preset):
    """The presets' per-core joblib settings sit in their launcher config, so replacing the
    launcher on the command line (hydra/launcher=basic: one cell at a time, in-process) works."""
    cells = preflight(["+variant=preln", f"sweep={preset}", "hydra/launcher=basic"])
    assert cells


@pytest.mark.parametrize(
    "override",
    [
        "+hydra.callbacks.evil._target_=os.system",
        "++hydra.callbacks.evil._target_=builtins.exec",
        "+hydra.callbacks.evil._target_=suite.launch.cli.os.system",  # imported into a suite module
        "+hydra.callbacks.evil={_target_: os.system, command: touch}",  # a dict value
        "+hydra.callbacks.evil._target_=hydra.utils.call",  # a Hydra function, not a class
        "+model.evil._target_=suite.store.pd.read_parquet",
        "+evil=[{_target_: subprocess.run}]",  # inside a list
        "+evil.deeper.still={_target_: variants.registry.importlib.import_module}",
        "+evil._target_=${oc.env:HOME}",  # an interpolation
        "+evil._target_=suite.analyze.collect.CollectCallback,os.system",  # a sweep
        "+evil._target_=antigravity.fly",  # never imported to find out
    ],
)
def test_every_override_form_of_a_foreign_target_is_refused(override):
    with pytest.raises(ConfigError, match="_target_"):
        preflight(["+variant=preln", "sweep=tiny", override])


def test_the_suites_own_classes_are_still_allowed_as_targets():
    cells = preflight(
        [
            "+variant=preln",
            "sweep=tiny",
            "+hydra.callbacks.again._target_=suite.analyze.collect.CollectCallback",
        ]
    )
    assert cells


def test_a_foreign_target_from_the_command_line_runs_nothing(tmp_path):
    from helpers import run_suite

    marker = tmp_path / "pwned"
    result = run_suite(
        "+variant=preln",
        "sweep=tiny",
        f"store={tmp_path / 'store'}",
        "+hydra.callbacks.evil._target_=suite.launch.cli.os.system",
        f"+hydra.callbacks.evil.command='touch {marker}'",
    )
    assert result.returncode == 2 and "_target_" in result.stderr
    assert not marker.exists() and not (tmp_path / "store").exists()


@pytest.mark.parametrize("store", ["{file}/store", "{file}", " "])
def test_a_store_that_cannot_be_written_is_a_one_line_error(tmp_path, store):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"^store: "):
        preflight(["+variant=preln", "sweep=tiny", f"store={store.format(file=blocker)}"])


@pytest.mark.parametrize("store", ["reference", "reference:quick", "{root}", "{root}/quick"])
def test_the_shipped_reference_is_no_store_to_train_into(store):
    from suite.store import REFERENCE_ROOT

    with pytest.raises(ConfigError, match=r"^store: is the suite's shipped reference results"):
        preflight(["+variant=preln", "sweep=tiny", f"store={store.format(root=REFERENCE_ROOT)}"])


def test_the_shipped_reference_under_another_spelling_is_no_store_either(tmp_path, monkeypatch):
    """A case-insensitive filesystem (macOS, Windows) opens `Reference/QUICK` as the reference's
    folder though no path comparison says so; simulated here by a samefile that ignores case."""
    import suite.store

    root = tmp_path / "reference"
    (root / "quick").mkdir(parents=True)
    monkeypatch.setattr(suite.store, "REFERENCE_ROOT", root)
    (tmp_path / "REFERENCE" / "QUICK").mkdir(parents=True)  # on Linux a folder of its own
    monkeypatch.setattr(Path, "samefile", lambda a, b: str(a).lower() == str(b).lower())
    with pytest.raises(ConfigError, match=r"^store: is the suite's shipped reference results"):
        preflight(["+variant=preln", "sweep=tiny", f"store={tmp_path / 'REFERENCE' / 'QUICK'}"])
    assert not suite.store.in_reference(tmp_path / "elsewhere")


def _data_file(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (lambda t: ["data=text", f"data.path={_data_file(t, 'empty.txt', b'')}"], "data.path"),
        (lambda t: ["data=text", f"data.path={_data_file(t, 'tiny.txt', b'abc')}"], "data.path"),
        (lambda t: ["data=tokens", f"data.path={_data_file(t, 'odd.bin', b'abc')}"], "data.path"),
        (lambda t: ["data=tokens", f"data.path={_data_file(t, 'e.bin', b'')}"], "data.path"),
        (
            lambda t: [
                "data=tokens",
                f"data.path={_data_file(t, 'ids.bin', bytes(range(200)) * 50)}",
                "data.vocab_size=300",
            ],
            "data.vocab_size",
        ),
        (lambda t: ["data.max_bytes=10"], "data.max_bytes"),
        (
            lambda t: ["data=text", f"data.path={_data_file(t, 'short.txt', b'x' * 3000)}"],
            "model.seq_len",
        ),
        (lambda t: ["data=text", f"data.path={t}"], "data.path"),  # a folder
    ],
)
def test_bad_data_fails_in_preflight_naming_the_key(tmp_path, args, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        preflight(["+variant=preln", "sweep=tiny", "model.seq_len=512", *args(tmp_path)])


def test_bad_data_from_the_command_line_writes_nothing(tmp_path):
    from helpers import run_suite

    empty = _data_file(tmp_path, "empty.txt", b"")
    store = tmp_path / "store"
    result = run_suite(
        "+variant=preln", "sweep=tiny", "data=text", f"data.path={empty}", f"store={store}"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("config error: data.path: ")
    assert not store.exists()


def test_every_setting_is_documented_and_range_checked_beside_its_field():
    """A new key without a meaning or a check fails here: each field of every section states its
    doc, and each non-boolean one its range check, in its own declaration (suite.config)."""
    import dataclasses

    import suite.config

    fields = [
        (f"{section}.{spec.name}", spec)
        for section, schema in suite.config.SECTIONS.items()
        for spec in dataclasses.fields(schema)
    ]
    undocumented = [key for key, spec in fields if not spec.metadata.get("doc")]
    unchecked = [
        key
        for key, spec in fields
        if spec.type not in ("bool", bool) and spec.metadata.get("check") is None
    ]
    assert undocumented == [] and unchecked == [], (undocumented, unchecked)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+model.qknorm=true",
            r"^model\.qknorm: not a setting of model .*did you mean model\.qk_norm",
        ),
        ("+optim.warmup=100", r"^optim\.warmup: not a setting of optim"),
        ("+foo=1", r"^foo: not a setting of the suite"),
        ("~model.width", r"^model\.width: .*does not support deletion"),
    ],
)
def test_a_force_added_or_deleted_setting_is_refused_naming_it(override, message):
    """`+key=` gets past Hydra's own check of unknown keys; a typed section would then carry the
    typo silently and train without it."""
    with pytest.raises(ConfigError, match=message):
        preflight(["+variant=preln", "sweep=tiny", override])


def test_the_settings_reference_says_which_settings_are_in_the_cell_id():
    from suite.config import describe_settings, in_cell_identity

    assert in_cell_identity("model.depth") and in_cell_identity("seed")
    assert in_cell_identity("verdict.blowup_factor") and in_cell_identity("variant")
    for key in ("diagnostics.every", "store", "sweep_name", "resume", "train.threads"):
        assert not in_cell_identity(key), key
    line = next(
        row for row in describe_settings().splitlines() if row.startswith("diagnostics.every")
    )
    assert line.endswith("[not in the cell id]")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.logit_softcap=-1", "model.logit_softcap"),
        ("tracker.kind=bogus", "tracker.kind"),
        ("tracker.dir='/tmp/a?b'", "tracker.dir"),
        ("tracker.dir='/tmp/a#b'", "tracker.dir"),
    ],
)
def test_the_remedy_and_tracker_settings_are_range_checked(override, key):
    with pytest.raises(ConfigError, match=key):
        preflight(["+variant=preln", "sweep=tiny", override])
