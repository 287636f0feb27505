"""Config loading, every override form and type, every error path with its message."""

import dataclasses
import textwrap

import pytest

from blip_recipes.config import (
    Config,
    ConfigError,
    LaunchContext,
    all_keys,
    field_docs,
    help_text,
    load_config,
    load_toml,
    to_toml,
    validate,
)
from blip_recipes.config.sections import DataSourceConfig


def write(tmp_path, text: str, name: str = "c.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_then_toml_then_cli(tmp_path):
    path = write(
        tmp_path,
        """
        [training]
        steps = 10
        [data]
        batch_size = 8
    """,
    )
    cfg = load_config(path, ["training.steps=20"])
    assert cfg.training.steps == 20  # CLI beats TOML
    assert cfg.data.batch_size == 8  # TOML beats default
    assert cfg.optimizer.lr == Config().optimizer.lr  # default


@pytest.mark.parametrize(
    "overrides",
    [
        ["training.steps=7"],
        ["--training.steps", "7"],
        ["--training.steps=7"],
        ["--training.steps=3", "training.steps=7"],  # applied in order
    ],
)
def test_override_forms(overrides):
    assert load_config(None, overrides).training.steps == 7


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("parallel.compile=true", lambda c: c.parallel.compile, True),
        ("parallel.compile=False", lambda c: c.parallel.compile, False),
        ("parallel.compile=0", lambda c: c.parallel.compile, False),
        ("data.batch_size=1_024", lambda c: c.data.batch_size, 1024),
        ("optimizer.lr=1e-3", lambda c: c.optimizer.lr, 1e-3),
        ("optimizer.lr=2", lambda c: c.optimizer.lr, 2.0),
        ("job.output_dir=/tmp/x y", lambda c: c.job.output_dir, "/tmp/x y"),
        ("optimizer.betas=[0.8, 0.95]", lambda c: c.optimizer.betas, [0.8, 0.95]),
        ("optimizer.betas=0.8,0.95", lambda c: c.optimizer.betas, [0.8, 0.95]),
        ("training.steps=none", lambda c: c.training.steps, None),
        ("training.grad_clip=1.5", lambda c: c.training.grad_clip, 1.5),
        ("lr_scheduler.name=cosine", lambda c: c.lr_scheduler.name, "cosine"),
        ("data.sources.0.kind=json", lambda c: c.data.sources[0].kind, "json"),
        (
            'data.sources.0.paths=["a.json","b.json"]',
            lambda c: c.data.sources[0].paths,
            ["a.json", "b.json"],
        ),
        ("data.sources.1.kind=shards", lambda c: c.data.sources[1].kind, "shards"),
        ("--parallel.float8-recipe=rowwise", lambda c: c.parallel.float8_recipe, "rowwise"),
    ],
)
def test_override_types(override, getter, expected):
    cfg = load_config(None, [override])
    value = getter(cfg)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainig.steps=3"], "unknown key 'trainig.steps'; did you mean 'training.steps'?"),
        (["training.stesp=3"], "did you mean 'training.steps'?"),
        (["data.batchsize=3"], "did you mean 'data.batch_size'?"),
        (["nonsense=3"], "unknown key 'nonsense'"),
        (["training.steps=abc"], "'training.steps': got 'abc', expected an integer"),
        (["optimizer.lr=fast"], "'optimizer.lr': got 'fast', expected a number"),
        (["parallel.fsdp=maybe"], "'parallel.fsdp': got 'maybe', expected true or false"),
        (["lr_scheduler.name=linear"], "expected one of 'step', 'cosine'"),
        (["data.sources.3.kind=json"], "by index 0..1"),
        (["data.sources.0.kindd=json"], "did you mean 'data.sources.N.kind'?"),
        (["training=3"], "is a table, not a value"),
        (["training.steps"], "expected section.key=value"),
        (["optimizer.betas=[0.9,"], "cannot parse"),
    ],
)
def test_override_errors(overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[trainig]\nsteps = 3\n", "unknown key 'trainig'; did you mean 'training'?"),
        ("[training]\nstpes = 3\n", "unknown key 'training.stpes'; did you mean 'training.steps'?"),
        ('[training]\nsteps = "3"\n', "'training.steps': got '3', expected an integer"),
        ("[training]\nsteps = true\n", "expected an integer"),
        ("[parallel]\nfsdp = 1\n", "expected true or false"),
        ('[lr_scheduler]\nname = "linear"\n', "expected one of 'step', 'cosine'"),
        ("[optimizer]\nbetas = 0.9\n", "expected list of float"),
        ("[data]\nsources = 3\n", "must be an array of tables"),
        ('[[data.sources]]\nkind = "url"\n', "'data.sources.0.kind': got 'url'"),
        ("training = 3\n", "'training' must be a table"),
        ("[training\n", "not valid TOML"),
    ],
)
def test_toml_errors_name_file_and_key(tmp_path, toml, message):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /no/such.toml"):
        load_toml("/no/such.toml")


def test_int_widens_to_float(tmp_path):
    cfg = load_toml(write(tmp_path, "[optimizer]\nlr = 1\n"))
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


def test_to_toml_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "training.steps=5",
            "data.sources.0.kind=json",
            "data.sources.0.paths=a.json",
            "data.sources.1.kind=shards",
            "data.sources.1.paths=s-{0..3}.tar",
            "data.sources.1.weight=0.5",
            'job.output_dir=a "quoted" dir',
            "optimizer.lr=3e-4",
        ],
    )
    again = load_toml(write(tmp_path, to_toml(cfg)))
    assert again == cfg


def test_validation_collects_every_problem():
    cfg = load_config(None, ["data.batch_size=0", "metrics.log_every=-1"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, LaunchContext(world_size=1))
    text = str(info.value)
    assert "'data.batch_size' must be positive, got 0" in text
    assert "'metrics.log_every' must be positive, got -1" in text


def test_queue_batch_invariant_names_both_numbers():
    cfg = load_config(
        None, ["momentum.queue_size=100", "data.batch_size=16", "tokenizer.kind=synthetic"]
    )
    with pytest.raises(ConfigError, match=r"'momentum.queue_size' \(100\).*16 x 2 = 32"):
        validate(cfg, LaunchContext(world_size=2))
    cfg.momentum.queue_size = 64
    validate(cfg, LaunchContext(world_size=2))


def test_register_validator_hook():
    from blip_recipes.config import checks

    def no_odd_seed(cfg, ctx):
        if cfg.job.seed % 2:
            yield "'job.seed' must be even in this test"

    checks.register_validator(no_odd_seed)
    try:
        cfg = load_config(
            None, ["job.seed=3", "tokenizer.kind=synthetic", "momentum.queue_size=75"]
        )
        with pytest.raises(ConfigError, match="must be even"):
            validate(cfg, LaunchContext(world_size=1))
    finally:
        checks.VALIDATORS.remove(no_odd_seed)


def test_every_field_is_documented():
    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name in ("sources",):
                continue
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"

    for section in dataclasses.fields(Config):
        walk(type(getattr(Config(), section.name)))
    walk(DataSourceConfig)
    text = help_text()
    for key in (
        "training.steps",
        "data.batch_size",
        "momentum.queue_size",
        "checkpoint.interval",
        "metrics.log_every",
        "job.output_dir",
        "job.seed",
        "data.sources.N.kind",
    ):
        assert key in text


def test_required_user_facing_keys_exist():
    keys = set(all_keys())
    for key in (
        "job.output_dir",
        "job.seed",
        "training.steps",
        "data.batch_size",
        "momentum.queue_size",
        "checkpoint.interval",
        "metrics.log_every",
    ):
        assert key in keys


def test_momentum_keys_of_model_and_training_are_read_with_a_deprecation_line(tmp_path, caplog):
    """Configs (and runs' saved config.toml) from before `[momentum]` still load, same values."""
    old = write(tmp_path, """
        [model]
        name = "blip_pretrain_tiny"
        queue_size = 96
        momentum = 0.99
        momentum_train_mode = false
        [training]
        alpha = 0.3
        alpha_ramp_epochs = 1.5
    """)  # fmt: skip
    with caplog.at_level("WARNING"):
        cfg = load_toml(old)
    m = cfg.momentum
    assert (m.queue_size, m.decay, m.train_mode, m.alpha, m.alpha_ramp_epochs) == (
        96, 0.99, False, 0.3, 1.5)  # fmt: skip
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert f"{old}: 'model.momentum' is deprecated, use 'momentum.decay'" in lines[1]
    assert load_toml(write(tmp_path, to_toml(cfg), "new.toml")) == cfg
    assert "queue_size" not in to_toml(cfg).split("[momentum]")[0]  # written in its new home
    caplog.clear()
    with caplog.at_level("WARNING"):
        cli = load_config(None, ["model.queue_size=48", "training.alpha=0.2"])
    assert (cli.momentum.queue_size, cli.momentum.alpha) == (48, 0.2)
    assert "command line: 'training.alpha' is deprecated, use 'momentum.alpha'" in caplog.text


def test_a_moved_key_given_in_both_places_is_refused(tmp_path):
    both = write(tmp_path, "[model]\nqueue_size = 96\n[momentum]\nqueue_size = 64\n")
    with pytest.raises(ConfigError, match="'model.queue_size' and 'momentum.queue_size' are both"):
        load_toml(both)
